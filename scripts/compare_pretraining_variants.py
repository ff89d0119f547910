"""Measure whether a pretraining setting changes results, on ACDC POOL patients only (issue 17:
the deviations from the reference code that README lists as not measured).

Each variant is the `cpu` preset's Pix2Rep pretraining with its own settings (KEY=VALUE as
`--set`), trained for the same epochs from the same seed, with the model size fixed (no
fit_sizes, no time cap). Each backbone then gets linear probes on 5 pool patients (on cached
features; PROBE_DRAWS draws) and 1-shot fine-tunings (DRAWS draws), every run scored by 3D Dice
(mean over RV, MYO, LV) on the same 10 other pool patients (two per group, set aside before any
draw); draw k is the same patients for every variant. The 20 evaluation patients are never loaded.

  python scripts/compare_pretraining_variants.py --data ../shared/data/acdc/training --out DIR \
      --variant one-pass --variant two-passes pretrain.separate_view_passes=true \
      [--epochs 10] [--draws 4] [--probe-draws 1] [--steps 300]

Writes DIR/variants.csv, one row per variant and downstream run, rewritten after each run; a rerun
skips the runs already in it and resumes an unfinished pretraining. Prints the per-draw
differences of each variant against the first.
"""

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from pix2rep.checkpoints import load_checkpoint
from pix2rep.config import apply_overrides, parse_assignment, preset_config
from pix2rep.data.dataset import load_patients
from pix2rep.data.sampling import sample_few_shot_patients, split_development
from pix2rep.evaluation.evaluate import evaluate_patients
from pix2rep.runtime import resolve_device
from pix2rep.training.downstream import train_segmentation
from pix2rep.training.pretrain import pretrain

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", required=True)
parser.add_argument("--out", required=True, help="folder for the pretrainings and variants.csv")
parser.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"),
                    help="a name, then the settings that make it (none: the defaults); the first is the reference")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--draws", type=int, default=4, help="1-shot fine-tuning draws (seeds 0..DRAWS-1)")
parser.add_argument("--probe-draws", type=int, default=1, help="5-patient probe draws (seeds 0..PROBE_DRAWS-1)")
parser.add_argument("--steps", type=int, default=300, help="downstream optimiser steps")
args = parser.parse_args()

quiet = lambda *_: None  # noqa: E731
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
base = preset_config("cpu", pretrain={"epochs": args.epochs, "max_minutes": None, "fit_sizes": ()},
                     downstream={"steps": args.steps, "probe_features": "cached"})
pool, _ = split_development(load_patients(args.data, base, log=quiet))
scored = sample_few_shot_patients(pool, 10, 1000)
draw_from = [p for p in pool if p not in scored]
device = resolve_device(base.device)
print(f"scored on {[p.id for p in scored]}; draws from the {len(draw_from)} other pool patients", flush=True)

csv_path = out / "variants.csv"
rows = list(csv.DictReader(open(csv_path))) if csv_path.exists() else []
done = {(r["variant"], r["mode"], r["seed"]) for r in rows}
for name, *settings in args.variant:
    cfg = apply_overrides(base, dict(parse_assignment(s) for s in settings))
    run = out / name
    runs = [("probe", 5, seed) for seed in range(args.probe_draws)] + [("finetune", 1, seed) for seed in range(args.draws)]
    if all((name, mode, str(seed)) in done for mode, _, seed in runs):
        continue
    t0 = time.time()
    last = run / "last.pt"
    if not last.exists() or load_checkpoint(last)[0]["epoch"] < args.epochs:
        run.mkdir(exist_ok=True)
        summary = pretrain(cfg, pool, run, resume=last.exists(), progress=False, log=quiet)
        print(f"{name}: pretrained {summary['epochs']} epochs in {(time.time() - t0) / 60:.1f} min, "
              f"best validation loss {summary['best_val_loss']:.4f}", flush=True)
    payload, _ = load_checkpoint(run / "best.pt")
    for mode, n, seed in runs:
        if (name, mode, str(seed)) in done:
            continue
        t1 = time.time()
        chosen = sample_few_shot_patients(draw_from, n, seed)
        down = apply_overrides(cfg, {"downstream.mode": mode, "downstream.seed": seed})
        model, _ = train_segmentation(down, chosen, backbone_state=payload["backbone"], progress=False, log=quiet)
        scores, _, _ = evaluate_patients(model, scored, device, down.bf16)
        dice = np.array([[r[f"dice_{c}"] for c in ("RV", "MYO", "LV")] for r in scores]).mean(0)
        rows.append({"variant": name, "settings": " ".join(settings), "best_epoch": payload["epoch"],
                     "mode": mode, "n": n, "seed": seed, "patients": " ".join(p.id for p in chosen),
                     **{f"dice_{c}": f"{v:.4f}" for c, v in zip(("RV", "MYO", "LV"), dice)},
                     "dice_mean": f"{dice.mean():.4f}", "seconds": f"{time.time() - t1:.0f}"})
        print({k: rows[-1][k] for k in ("variant", "mode", "seed", "dice_mean", "seconds")}, flush=True)
        with open(csv_path, "w", newline="") as f:  # rewritten after each run
            writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
            writer.writeheader()
            writer.writerows(rows)

by = {(r["variant"], r["mode"], r["seed"]): float(r["dice_mean"]) for r in rows}
reference = args.variant[0][0]
for name, *_ in args.variant[1:]:
    for mode in ("probe", "finetune"):
        diffs = [by[(name, m, s)] - by[(reference, m, s)] for (v, m, s) in by if v == name and m == mode
                 and (reference, m, s) in by]
        if diffs:
            print(f"{name} minus {reference}, {mode}: mean {np.mean(diffs):+.4f} over {len(diffs)} run(s), "
                  f"per run {', '.join(f'{d:+.3f}' for d in diffs)}")
