"""Downstream throughput with several study cells trained at once (a benchmark, not a test).

Usage: python scripts/bench_cells_at_once.py [--cells 1 2 4 8] [--steps 20] [--mode scratch]
           [--preset cpu] [--size 128] [--device auto] [--processes 1] [--threads T]
           [--no-channels-last] [--json FILE]

For each G in --cells, times `training.downstream.train_segmentation_cells` on G cells (one
annotated patient of 10 random --size x --size slices each, batch `downstream.batch_size`), after a
warm-up run, and prints the slices/s of one cell, of the process (G cells) and of the machine
(--processes copies of this measurement running at once, each its own process, with --threads
threads each: what `study.workers` does). The steps are the study's (augmentation, forward,
backward, Adam); evaluation is not timed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

from pix2rep.config import preset_config
from pix2rep.data.dataset import PreparedPatient
from pix2rep.data.preprocess import PreparedVolume
from pix2rep.provenance import machine_meta
from pix2rep.runtime import resolve_device, use_bf16
from pix2rep.training.downstream import build_segmentation_model, train_segmentation_cells

SLICES = 10


def random_patient(seed: int, size: int) -> PreparedPatient:
    rng = np.random.default_rng(seed)
    images = rng.random((SLICES, size, size), dtype=np.float32)
    masks = rng.integers(0, 4, (SLICES, size, size)).astype(np.uint8)
    volume = PreparedVolume(images, masks, np.arange(SLICES), (0, size, 0, size), (SLICES, size, size),
                            (10.0, 1.5, 1.5), f"p{seed}", "ED")
    return PreparedPatient(f"p{seed}", "NOR", [volume])


def measure(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for g in args.cells:
        cfg = preset_config(args.preset)
        cfg.device, cfg.downstream.mode, cfg.channels_last = args.device, args.mode, not args.no_channels_last
        state = build_segmentation_model(cfg).backbone.state_dict() if args.mode in ("finetune", "probe") else None
        cells = [(seed, [random_patient(seed, args.size)]) for seed in range(g)]
        cfg.downstream.steps = 3
        train_segmentation_cells(cfg, cells, state, progress=False)  # warm-up: kernels, allocator
        cfg.downstream.steps = args.steps
        device = resolve_device(cfg.device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_segmentation_cells(cfg, cells, state, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        per_process = g * args.steps * cfg.downstream.batch_size / seconds
        rows.append({"cells": g, "steps": args.steps, "batch": cfg.downstream.batch_size, "mode": args.mode,
                     "preset": args.preset, "size": args.size, "channels_last": cfg.channels_last,
                     "bf16": use_bf16(cfg.bf16, device), "seconds": seconds,
                     "slices_per_s_per_cell": per_process / g, "slices_per_s_per_process": per_process})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mode", default="scratch", choices=("scratch", "finetune", "probe"))
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--size", type=int, default=128, help="slice side in pixels (the demo's is 96)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--processes", type=int, default=1, help="copies run at once, one process each")
    parser.add_argument("--threads", type=int, default=0, help="threads of each process (default: torch's)")
    parser.add_argument("--no-channels-last", action="store_true", help="contiguous (NCHW) memory instead")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.processes == 1:
        rows = measure(args)
    else:  # the same measurement in N processes at once; each prints its rows as JSON
        child = [sys.executable, __file__, "--child", "--cells", *map(str, args.cells), "--steps", str(args.steps),
                 "--mode", args.mode, "--preset", args.preset, "--size", str(args.size), "--device", args.device,
                 "--threads", str(args.threads)] + (["--no-channels-last"] if args.no_channels_last else [])
        procs = [subprocess.Popen(child, stdout=subprocess.PIPE, text=True) for _ in range(args.processes)]
        results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        rows = [{**r, "slices_per_s_per_process": float(np.mean([res[i]["slices_per_s_per_process"] for res in results])),
                 "slices_per_s_per_cell": float(np.mean([res[i]["slices_per_s_per_cell"] for res in results]))}
                for i, r in enumerate(results[0])]
    if args.child:
        print(json.dumps(rows))
        return
    for r in rows:
        r["processes"], r["threads"] = args.processes, args.threads or torch.get_num_threads()
        r["slices_per_s_total"] = r["slices_per_s_per_process"] * args.processes
    meta = machine_meta(resolve_device(args.device))
    threads = args.threads or torch.get_num_threads()
    print(f"{meta['machine']}, torch {meta['torch']}, {threads} thread(s) in each of {args.processes} process(es)")
    print("cells at once | s per step | slices/s per cell | per process | in total")
    for r in rows:
        print(f"{r['cells']:>13} | {r['seconds'] / r['steps']:10.3f} | {r['slices_per_s_per_cell']:17.1f} | "
              f"{r['slices_per_s_per_process']:11.1f} | {r['slices_per_s_total']:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": meta["machine"], "torch": meta["torch"], "commit": meta["commit"],
                       "command": " ".join(sys.argv), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
