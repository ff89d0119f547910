"""One function per command: a dataset on disk in, a run folder out.

The CLI turns options into a :class:`~pix2rep.config.RunConfig` and calls these; a script can
call them the same way (README, "Python API"). Each refuses an existing output folder before any
long work unless ``resume`` or ``overwrite`` is given, and works under torchrun (only rank 0
writes and speaks). Prediction is :func:`pix2rep.inference.predict_from_files`, the study
:func:`pix2rep.benchmark.run_study`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .benchmark import run_study  # noqa: F401 (part of this module's API)
from .checkpoints import PretrainedBackbone, load_segmentation_model
from .config import RunConfig, apply_overrides, preset_config, study_plan_config
from .data.dataset import load_patients
from .data.sampling import choose_patients, resolve_split, resolve_split_name
from .data.synthetic import write_demo_datasets
from .evaluation.evaluate import evaluate_model
from .inference import predict_from_files  # noqa: F401 (part of this module's API)
from .runs import check_run_dir, prepare_run_dir
from .speed import fit_model_size_for_run
from .training.distributed import barrier, init_from_env, rank0_first
from .training.downstream import train_segmentation
from .training.pretrain import pretrain

Log = Callable[[str], None]


def _quiet_unless_main(ctx, log: Log) -> Log:
    return log if ctx.is_main else (lambda *_: None)


def pretrain_from_files(cfg: RunConfig, data, out, *, split: str = "all", resume: bool = False, overwrite: bool = False,
                        cache=None, progress: bool = True, log: Log = print) -> dict:
    """``pix2rep pretrain``: Pix2Rep pretraining on every slice of ``data`` (``split="dev-pool"``:
    without the 20 ACDC development evaluation patients). 4D cine files add their other frames."""
    out = Path(out)
    ctx = init_from_env(cfg.device)  # torchrun: one process per rank; else a no-op
    log = _quiet_unless_main(ctx, log)
    if ctx.is_main:
        prepare_run_dir(out, resume, overwrite)
    barrier(ctx)
    cfg.data = str(Path(data).resolve()) + ("" if split == "all" else f" [{split}]")
    # rank 0 fills the preprocessing cache first; the others then read it
    patients = resolve_split(rank0_first(ctx, lambda: load_patients(data, cfg, cache, include_4d=True, log=log)),
                             split, "training", where=str(data))
    if ctx.enabled and cfg.pretrain.fit_sizes:  # ranks would measure, and might choose, differently
        log("torchrun: pretrain.fit_sizes is not measured; the model as configured")
        cfg.pretrain.fit_sizes = ()
    cfg = fit_model_size_for_run(cfg, patients, out, resume, log)
    summary = pretrain(cfg, patients, out, resume=resume, progress=progress, ctx=ctx, log=log)
    log(f"done: best validation loss {summary['best_val_loss']:.4f}; run folder {out}")
    return summary


def train_from_files(cfg: RunConfig, data, out, *, weights: Optional[PretrainedBackbone] = None, n: Optional[int] = None,
                     ids: Optional[Sequence[str]] = None, split: str = "auto", resume: bool = False, overwrite: bool = False,
                     cache=None, progress: bool = True, log: Log = print) -> Optional[dict]:
    """``pix2rep probe / finetune / train``: ``cfg.downstream.mode`` on ``n`` annotated patients
    drawn with ``cfg.downstream.seed`` (or the patients ``ids``) from ``split`` of ``data``,
    starting from ``weights`` (probe, finetune) or at random. None when ``resume`` finds the
    model finished."""
    out = Path(out)
    check_run_dir(out, resume, overwrite)
    if resume and (out / "model.pt").exists():
        log(f"{out} already holds a finished model; nothing to do")
        return None
    ctx = init_from_env(cfg.device)  # torchrun: one process per rank; else a no-op
    log = _quiet_unless_main(ctx, log)
    patients = rank0_first(ctx, lambda: load_patients(data, cfg, cache, log=log))
    split = resolve_split_name(patients, split, "training")
    patients = resolve_split(patients, split, "training", where=str(data))
    chosen = choose_patients(patients, n=n, ids=ids, seed=cfg.downstream.seed, where=f"{data} ({split} split)")
    cfg.patients, cfg.data = [p.id for p in chosen], str(Path(data).resolve()) + f" [{split}]"
    if weights is not None:
        cfg.pretrained = str(weights.path.resolve())
    if ctx.is_main:  # only now: a refused choice of patients leaves no empty run folder behind
        prepare_run_dir(out, resume, overwrite)
    barrier(ctx)
    log(f"{cfg.downstream.mode}: {len(chosen)} annotated patient(s): {', '.join(cfg.patients)}")
    _, summary = train_segmentation(
        cfg, chosen, out, backbone_state=weights.state if weights else None, progress=progress, ctx=ctx, log=log,
        pretrained_prefixes=weights.prefixes if weights else None,
        unlabeled_patients=patients if cfg.downstream.mode == "mean-teacher" else ())  # their labels unused
    log(f"done: {summary['steps']} steps in {summary['seconds']:.0f} s; model {out / 'model.pt'}")
    return summary


def evaluate_from_files(model, data, out, *, overrides: Mapping[str, Any] = {}, split: str = "auto", resume: bool = False,
                        overwrite: bool = False, cache=None, progress: bool = True, log: Log = print) -> dict:
    """``pix2rep evaluate``: 3D Dice, HD95 and clinical indices of a segmentation model (run folder
    or model.pt) on ``split`` of ``data`` (``auto``: the 20 ACDC development patients when present).
    ``overrides`` change the model's configuration (e.g. ``{"device": "cpu"}``)."""
    net, cfg, path = load_segmentation_model(model)
    cfg = apply_overrides(cfg, overrides)
    check_run_dir(out, resume, overwrite)
    patients = load_patients(data, cfg, cache, log=log)
    split = resolve_split_name(patients, split, "evaluation")
    summary = evaluate_model(net, cfg, path, resolve_split(patients, split, "evaluation", where=str(data)), data, out,
                             split=split, resume=resume, overwrite=overwrite, progress=progress, log=log)
    log(f"Dice (mean over {summary['volumes']} volumes): RV {summary['dice_RV_mean']:.3f}, "
        f"MYO {summary['dice_MYO_mean']:.3f}, LV {summary['dice_LV_mean']:.3f}, mean {summary['dice_mean_mean']:.3f}; "
        f"written to {out}")
    return summary


def demo_study(data=None) -> tuple[RunConfig, Path]:
    """``pix2rep demo``'s study and its data: the demo plan with the ``tiny`` preset on SYNTHETIC data
    (written into the cache once), or the quick plan with the ``cpu`` preset on ``data``."""
    if data is not None:
        return study_plan_config(preset_config("cpu"), "quick"), Path(data)
    pool, held_out = write_demo_datasets()
    print(f"demo on SYNTHETIC data (generated by pix2rep, not real MRI): pool {pool}, evaluation {held_out}")
    cfg = study_plan_config(preset_config("tiny"), "demo")
    cfg.study.eval_data = str(held_out)
    return cfg, pool
