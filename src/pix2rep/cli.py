"""The ``pix2rep`` command: a thin layer over the library.

Conventions, the same in every command: ``--data PATH`` is the input dataset, ``--out DIR``
the output; ``-m/--model`` takes a run folder or a checkpoint file; an existing output
folder is refused unless ``--resume`` or ``--overwrite`` is given; ``--preset`` names a model
size (paper, cpu), ``--protocol`` how the heart region is found (label-free, gt-crop).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from . import __version__
from .errors import OutputExistsError, Pix2RepError


def _add_preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", choices=("label-free", "gt-crop"), default=None,
                   help="how the heart region is found (default: label-free; gt-crop reads the labels)")
    p.add_argument("--cache", default=None, help="folder of the preprocessed-slice cache (default ~/.cache/pix2rep)")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--overwrite", action="store_true", help="delete the run in --out and start again")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pix2rep", description="Pix2Rep: dense self-supervised pixel representations and few-shot segmentation of cardiac MRI."
    )
    parser.add_argument("--version", action="version", version=f"pix2rep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="print what a dataset holds and every problem found")
    p.add_argument("path", nargs="?", default=None, help="dataset (default: the embedded SYNTHETIC dataset)")
    p = data.add_parser("preview", help="write a grid of slices with mask overlays")
    p.add_argument("path")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p = data.add_parser("roi", help="measure how often the label-free ROI contains the whole annotated heart")
    p.add_argument("path")
    p.add_argument("--fov-mm", type=float, default=None)
    p = data.add_parser("synthetic", help="write the synthetic (NOT real) short-axis cine MRI dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--patients", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("pretrain", help="Pix2Rep self-supervised pretraining (labels never used as signal)")
    p.add_argument("--data", required=True, help="dataset folder (ACDC, nnU-Net layout, NIfTI folder, DICOM)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--preset", default="cpu", help="model size: cpu (default), paper, tiny")
    p.add_argument("--config", default=None, help="a config.yaml to start from instead of a preset")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="stop after the epoch that crosses this time")
    p.add_argument("--loss", choices=("infonce", "barlow", "simclr"), default=None,
                   help="Pix2Rep (infonce), Pix2Rep-v2 (barlow), or the image-level SimCLR baseline (simclr)")
    p.add_argument("--batch-size", type=int, default=None, help="slices per step (SimCLR wants at least 32)")
    p.add_argument("--no-spatial", action="store_true", help="invariance ablation: no spatial transform between views")
    p.add_argument("--split", choices=("all", "dev-pool"), default="all",
                   help="dev-pool: leave out the 20 ACDC development evaluation patients")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true")
    _add_preprocess_args(p)
    _add_output_args(p)

    for name, help_text in (
        ("probe", "linear probing: frozen pretrained backbone, 1x1 head"),
        ("finetune", "fine-tune the whole pretrained network (separate backbone / head learning rates)"),
        ("train", "supervised baseline: the same U-Net and head from random initialisation"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--data", required=True, help="labeled dataset")
        p.add_argument("--out", required=True, help="run folder to write")
        if name == "train":
            p.add_argument("--preset", default="cpu")
            p.add_argument("--config", default=None)
            p.add_argument("--random-probe", action="store_true", help="train only a 1x1 head on a frozen random backbone (the floor)")
        else:
            p.add_argument("-m", "--model", required=True, help="pretrained run folder or checkpoint")
        if name in ("train", "finetune"):
            p.add_argument("--mean-teacher", action="store_true",
                           help="add Mean Teacher consistency on the unlabeled slices of the split's patients")
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--patients", type=int, help="number of annotated patients (stratified, nested sampler)")
        who.add_argument("--patient-ids", help="explicit comma-separated patient ids")
        p.add_argument("--seed", type=int, default=0, help="seed of the few-shot sampler and of training")
        p.add_argument("--split", choices=("auto", "dev-pool", "all"), default="auto",
                       help="where annotated patients are drawn: dev-pool leaves out the 20 ACDC evaluation patients "
                            "(auto: dev-pool when they are present)")
        p.add_argument("--steps", type=int, default=None, help="optimiser steps (the same budget for every method)")
        p.add_argument("--loss", choices=("dice", "dice-ce"), default=None)
        p.add_argument("--postprocess", choices=("none", "largest-component"), default=None,
                       help="applied by evaluate and predict (recorded in the config)")
        p.add_argument("--device", default=None)
        p.add_argument("--no-progress", action="store_true")
        _add_preprocess_args(p)
        _add_output_args(p)

    p = sub.add_parser("evaluate", help="3D Dice, HD95 and clinical indices of a segmentation model")
    p.add_argument("-m", "--model", required=True, help="segmentation run folder or model.pt")
    p.add_argument("--data", required=True, help="labeled dataset")
    p.add_argument("--out", required=True, help="folder for per_case.csv, clinical.csv, summary.json")
    p.add_argument("--split", choices=("auto", "dev-eval", "all"), default="auto",
                   help="dev-eval: the 20 ACDC development evaluation patients (auto: when present)")
    p.add_argument("--device", default=None)
    p.add_argument("--cache", default=None)
    _add_output_args(p)

    p = sub.add_parser("predict", help="segment NIfTI / DICOM volumes (label-free ROI, no labels needed)")
    p.add_argument("-i", "--input", required=True, help="a NIfTI file, a folder of NIfTI files, or a DICOM folder")
    p.add_argument("-o", "--output", required=True, help="output folder (or a .nii.gz file for a single input file)")
    p.add_argument("-m", "--model", required=True, help="segmentation run folder or model.pt")
    p.add_argument("--overlay", default=None, help="also write PNGs of the prediction over the image here")
    p.add_argument("--device", default=None)
    _add_output_args(p)

    p = sub.add_parser("benchmark", help="the label-efficiency study: Dice versus number of annotated patients")
    p.add_argument("--data", required=True, help="labeled dataset (ACDC training: the 20 development patients are held out)")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--eval-data", default=None, help="a separate labeled evaluation set (then all of --data is the pool)")
    p.add_argument("-m", "--model", default=None, help="reuse this pretrained run instead of pretraining")
    p.add_argument("--methods", default="baseline,pix2rep-lp,pix2rep-ft,random-lp")
    p.add_argument("--n", default="1,2,5,10,20", help="numbers of annotated patients")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--no-full-pool", action="store_true", help="skip the run on the whole pool (one seed)")
    p.add_argument("--steps", type=int, default=None, help="downstream optimiser steps, the same for every method")
    p.add_argument("--epochs", type=int, default=None, help="pretraining epochs")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: N in {1, 5}, seed 0, 100 steps, 5 minutes of pretraining, no full pool")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite REPORT.md, runs.csv and the plot of an existing study from the cells it holds; "
                        "train nothing (after a run was stopped, or after several runs filled one study)")
    _add_preprocess_args(p)
    _add_output_args(p)

    p = sub.add_parser("demo", help="the main job on an embedded default: a small label-efficiency study on SYNTHETIC data")
    p.add_argument("--data", default=None, help="run on this labeled dataset instead of the synthetic default")
    p.add_argument("--out", default="pix2rep-demo", help="results folder (default ./pix2rep-demo)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--cache", default=None, help="folder of the preprocessed-slice cache (default ~/.cache/pix2rep)")
    _add_output_args(p)

    p = sub.add_parser("bench", help="speed benchmark: samples/s, FLOP utilisation, time split, inference, memory")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--device", default=None)
    p.add_argument("-i", "--input", default=None, help="a NIfTI volume to time inference on (default: a random 10-slice volume)")
    p.add_argument("--out", default=None, help="JSON file to write the measurements to")
    p.add_argument("--repeats", type=int, default=8, help="timed repetitions per figure (median reported)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    p = sub.add_parser("features", help="show a model's per-pixel features (PCA to RGB) beside the image")
    p.add_argument("-i", "--input", required=True, help="a NIfTI volume")
    p.add_argument("-m", "--model", required=True, help="run folder or checkpoint file")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.add_argument("--slices", type=int, default=4)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime import keep_freed_memory

    keep_freed_memory()  # before the first large tensor: predict and evaluate benefit too
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach log files at once
    try:
        handler = {
            "data": _cmd_data,
            "pretrain": _cmd_pretrain,
            "features": _cmd_features,
            "probe": _cmd_downstream,
            "finetune": _cmd_downstream,
            "train": _cmd_downstream,
            "evaluate": _cmd_evaluate,
            "predict": _cmd_predict,
            "benchmark": _cmd_benchmark,
            "demo": _cmd_demo,
            "bench": _cmd_bench,
        }[args.command]
        return handler(args) or 0
    except Pix2RepError as exc:
        print(f"pix2rep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pix2rep: interrupted; run again with --resume to continue", file=sys.stderr)
        return 130


# -- data ------------------------------------------------------------------------------------


def _cmd_data(args) -> int:
    if args.data_command == "synthetic":
        from .data.synthetic import write_synthetic_dataset

        out = write_synthetic_dataset(args.out, n_patients=args.patients, seed=args.seed)
        print(f"wrote the SYNTHETIC dataset ({args.patients} patients, seed {args.seed}) to {out}")
        return 0
    from .data.discover import load_dataset

    if args.path is None:  # the embedded default: the synthetic dataset
        from .data.dataset import default_cache_dir
        from .data.synthetic import write_synthetic_dataset

        args.path = str(write_synthetic_dataset(default_cache_dir() / "synthetic-25-seed0", n_patients=25, seed=0))
    dataset = load_dataset(args.path, on_error="skip")
    if args.data_command == "check":
        from .data.check import describe_dataset

        print(describe_dataset(dataset))
        if _is_synthetic(args.path):
            print("note: this dataset is SYNTHETIC (generated by pix2rep), not real MRI")
        return 1 if dataset.problems else 0
    if args.data_command == "preview":
        from .data.check import write_preview

        write_preview(dataset, args.output)
        print(f"wrote {args.output}")
        return 0
    if args.data_command == "roi":
        return _roi_report(dataset, args.fov_mm)
    raise AssertionError(args.data_command)


def _is_synthetic(path) -> bool:
    from .data.synthetic import MARKER_FILE

    return (Path(path) / MARKER_FILE).is_file()


def _roi_report(dataset, fov_mm) -> int:
    """Containment of the annotated heart in the label-free ROI, single volume and with both phases."""
    from .data.preprocess import PreprocessConfig, box_contains_mask, prepare_volume

    base = PreprocessConfig() if fov_mm is None else PreprocessConfig(fov_mm=fov_mm)
    single = PreprocessConfig(**{**base.__dict__, "use_phase_difference": False})
    counts = {"single volume": [0, 0], "with the other phase": [0, 0]}
    misses = []
    for p in dataset.patients:
        vols = list(p.volumes.values())
        for v in vols:
            if v.mask is None or not v.mask.any():
                continue
            other = next((o for o in vols if o is not v), None)
            for name, cfg, oth in (("single volume", single, None), ("with the other phase", base, other)):
                pv = prepare_volume(v, cfg, other_phase=oth)
                ok = box_contains_mask(pv.box, v.mask)
                counts[name][0] += ok
                counts[name][1] += 1
                if not ok:
                    misses.append(f"{name}: {v.source}")
    if not counts["single volume"][1]:
        raise Pix2RepError(f"{dataset.root}: no labeled volumes: containment needs ground truth")
    print(f"label-free ROI: {base.fov_mm:g} mm field of view, {base.size} px")
    for name, (ok, n) in counts.items():
        print(f"  {name}: whole heart inside the ROI in {ok}/{n} volumes ({100 * ok / n:.1f} %)")
    for m in misses:
        print(f"  missed ({m})")
    return 0


# -- pretraining -------------------------------------------------------------------------------


def _resolve_config(args, preset_default="cpu"):
    from .config import RunConfig, preset_config

    cfg = RunConfig.load(args.config) if getattr(args, "config", None) else preset_config(args.preset or preset_default)
    if getattr(args, "protocol", None):
        cfg.preprocess.protocol = args.protocol
    if getattr(args, "device", None):
        cfg.device = args.device
    return cfg


def _load_patients(path, cfg, cache, split: str = "all", include_4d: bool = False):
    from .data.dataset import prepare_dataset
    from .data.sampling import split_development

    t0 = time.time()
    patients = prepare_dataset(path, cfg.preprocess, cache_dir=cache, include_4d=include_4d)
    if split == "dev-pool":
        patients, held_out = split_development(patients)
        if not held_out:
            raise Pix2RepError(f"{path}: --split dev-pool needs the ACDC training patients; none of the 20 evaluation ids is here")
    print(f"{len(patients)} patients ready in {time.time() - t0:.1f} s ({cfg.preprocess.protocol} protocol)")
    return patients


def _cmd_pretrain(args) -> int:
    from .runs import prepare_run_dir
    from .training.pretrain import pretrain

    from .training.distributed import barrier, init_from_env, rank0_first

    cfg = _resolve_config(args)
    ctx = init_from_env(cfg.device)  # torchrun: one process per rank; else a no-op
    if ctx.is_main:
        out = prepare_run_dir(args.out, args.resume, args.overwrite)
    barrier(ctx)
    out = Path(args.out)
    if args.resume and (out / "config.yaml").exists() and not args.config:
        from .config import RunConfig

        cfg = RunConfig.load(out / "config.yaml")  # continue exactly the run that was started
    for key, value in (("epochs", args.epochs), ("max_minutes", args.max_minutes), ("loss", args.loss), ("seed", args.seed),
                       ("batch_size", args.batch_size)):
        if value is not None:
            setattr(cfg.pretrain, key, value)
    if args.no_spatial:
        cfg.spatial.enabled = False
    cfg.data = str(Path(args.data).resolve()) + ("" if args.split == "all" else f" [{args.split}]")
    # 4D cine files, where present, add their other frames as unlabeled pretraining slices
    # rank 0 fills the preprocessing cache first; the others then read it
    patients = rank0_first(ctx, lambda: _load_patients(args.data, cfg, args.cache, args.split, include_4d=True))
    summary = pretrain(cfg, patients, out, resume=args.resume, progress=not args.no_progress, ctx=ctx)
    if ctx.is_main:
        print(f"done: best validation loss {summary['best_val_loss']:.4f}; run folder {out}")
    return 0


def _has_dev_ids(patients) -> bool:
    from .data.sampling import ACDC_DEV_EVAL_IDS

    ids = {p.id for p in patients}
    return all(i in ids for i in ACDC_DEV_EVAL_IDS)


def _cmd_downstream(args) -> int:
    from .config import RunConfig
    from .data.sampling import sample_few_shot_patients, split_development
    from .checkpoints import load_checkpoint
    from .runs import prepare_run_dir
    from .training.downstream import train_segmentation

    backbone_state = None
    if args.command == "train":
        cfg = _resolve_config(args)
        cfg.downstream.mode = "random-probe" if args.random_probe else "scratch"
        prefixes = None
    else:
        payload, path = load_checkpoint(args.model)
        if "backbone" not in payload:
            raise Pix2RepError(f"{path}: holds no backbone weights")
        cfg = RunConfig.from_dict(payload["config"])  # same architecture and preprocessing as pretraining
        backbone_state = payload["backbone"]
        prefixes = payload.get("pretrained_prefixes", [""])
        cfg.pretrained = str(path.resolve())
        cfg.downstream.mode = args.command
        if args.protocol:
            cfg.preprocess.protocol = args.protocol
        if args.device:
            cfg.device = args.device
    if getattr(args, "mean_teacher", False):
        cfg.downstream.mode = "mean-teacher"
    if args.steps is not None:
        cfg.downstream.steps = args.steps
    if args.loss:
        cfg.downstream.loss = args.loss
    if args.postprocess:
        cfg.downstream.postprocess = args.postprocess
    cfg.downstream.seed = args.seed
    from .training.distributed import barrier, init_from_env, rank0_first

    ctx = init_from_env(cfg.device)  # torchrun: one process per rank; else a no-op
    if ctx.is_main:
        prepare_run_dir(args.out, args.resume, args.overwrite)
    barrier(ctx)
    out = Path(args.out)
    if args.resume and (out / "model.pt").exists():
        print(f"{out} already holds a finished model; nothing to do")
        return 0
    patients = rank0_first(ctx, lambda: _load_patients(args.data, cfg, args.cache))
    split = args.split
    if split == "auto":
        split = "dev-pool" if _has_dev_ids(patients) else "all"
    if split == "dev-pool":
        patients, _ = split_development(patients)
    unlabeled = patients if cfg.downstream.mode == "mean-teacher" else []  # labels unused
    patients = [p for p in patients if any(v.masks is not None for v in p.volumes)]
    if args.patient_ids:
        wanted = [s.strip() for s in args.patient_ids.split(",") if s.strip()]
        by_id = {p.id: p for p in patients}
        missing = [w for w in wanted if w not in by_id]
        if missing:
            raise Pix2RepError(f"{args.data}: no labeled patient(s) {missing} (in the {split} split)")
        chosen = [by_id[w] for w in wanted]
    else:
        chosen = sample_few_shot_patients(patients, args.patients, args.seed)
    cfg.patients = [p.id for p in chosen]
    cfg.data = str(Path(args.data).resolve()) + f" [{split}]"
    print(f"{cfg.downstream.mode}: {len(chosen)} annotated patient(s): {', '.join(cfg.patients)}")
    _, summary = train_segmentation(cfg, chosen, out, backbone_state=backbone_state, progress=not args.no_progress, ctx=ctx,
                                    pretrained_prefixes=prefixes, unlabeled_patients=unlabeled)
    if ctx.is_main:
        print(f"done: {summary['steps']} steps in {summary['seconds']:.0f} s; model {out / 'model.pt'}")
    return 0


def _cmd_evaluate(args) -> int:
    from .data.sampling import split_development
    from .evaluation.evaluate import evaluate_patients, summarise
    from .evaluation.report import write_evaluation
    from .inference import load_segmentation_model
    from .runs import prepare_run_dir
    from .runtime import resolve_device

    model, cfg, path = load_segmentation_model(args.model)
    device = resolve_device(args.device or cfg.device)
    model.to(device)
    out = prepare_run_dir(args.out, args.resume, args.overwrite)
    patients = _load_patients(args.data, cfg, args.cache)
    split = args.split
    if split == "auto":
        split = "dev-eval" if _has_dev_ids(patients) else "all"
    if split == "dev-eval":
        _, patients = split_development(patients)
    overlap = set(cfg.patients) & {p.id for p in patients}
    if overlap:
        print(f"warning: {len(overlap)} evaluation patient(s) were used to train this model: {sorted(overlap)}")
    rows, clinical_rows, _ = evaluate_patients(model, patients, device, cfg.bf16, postprocess=cfg.downstream.postprocess)
    if not rows:
        raise Pix2RepError(f"{args.data}: no labeled volumes to evaluate")
    summary = summarise(rows, clinical_rows)
    summary.update({"model": str(path), "data": str(Path(args.data).resolve()), "split": split})
    write_evaluation(out, rows, clinical_rows, summary, cfg)
    print(f"Dice (mean over {len(rows)} volumes): RV {summary['dice_RV_mean']:.3f}, MYO {summary['dice_MYO_mean']:.3f}, "
          f"LV {summary['dice_LV_mean']:.3f}, mean {summary['dice_mean_mean']:.3f}; written to {out}")
    return 0


def _cmd_predict(args) -> int:
    import dataclasses
    import json
    import re

    from .data.nifti import is_nifti_path
    from .data.preprocess import prepare_volume
    from .inference import list_input_volumes, load_segmentation_model, predict_prepared, write_label_nifti
    from .atomic import atomic_write_bytes
    from .runtime import resolve_device
    from .provenance import versions

    model, cfg, model_path = load_segmentation_model(args.model)
    device = resolve_device(args.device or cfg.device)
    model.to(device)
    pre_cfg = cfg.preprocess
    if pre_cfg.protocol != "label-free":
        print(f"note: the model was trained with the {pre_cfg.protocol} protocol; prediction uses the label-free ROI")
        pre_cfg = dataclasses.replace(pre_cfg, protocol="label-free")
    src = Path(args.input)
    inputs = list_input_volumes(src)
    single = src.is_file() and is_nifti_path(args.output)
    out_dir = Path(args.output).parent if single else Path(args.output)
    input_files = {src.resolve()} if src.is_file() else {p.resolve() for p in src.rglob("*") if p.is_file()}
    if not single:
        if src.is_dir() and out_dir.resolve() == src.resolve():
            raise Pix2RepError(f"{out_dir}: the output folder is the input folder; refusing to write among the inputs")
        if out_dir.exists() and any(out_dir.iterdir()) and not (args.resume or args.overwrite):
            raise Pix2RepError(f"{out_dir}: already exists; pass --resume to skip finished volumes or --overwrite to redo them")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.overlay:
        Path(args.overlay).mkdir(parents=True, exist_ok=True)
    written = 0
    for name, load in inputs:
        volumes = load()  # one input at a time: memory stays bounded on large folders
        for k, volume in enumerate(volumes):
            stem = name if len(volumes) == 1 else f"{name}_{re.sub(r'[^A-Za-z0-9.=-]+', '_', volume.phase or str(k))}"
            out_path = Path(args.output) if single else out_dir / f"{stem}.nii.gz"
            if out_path.resolve() in input_files:
                raise Pix2RepError(f"{out_path}: is one of the inputs; refusing to overwrite it")
            if out_path.exists() and not args.overwrite:
                if args.resume:
                    continue
                raise Pix2RepError(f"{out_path}: already exists; pass --overwrite to replace it")
            t0 = time.time()
            prepared = prepare_volume(volume, pre_cfg)
            labels = predict_prepared(model, prepared, device, cfg.bf16, cfg.downstream.postprocess)
            write_label_nifti(volume.to_native(labels), volume, out_path)
            sidecar = {
                "input": volume.source,
                "phase": volume.phase,
                "model": str(model_path.resolve()),
                "config": cfg.to_dict(),
                "versions": versions(),
                "roi_box_canonical": list(prepared.box),
                "labels": {"0": "background", "1": "RV", "2": "MYO", "3": "LV"},
                "seconds": round(time.time() - t0, 3),
                "note": "research use only, not for clinical use",
            }
            atomic_write_bytes(out_path.with_name(out_path.name.replace(".nii.gz", "").replace(".nii", "") + ".json"),
                               json.dumps(sidecar, indent=2).encode())
            if args.overlay:
                from .evaluation.overlay import write_overlay

                write_overlay(volume.image, labels, Path(args.overlay) / f"{stem}.png", title=f"{stem} (prediction)")
            written += 1
            print(f"{out_path}  ({time.time() - t0:.2f} s)")
    print(f"wrote {written} segmentation(s) to {out_dir}")
    return 0


def _cmd_benchmark(args) -> int:
    import json

    from .provenance import log_invocation, machine_meta
    from .benchmark import (
        METHODS,
        PRETRAININGS,
        cell_name,
        load_cells,


        pretraining_config,
        run_cell,
        write_report,
    )
    from .config import RunConfig
    from .data.sampling import split_development
    from .atomic import atomic_write_bytes
    from .checkpoints import load_checkpoint
    from .runs import prepare_run_dir
    from .runtime import resolve_device
    from .training.pretrain import pretrain

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise Pix2RepError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    if args.quick:
        args.n, args.seeds, args.no_full_pool = "1,5", "0", True
        args.steps = args.steps or 100
    ns = [int(x) for x in args.n.split(",") if x.strip()]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if args.report_only and args.overwrite:
        raise Pix2RepError("--report-only rewrites the report of an existing study; it cannot take --overwrite")
    out = prepare_run_dir(args.out, args.resume or args.report_only, args.overwrite)
    log_invocation(out)
    cfg = _resolve_config(args)
    if args.quick:
        cfg.pretrain.max_minutes = 5.0
    backbones: dict = {}  # pretraining kind -> (backbone state, pretrained name prefixes)
    if args.model:  # stands for the Pix2Rep pretraining
        payload, path = load_checkpoint(args.model)
        pre_cfg = RunConfig.from_dict(payload["config"])
        cfg.model, cfg.preprocess = pre_cfg.model, pre_cfg.preprocess
        backbones["pix2rep"] = (payload["backbone"], payload.get("pretrained_prefixes", [""]))
        cfg.pretrained = str(path.resolve())
    if args.steps is not None:
        cfg.downstream.steps = args.steps
    if args.epochs is not None:
        cfg.pretrain.epochs = args.epochs
    t_start = time.time()
    stage_seconds = {}
    patients = _load_patients(args.data, cfg, args.cache)
    if args.eval_data:
        pool, evaluation = patients, _load_patients(args.eval_data, cfg, args.cache)
        eval_desc = f"`{args.eval_data}` ({len(evaluation)} patients)"
    else:
        pool, evaluation = split_development(patients)
        if not evaluation:
            raise Pix2RepError(f"{args.data}: not the ACDC training set (no development patients); pass --eval-data")
        eval_desc = "the 20 held-out ACDC development patients (ED and ES)"
    stage_seconds["data preparation (this invocation)"] = time.time() - t_start
    cfg.data = str(Path(args.data).resolve())
    cfg.save(out / "config.yaml")
    cells_dir = out / "cells"
    cells_dir.mkdir(exist_ok=True)
    grid = [(m, n, s) for n in ns for s in seeds for m in methods if n <= len(pool)]
    if not args.no_full_pool and len(pool) not in ns:
        grid += [(m, len(pool), seeds[0]) for m in methods]
    # Methods run grouped by the pretraining they start from, each pretraining just before its
    # first missing cell: an interrupted study keeps whole methods, and a resume whose cells all
    # exist pretrains nothing.
    grid.sort(key=lambda cell: -1 if METHODS[cell[0]][1] is None else list(PRETRAININGS).index(METHODS[cell[0]][1]))

    def pretrain_for_study(kind: str) -> tuple[dict, list[str]]:
        t0 = time.time()
        pre_dir = out / PRETRAININGS[kind][0]
        pre_dir.mkdir(exist_ok=True)
        print(f"pretraining: {kind} -> {pre_dir}")
        # pretrain() itself knows when a resumed run has nothing left to do (epochs or time spent)
        pretrain(pretraining_config(cfg, kind), pool, pre_dir, resume=(pre_dir / "last.pt").exists(),
                 progress=not args.no_progress)
        payload, _ = load_checkpoint(pre_dir / "best.pt")
        stage_seconds[f"pretraining {kind} (this invocation)"] = time.time() - t0
        return payload["backbone"], payload.get("pretrained_prefixes", [""])

    # --report-only trains nothing, so it runs anywhere: a GPU study's report can be rebuilt on a laptop
    device = None if args.report_only else resolve_device(cfg.device)
    meta = {**machine_meta(device), "data": cfg.data, "evaluation": eval_desc, "protocol": cfg.preprocess.protocol,
            "preset": cfg.preset, "pool_size": len(pool), "planned_seeds": Counter((m, n) for m, n, _ in grid),
            "budget": f"{cfg.downstream.steps} optimiser steps of batch {cfg.downstream.batch_size} for every method, "
                      f"rule {cfg.downstream.stopping}, loss {cfg.downstream.loss}"}
    synthetic = _is_synthetic(args.data)
    grid_seconds = 0.0
    for i, (m, n, s) in enumerate(grid, 1):
        cell_file = cells_dir / f"{cell_name(m, n, s)}.json"
        if cell_file.exists() or args.report_only:
            continue
        kind = METHODS[m][1]
        if kind is not None and kind not in backbones:
            backbones[kind] = pretrain_for_study(kind)
        t0 = time.time()
        cell = run_cell(cfg, m, n, s, pool, evaluation, backbones, progress=not args.no_progress)
        cell.update({key: meta[key] for key in ("machine", "torch", "commit")})  # where it ran, for the report
        atomic_write_bytes(cell_file, json.dumps(cell).encode())
        print(f"[{i}/{len(grid)}] {cell_name(m, n, s)}: Dice {np.mean([r['dice_mean'] for r in cell['rows']]):.3f} "
              f"({cell['train_seconds']:.0f} s training)")
        grid_seconds += time.time() - t0
        stage_seconds["downstream grid (this invocation)"] = grid_seconds
        write_report(out, load_cells(cells_dir), {**meta, "stage_seconds": stage_seconds}, synthetic)
    stage_seconds["downstream grid (this invocation)"] = grid_seconds
    summary = write_report(out, load_cells(cells_dir), {**meta, "stage_seconds": stage_seconds}, synthetic)
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2, default=str).encode())
    print(f"report: {out / 'REPORT.md'}")
    return 0


def _cmd_demo(args) -> int:
    """A small label-efficiency study: on SYNTHETIC data by default, or on ``--data`` (then ``--quick``)."""
    if args.data is None:
        from .data.dataset import default_cache_dir
        from .data.synthetic import write_synthetic_dataset

        root = default_cache_dir() / "demo"
        pool = write_synthetic_dataset(root / "synthetic-pool-20-seed0", n_patients=20, seed=0)
        held_out = write_synthetic_dataset(root / "synthetic-eval-8-seed1", n_patients=8, seed=1)
        print(f"demo on SYNTHETIC data (generated by pix2rep, not real MRI): pool {pool}, evaluation {held_out}")
        argv = ["benchmark", "--data", str(pool), "--eval-data", str(held_out), "--preset", "tiny",
                "--n", "1,2,5", "--seeds", "0,1", "--no-full-pool", "--steps", "150", "--epochs", "10"]
    else:
        argv = ["benchmark", "--data", args.data, "--quick"]
    argv += ["--out", args.out] + ["--resume"] * args.resume + ["--overwrite"] * args.overwrite
    argv += ["--no-progress"] * args.no_progress
    argv += ["--device", args.device] if args.device else []
    argv += ["--cache", args.cache] if args.cache else []
    return _cmd_benchmark(build_parser().parse_args(argv))


def _cmd_bench(args) -> int:
    from .speed import format_table, measure, write_json

    if args.out and Path(args.out).exists() and not args.overwrite:
        raise OutputExistsError(f"{args.out}: already exists; pass --overwrite to replace it")
    cfg = _resolve_config(args)
    result = measure(cfg, repeats=args.repeats, volume_path=Path(args.input) if args.input else None)
    print(format_table(result))
    if args.out:
        write_json(result, Path(args.out))
        print(f"wrote {args.out}")
    return 0


def _cmd_features(args) -> int:
    from .evaluation.features import write_feature_pca

    write_feature_pca(args.input, args.model, args.output, n_slices=args.slices)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
