"""The ``pix2rep`` command: parse, call the library, print. Nothing else lives here.

Conventions, the same in every command: ``--data PATH`` is the input dataset, ``--out DIR``
the output; ``-m/--model`` takes a run folder or a checkpoint file; an existing output is
refused unless ``--resume`` or ``--overwrite`` is given; ``--preset`` names a model size
(paper, cpu, tiny), ``--protocol`` how the heart region is found (label-free, gt-crop).
Options that change a setting have the setting's dotted name as their ``dest`` and reach the
configuration through :func:`~pix2rep.config.apply_overrides` alone (``--set KEY=VALUE`` reaches
any other); errors are one line and exit code 2; Ctrl-C or SIGTERM stops within seconds and
prints the command that continues the run.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
from pathlib import Path

from . import __version__
from .errors import Pix2RepError


def _csv(kind):
    return lambda text: tuple(kind(x.strip()) for x in text.split(",") if x.strip())


def _common(p, *, data=True, out=True, preset=False, settings=True, protocol=True, outputs=True, progress=True):
    """The options every command of this kind shares, declared once."""
    if data:
        p.add_argument("--data", required=True, help="dataset folder (ACDC, nnU-Net layout, NIfTI folder, DICOM)")
    if out:
        p.add_argument("--out", required=True, help="run folder to write")
    if preset:
        p.add_argument("--preset", default=None, help="model size: cpu (default), paper, tiny")
        p.add_argument("--config", default=None, help="a config.yaml to start from instead of a preset (rerun a run)")
    if settings:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any setting of config.yaml, e.g. --set downstream.lr_head=0.005 (repeatable)")
    if protocol:
        p.add_argument("--protocol", dest="preprocess.protocol", choices=("label-free", "gt-crop"), default=None,
                       help="how the heart region is found (default: label-free; gt-crop reads the labels)")
        p.add_argument("--cache", default=None, help="folder of the preprocessed-slice cache (default ~/.cache/pix2rep)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bars (they are off when not on a terminal)")
    if outputs:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--resume", action="store_true", help="continue the run in --out")
        g.add_argument("--overwrite", action="store_true", help="replace what is in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pix2rep", description="Pix2Rep: dense self-supervised pixel representations and few-shot segmentation of cardiac MRI.")
    parser.add_argument("--version", action="version", version=f"pix2rep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="print what a dataset holds and every problem found")
    p.add_argument("path", nargs="?", default=None, help="dataset (default: the embedded SYNTHETIC dataset)")
    p = data.add_parser("preview", help="write a grid of slices with mask overlays")
    p.add_argument("path")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p = data.add_parser("roi", help="measure how often the label-free ROI contains the whole annotated heart")
    p.add_argument("path")
    p.add_argument("--fov-mm", type=float, default=None)
    p.add_argument("--no-progress", action="store_true")
    p = data.add_parser("synthetic", help="write the synthetic (NOT real) short-axis cine MRI dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--patients", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing synthetic dataset in --out")

    p = sub.add_parser("pretrain", help="Pix2Rep self-supervised pretraining (labels never used as signal)")
    _common(p, preset=True)
    p.add_argument("--epochs", dest="pretrain.epochs", type=int, default=None)
    p.add_argument("--max-minutes", dest="pretrain.max_minutes", type=float, default=None,
                   help="stop after the epoch that crosses this time")
    p.add_argument("--loss", dest="pretrain.loss", choices=("infonce", "barlow", "simclr"), default=None,
                   help="Pix2Rep (infonce), Pix2Rep-v2 (barlow), or the image-level SimCLR baseline (simclr)")
    p.add_argument("--batch-size", dest="pretrain.batch_size", type=int, default=None, help="slices per step (SimCLR wants 32+)")
    p.add_argument("--no-spatial", dest="spatial.enabled", action="store_const", const=False, default=None,
                   help="invariance ablation: no spatial transform between views")
    p.add_argument("--seed", dest="pretrain.seed", type=int, default=None)
    p.add_argument("--split", choices=("all", "dev-pool"), default="all",
                   help="dev-pool: leave out the 20 ACDC development evaluation patients")

    for name, help_text in (("probe", "linear probing: frozen pretrained backbone, 1x1 head"),
                            ("finetune", "fine-tune the whole pretrained network (separate backbone / head rates)"),
                            ("train", "supervised baseline: the same U-Net and head from random initialisation")):
        p = sub.add_parser(name, help=help_text)
        _common(p, preset=name == "train")
        if name == "train":
            p.add_argument("--random-probe", dest="downstream.mode", action="store_const", const="random-probe",
                           help="train only a 1x1 head on a frozen random backbone (the floor)")
        else:
            p.add_argument("-m", "--model", required=True, help="pretrained run folder, checkpoint or shipped model name (pix2rep models)")
        if name != "probe":
            p.add_argument("--mean-teacher", dest="downstream.mode", action="store_const", const="mean-teacher",
                           help="add Mean Teacher consistency on the unlabeled slices of the split's patients")
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--patients", type=int, help="number of annotated patients (stratified, nested sampler)")
        who.add_argument("--patient-ids", type=_csv(str), help="explicit comma-separated patient ids")
        p.add_argument("--seed", dest="downstream.seed", type=int, default=0, help="seed of the few-shot sampler and of training")
        p.add_argument("--split", choices=("auto", "dev-pool", "all"), default="auto",
                       help="where annotated patients are drawn: dev-pool leaves out the 20 ACDC evaluation patients "
                            "(auto: dev-pool when they are present)")
        p.add_argument("--steps", dest="downstream.steps", type=int, default=None, help="optimiser steps (the same budget for every method)")
        p.add_argument("--lr-schedule", dest="downstream.lr_schedule", choices=("constant", "cosine"), default=None,
                       help="learning rates constant (default) or decayed to 0 by a cosine over the steps")
        p.add_argument("--loss", dest="downstream.loss", choices=("dice", "dice-ce"), default=None)
        p.add_argument("--postprocess", dest="downstream.postprocess", choices=("none", "largest-component"), default=None,
                       help="applied by evaluate and predict (recorded in the config)")

    p = sub.add_parser("evaluate", help="3D Dice, HD95 and clinical indices of a segmentation model")
    p.add_argument("-m", "--model", required=True, help="segmentation run folder, model.pt or shipped model name")
    _common(p, protocol=False)
    p.add_argument("--cache", default=None)
    p.add_argument("--split", choices=("auto", "dev-eval", "all"), default="auto",
                   help="dev-eval: the 20 ACDC development evaluation patients (auto: when present)")

    p = sub.add_parser("predict", help="segment NIfTI / DICOM volumes (label-free ROI, no labels needed)")
    p.add_argument("-i", "--input", required=True, help="a NIfTI file, a folder of NIfTI files, or a DICOM folder")
    p.add_argument("-o", "--output", required=True, help="output folder (or a .nii.gz file for a single input file)")
    p.add_argument("-m", "--model", required=True, help="segmentation run folder, model.pt or shipped model name")
    p.add_argument("--overlay", default=None, help="also write PNGs of the prediction over the image here")
    _common(p, data=False, out=False, settings=False, protocol=False)

    p = sub.add_parser("benchmark", help="the label-efficiency study: Dice versus number of annotated patients")
    _common(p, preset=True)
    p.add_argument("--eval-data", dest="study.eval_data", default=None,
                   help="a separate labeled evaluation set (then all of --data is the pool)")
    p.add_argument("-m", "--model", default=None, help="reuse this pretrained run (or shipped backbone) instead of pretraining")
    p.add_argument("--methods", dest="study.methods", type=_csv(str), default=None, help="comma-separated method names")
    p.add_argument("--n", dest="study.n", type=_csv(int), default=None, help="numbers of annotated patients, e.g. 1,2,5")
    p.add_argument("--seeds", dest="study.seeds", type=_csv(int), default=None)
    p.add_argument("--no-full-pool", dest="study.full_pool", action="store_const", const=False, default=None,
                   help="skip the run on the whole pool (one seed)")
    p.add_argument("--steps", dest="downstream.steps", type=int, default=None, help="downstream optimiser steps, for every method")
    p.add_argument("--epochs", dest="pretrain.epochs", type=int, default=None, help="pretraining epochs")
    p.add_argument("--quick", dest="plan", action="store_const", const="quick", default="full",
                   help="the quick plan: N in {1, 5}, seed 0, 100 steps, 5 minutes of pretraining, no full pool")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite REPORT.md, runs.csv and the plot from the cells there; train nothing")

    p = sub.add_parser("demo", help="the main job on an embedded default: a small label-efficiency study on SYNTHETIC data")
    p.add_argument("--data", default=None, help="run the quick plan on this labeled dataset instead of the synthetic default")
    p.add_argument("--out", default="pix2rep-demo", help="results folder (default ./pix2rep-demo)")
    _common(p, data=False, out=False, protocol=False)
    p.add_argument("--cache", default=None, help="folder of the preprocessed-slice cache (default ~/.cache/pix2rep)")

    p = sub.add_parser("bench", help="speed benchmark: samples/s, FLOP utilisation, time split, inference, memory")
    p.add_argument("--preset", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("-i", "--input", default=None, help="a NIfTI volume to time inference on (default: a random 10-slice volume)")
    p.add_argument("--out", default=None, help="JSON file to write the measurements to")
    p.add_argument("--repeats", type=int, default=8, help="timed repetitions per figure (median reported)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _common(p, data=False, out=False, protocol=False, outputs=False, progress=False)

    sub.add_parser("models", help="list the models shipped with pix2rep (usable by name in every -m/--model)")

    p = sub.add_parser("features", help="show a model's per-pixel features (PCA to RGB) beside the image")
    p.add_argument("-i", "--input", required=True, help="a NIfTI volume")
    p.add_argument("-m", "--model", required=True, help="run folder, checkpoint file or shipped model name")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.add_argument("--slices", type=int, default=4)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def overrides(args) -> dict:
    """The settings the options name (their ``dest`` is the setting's dotted key), then ``--set``."""
    from .config import parse_assignment

    given = {k: v for k, v in vars(args).items() if "." in k or k == "device"}
    return {**given, **dict(parse_assignment(s) for s in getattr(args, "set", []))}


def configure(args, base=None):
    """The run's configuration: ``base`` (else ``--config``, else the preset), then :func:`overrides`.
    The one place where options become settings."""
    from .config import RunConfig, apply_overrides, preset_config

    if base is None:
        base = RunConfig.load(args.config) if getattr(args, "config", None) else preset_config(getattr(args, "preset", None) or "cpu")
    return apply_overrides(base, overrides(args))


def _progress(args) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from .runtime import keep_freed_memory

    keep_freed_memory()  # before the first large tensor: predict and evaluate benefit too
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach log files at once
    try:
        with stop_on_signals():
            try:
                code = COMMANDS[args.command](args) or 0
                if "torch.distributed" in sys.modules:  # else no process group, and no torch import
                    from .training.distributed import leave_process_group

                    leave_process_group()
                return code
            except Exception as exc:
                # An interrupt that lands inside a C extension's import (matplotlib's, say) comes
                # back as that import's error, with the KeyboardInterrupt as its cause: still a stop.
                if _caused_by_interrupt(exc):
                    raise KeyboardInterrupt from exc
                raise
    except Pix2RepError as exc:
        print(f"pix2rep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pix2rep: interrupted; finished work and the last complete checkpoint are kept", file=sys.stderr)
        if hasattr(args, "resume"):
            print(f"to continue: {resume_command(argv)}", file=sys.stderr)
        return 130


STOP_REPEAT_SECONDS = 2.0


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and Ctrl-C raise KeyboardInterrupt, which stops a run cleanly and resumably.

    Ctrl-C is (re)installed too: a process started in the background of a non-interactive shell
    inherits SIGINT ignored. A KeyboardInterrupt raised while Python runs a finalizer (a
    ``__del__`` or weakref callback, e.g. matplotlib's) is printed as "Exception ignored" and
    lost, and the run would go on; so after a stop signal the interrupt is raised again every
    ``STOP_REPEAT_SECONDS`` until it leaves this block. On leaving, the repetition stops and the
    previous handlers come back.
    """
    repeat = hasattr(signal, "setitimer")  # not on Windows
    previous = {}

    def stop(signum, frame):
        if repeat and signal.SIGALRM not in previous:
            previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, stop)
            signal.setitimer(signal.ITIMER_REAL, STOP_REPEAT_SECONDS, STOP_REPEAT_SECONDS)
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        if signal.SIGALRM in previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among the causes or contexts of ``exc``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted one: the same options, --resume instead of --overwrite."""
    kept = [a for a in argv if a != "--overwrite"]
    return shlex.join(["pix2rep", *kept, *(["--resume"] if "--resume" not in kept else [])])


# -- commands ----------------------------------------------------------------------------------


def _cmd_data(args) -> int:
    from .data import check, discover, synthetic

    if args.data_command == "synthetic":
        out = synthetic.write_synthetic_dataset(args.out, n_patients=args.patients, seed=args.seed, overwrite=args.overwrite,
                                                replace_other_synthetic=False)
        print(f"wrote the SYNTHETIC dataset ({args.patients} patients, seed {args.seed}) to {out}")
        return 0
    path = args.path or synthetic.default_synthetic_dataset()  # the embedded default
    dataset = discover.load_dataset(path, on_error="skip")
    if args.data_command == "check":
        print(check.describe_dataset(dataset))
        if synthetic.is_synthetic_dataset(path):
            print("note: this dataset is SYNTHETIC (generated by pix2rep), not real MRI")
        return 1 if dataset.problems else 0
    if args.data_command == "preview":
        check.write_preview(dataset, args.output, overwrite=args.overwrite)
        print(f"wrote {args.output}")
        return 0
    print(check.format_roi_containment(check.roi_containment(dataset, args.fov_mm, progress=_progress(args))))
    return 0


def _cmd_pretrain(args) -> int:
    from .config import RunConfig
    from .workflows import pretrain_from_files

    resumed = args.resume and (Path(args.out) / "config.yaml").exists() and not args.config
    cfg = configure(args, RunConfig.load(Path(args.out) / "config.yaml") if resumed else None)  # a resume continues its run
    pretrain_from_files(cfg, args.data, args.out, split=args.split, resume=args.resume, overwrite=args.overwrite,
                        cache=args.cache, progress=_progress(args))
    return 0


def _cmd_downstream(args) -> int:
    from .checkpoints import load_pretrained_backbone_weights
    from .workflows import train_from_files

    weights = None if args.command == "train" else load_pretrained_backbone_weights(args.model)
    if weights is None:
        cfg = configure(args)
        if cfg.downstream.mode not in ("random-probe", "mean-teacher"):
            cfg.downstream.mode = "scratch"
    else:  # the architecture and preprocessing of pretraining
        weights.config.downstream.mode = args.command
        cfg = configure(args, weights.config)
    train_from_files(cfg, args.data, args.out, weights=weights, n=args.patients, ids=args.patient_ids, split=args.split,
                     resume=args.resume, overwrite=args.overwrite, cache=args.cache, progress=_progress(args))
    return 0


def _cmd_evaluate(args) -> int:
    from .workflows import evaluate_from_files

    evaluate_from_files(args.model, args.data, args.out, overrides=overrides(args), split=args.split, resume=args.resume,
                        overwrite=args.overwrite, cache=args.cache, progress=_progress(args))
    return 0


def _cmd_predict(args) -> int:
    from .inference import predict_from_files

    predict_from_files(args.model, args.input, args.output, device=args.device, resume=args.resume,
                       overwrite=args.overwrite, overlay=args.overlay, progress=_progress(args))
    return 0


def _cmd_benchmark(args) -> int:
    from .benchmark import run_study
    from .config import study_plan_config

    cfg = configure(args, study_plan_config(configure(args), args.plan))  # options win over the plan
    report = run_study(cfg, args.data, args.out, model=args.model, resume=args.resume, overwrite=args.overwrite,
                       report_only=args.report_only, cache=args.cache, progress=_progress(args))
    print(f"report: {report}")
    return 0


def _cmd_demo(args) -> int:
    from .benchmark import run_study
    from .workflows import demo_study

    cfg, data = demo_study(args.data)
    report = run_study(configure(args, cfg), data, args.out, resume=args.resume, overwrite=args.overwrite, cache=args.cache,
                       progress=_progress(args))
    print(f"report: {report}")
    return 0


def _cmd_bench(args) -> int:
    from .runs import check_output_file
    from .speed import format_table, measure, write_json

    if args.out:
        check_output_file(args.out, args.overwrite)
    result = measure(configure(args), repeats=args.repeats, volume_path=Path(args.input) if args.input else None)
    print(format_table(result))
    if args.out:
        write_json(result, Path(args.out))
        print(f"wrote {args.out}")
    return 0


def _cmd_features(args) -> int:
    from .evaluation.features import write_feature_pca

    write_feature_pca(args.input, args.model, args.output, n_slices=args.slices, overwrite=args.overwrite)
    print(f"wrote {args.output}")
    return 0


def _cmd_models(args) -> int:
    from .shipped import shipped_models

    models = shipped_models()
    if not models:
        print("no shipped models in this installation")
        return 0
    for m in models:
        size = f"{m.path.stat().st_size / 1e6:.1f} MB" if m.path.is_file() else "file missing"
        print(f"{m.name}  ({m.kind}, preset {m.preset}, {m.protocol} protocol, {size})\n"
              f"  {m.description}\n  trained on: {m.training_data}\n  made by: {m.command} (commit {m.commit})")
    print("use a name wherever -m/--model is accepted; MODEL_CARD.md describes each model")
    return 0


COMMANDS = {"data": _cmd_data, "models": _cmd_models, "pretrain": _cmd_pretrain, "features": _cmd_features, "probe": _cmd_downstream,
            "finetune": _cmd_downstream, "train": _cmd_downstream, "evaluate": _cmd_evaluate, "predict": _cmd_predict,
            "benchmark": _cmd_benchmark, "demo": _cmd_demo, "bench": _cmd_bench}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
