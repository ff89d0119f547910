"""Typed run configuration, named presets, and YAML next to every run's outputs.

A preset names a model size and its training budget: ``paper`` is the architecture of the
paper (GPU only), ``cpu`` the one our CPU benchmarks run (chosen by measurement, see
README "Choosing the cpu preset"). A study plan (``STUDY_PLANS``) names the grid of the
label-efficiency study. Defaults live in these dataclasses and nowhere else; any value can be
overridden with :func:`apply_overrides` (dotted keys, as ``--set pretrain.epochs=5``). The
resolved configuration is written as ``config.yaml`` in the run folder, and ``RunConfig.load``
reads it back, so a run can be repeated from its folder alone.

Bad configuration (an unknown preset, an unknown or misspelled key, a value of the wrong type,
a YAML syntax error) raises a one-line :class:`~pix2rep.errors.ConfigError` naming where it came
from and, for a misspelled key, the closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from .errors import ConfigError

from .data.preprocess import PreprocessConfig
from .models import ModelConfig
from .transforms.intensity import IntensityAugmentConfig
from .transforms.spatial import SpatialAugmentConfig


def _check_grad_clip(value) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"grad_clip must be a positive number or null, got {value!r}")


@dataclass
class PretrainConfig:
    """Self-supervised pretraining (METHOD sections 2 and 3)."""

    loss: str = "infonce"  # "infonce" (Pix2Rep), "barlow" (Pix2Rep-v2) or "simclr" (image-level baseline)
    epochs: int = 20
    batch_size: int = 8
    lr: float = 4.7e-4
    n_samples: int = 1000  # pixel positions per batch for the contrastive loss
    temperature: float = 0.53
    barlow_lambda: float = 1.0 / 256
    val_fraction: float = 0.1  # of PATIENTS, for the validation loss
    seed: int = 0
    max_minutes: Optional[float] = None  # stop after the epoch that crosses this wall time
    # Candidate model sizes, largest first, as pairs (first width, D): the widths double per level
    # from the first, keeping the number of levels. A fresh run measures a pretraining step of each
    # and keeps the first whose `epochs` fit in `max_minutes` (the last if none does); config.yaml
    # then records that model (model.widths, model.out_channels) and an empty list here, so that a
    # rerun from the folder trains the same model. Empty: the model as configured.
    fit_sizes: tuple[tuple[int, int], ...] = ()
    grad_clip: Optional[float] = None  # clip the global gradient norm to this value (off by default)
    # Pix2Rep and v2: pass v1 and v2' through the backbone separately, each view with its own
    # BatchNorm batch statistics, as the reference code does. Off: one pass over both views (2B
    # slices), as every committed run did. README "Deviations from the reference code".
    separate_view_passes: bool = False
    # Pix2Rep and v2: METHOD step 4 as written, z1 = warp(g(f(v1)), T) and z2 = g(f(v2')): the
    # projection head on every pixel of both feature maps (its BatchNorm over all those pixels),
    # then z1 read at T(p). Off: the head on the N sampled vectors only, looked up before it.
    # README "Deviations from the reference code".
    head_on_full_maps: bool = False
    # torchrun only: InfoNCE negatives from every process; SyncBatchNorm (nccl/CUDA only)
    gather_negatives: bool = True
    sync_batchnorm: bool = False

    def __post_init__(self):
        if self.loss not in ("infonce", "barlow", "simclr"):
            raise ValueError(f"pretrain loss must be 'infonce', 'barlow' or 'simclr', got {self.loss!r}")
        _check_grad_clip(self.grad_clip)
        self.fit_sizes = tuple(tuple(pair) for pair in self.fit_sizes)
        if any(len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair)
               for pair in self.fit_sizes):
            raise ValueError(f"fit_sizes must be pairs of positive integers (first width, D), got "
                             f"{[list(pair) for pair in self.fit_sizes]}")


@dataclass
class DownstreamConfig:
    """Few-shot segmentation training (METHOD section 5).

    Fairness: every method gets the same budget of optimiser ``steps`` and the same
    stopping rule. ``stopping="fixed-steps"`` trains for exactly ``steps`` and keeps the last
    model (honest with one or two annotated patients, whose slices make no validation set);
    ``"validation"`` holds out ``val_patients`` of the annotated patients, evaluates every
    ``eval_every`` steps and keeps the best model, stopping after ``patience`` evaluations
    without improvement. Learning rates: METHOD's reference values for probing and
    fine-tuning; for the baseline, Adam 3e-3, tuned for training from scratch on pool patients
    (scripts/tune_baseline_lr.py: 3e-4, 1e-3, 3e-3, 1e-2 gave 0.368, 0.431, 0.510, 0.374).
    """

    mode: str = "finetune"  # "probe", "finetune", "scratch" (baseline), "random-probe" (floor)
    loss: str = "dice-ce"  # "dice" (soft Dice with softmax, background included) or "dice-ce"
    steps: int = 600
    batch_size: int = 16
    lr_probe: float = 7.6e-3
    lr_backbone: float = 5e-5
    lr_head: float = 1e-2
    lr_scratch: float = 3e-3  # tuned: scripts/tune_baseline_lr.py (README)
    # "constant" (the committed studies) or "cosine": every rate times (1 + cos(pi (step - 1) / steps)) / 2
    lr_schedule: str = "constant"
    augment: bool = True  # intensity augmentation of the images
    # Random rotation and zoom of the annotated slices and their labels (transforms.augment_spatial),
    # before the intensity augmentation. Off by default: METHOD's reference uses none downstream.
    spatial: SpatialAugmentConfig = field(default_factory=lambda: SpatialAugmentConfig(
        enabled=False, rotation_deg=30.0, scale=(0.85, 1.15), flip_probs=(1.0, 0.0, 0.0)))
    # Probes ("probe", "random-probe"): "live" runs the frozen backbone on every (augmented)
    # batch; "cached" computes the features of the un-augmented slices once and trains the
    # head on them (the same as live with augment false, many times faster per step)
    probe_features: str = "live"
    stopping: str = "fixed-steps"  # or "validation"
    val_patients: int = 0
    eval_every: int = 100
    patience: int = 3
    seed: int = 0
    postprocess: str = "none"  # or "largest-component": keep the largest 3D component per class
    grad_clip: Optional[float] = None  # clip the global gradient norm to this value (off by default)
    # Mean Teacher (mode "mean-teacher"): EMA decay, largest consistency weight, ramp-up as a
    # fraction of the steps, unlabeled slices per step
    mt_ema: float = 0.99
    mt_consistency: float = 1.0
    mt_rampup: float = 0.4
    mt_unlabeled_batch: int = 16

    def __post_init__(self):
        _check_grad_clip(self.grad_clip)
        if self.mode not in ("probe", "finetune", "scratch", "random-probe", "mean-teacher"):
            raise ValueError(f"mode must be probe, finetune, scratch, random-probe or mean-teacher, got {self.mode!r}")
        if self.loss not in ("dice", "dice-ce"):
            raise ValueError(f"loss must be 'dice' or 'dice-ce', got {self.loss!r}")
        if self.postprocess not in ("none", "largest-component"):
            raise ValueError(f"postprocess must be 'none' or 'largest-component', got {self.postprocess!r}")
        if self.stopping not in ("fixed-steps", "validation"):
            raise ValueError(f"stopping must be 'fixed-steps' or 'validation', got {self.stopping!r}")
        if self.probe_features not in ("live", "cached"):
            raise ValueError(f"probe_features must be 'live' or 'cached', got {self.probe_features!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")


def _sorted_pairs(pairs) -> tuple[tuple[int, ...], ...]:
    """Pairs (N, value) as int tuples, sorted by N."""
    return tuple(sorted(tuple(int(v) for v in pair) for pair in pairs))


@dataclass
class StudyPlan:
    """The grid of the label-efficiency study (``pix2rep benchmark``): methods x N x seeds.

    ``full_pool`` adds one run on the whole pool (first seed). ``eval_data`` is a separate
    labeled evaluation set; empty means the 20 held-out ACDC development patients. Named plans:
    :data:`STUDY_PLANS`.
    """

    methods: tuple[str, ...] = ("baseline", "pix2rep-lp", "pix2rep-ft", "random-lp")
    n: tuple[int, ...] = (1, 2, 5, 10, 20)
    seeds: tuple[int, ...] = (0, 1, 2)
    full_pool: bool = True
    eval_data: str = ""
    # Steps that grow with N: pairs (N, steps); a cell of N takes the steps of the largest listed
    # N not above it. Empty: downstream.steps for every cell (the equal-budget studies).
    steps_by_n: tuple[tuple[int, int], ...] = ()
    # Draws that shrink with N: pairs (N, k); a cell of N uses the first k of ``seeds``, k from the
    # largest listed N not above it (one-shot figures need many draws, the full pool one).
    # Empty: every seed for every N.
    seeds_by_n: tuple[tuple[int, int], ...] = ()
    # Up to this many seeds of one (method, N) train at once, as one grouped model
    # (training.downstream.train_segmentation_cells): the same models up to rounding, fewer and
    # larger passes, which is what fills a GPU. Methods it does not cover run one at a time.
    cells_at_once: int = 1
    # Cells (or groups of cells_at_once) train and are evaluated in this many worker processes at
    # once, each with an equal share of the CPU threads. The `tiny` network's small convolutions
    # leave threads idle: on a 2-core AVX2 CPU, two one-thread processes trained 1.42x the slices/s
    # of one two-thread process at 96 px
    # (scripts/bench_cells_at_once.py --preset tiny --size 96 --cells 1 --processes 2 --threads 1).
    workers: int = 1

    def __post_init__(self):
        self.methods, self.n, self.seeds = tuple(self.methods), tuple(self.n), tuple(self.seeds)
        if not self.methods or not self.n or not self.seeds:
            raise ValueError("a study needs at least one method, one N and one seed")
        if min(self.n) < 1:
            raise ValueError(f"every N must be at least 1, got {list(self.n)}")
        self.steps_by_n = _sorted_pairs(self.steps_by_n)
        if any(n < 1 or steps < 1 for n, steps in self.steps_by_n):
            raise ValueError(f"steps_by_n pairs (N, steps) must be positive, got {[list(p) for p in self.steps_by_n]}")
        self._check_first_n("steps_by_n", self.steps_by_n)
        self.seeds_by_n = _sorted_pairs(self.seeds_by_n)
        if any(n < 1 or not 1 <= k <= len(self.seeds) for n, k in self.seeds_by_n):
            raise ValueError(f"seeds_by_n pairs (N, number of seeds) need N >= 1 and 1 <= k <= {len(self.seeds)} "
                             f"(the seeds listed), got {[list(p) for p in self.seeds_by_n]}")
        self._check_first_n("seeds_by_n", self.seeds_by_n)
        if not isinstance(self.cells_at_once, int) or self.cells_at_once < 1:
            raise ValueError(f"cells_at_once must be a whole number >= 1, got {self.cells_at_once!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a whole number >= 1, got {self.workers!r}")

    def _check_first_n(self, name: str, pairs) -> None:
        """Every N of the study must find a listed N not above it."""
        if pairs and min(self.n) < pairs[0][0]:
            raise ValueError(f"{name} starts at N = {pairs[0][0]}, above the smallest N {min(self.n)}")

    @staticmethod
    def _listed_for(pairs, n: int, default):
        """The value of the largest listed N not above ``n`` (``default`` where none is)."""
        listed = [value for k, value in pairs if k <= n]
        return listed[-1] if listed else default

    def seeds_for(self, n: int) -> tuple[int, ...]:
        """The seeds (draws of annotated patients) of the cells with ``n`` annotated patients."""
        return self.seeds[: self._listed_for(self.seeds_by_n, n, len(self.seeds))]

    def steps_for(self, n: int, default: int) -> int:
        """The downstream steps of a cell with ``n`` annotated patients."""
        return self._listed_for(self.steps_by_n, n, default)


@dataclass
class RunConfig:
    preset: str = "cpu"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    bf16: bool = True  # bf16 autocast where the device supports it
    channels_last: bool = True
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    intensity: IntensityAugmentConfig = field(default_factory=IntensityAugmentConfig)
    spatial: SpatialAugmentConfig = field(default_factory=SpatialAugmentConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    study: StudyPlan = field(default_factory=StudyPlan)
    data: str = ""
    patients: list = field(default_factory=list)  # annotated patients used (downstream runs)
    pretrained: str = ""  # the pretrained model a downstream run started from

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        from .atomic import atomic_write_bytes

        atomic_write_bytes(path, yaml.safe_dump(self.to_dict(), sort_keys=False).encode())

    @classmethod
    def from_dict(cls, d: dict, source: str = "configuration") -> "RunConfig":
        """Build from plain data; ``source`` names where it came from in error messages."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of settings, got {type(d).__name__}")
        return _build(cls, d, source, "")

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
        return cls.from_dict(data or {}, source=str(path))


PRESETS: dict[str, dict] = {
    # The paper's U-Net: 6 levels, widths 64..2048, D = 1024, about 134.9M parameters; 200 epochs.
    "paper": {"model": {"widths": (64, 128, 256, 512, 1024, 2048), "out_channels": 1024}, "pretrain": {"epochs": 200}},
    # Measured on the 2-core CPU (README, "Choosing the cpu preset"): widths 16..256, D = 64.
    # 300 downstream steps keep one protocol's whole study (64 cells) within 2 hours there.
    # Where this model cannot reach 20 epochs in 28 minutes (a CPU without native bf16 runs fp32,
    # several times slower), pretraining measures a step and takes a smaller one (fit_sizes;
    # README "Choosing the cpu preset" gives what each kind of CPU gets).
    "cpu": {"model": {"widths": (16, 32, 64, 128, 256), "out_channels": 64},
            "pretrain": {"epochs": 20, "max_minutes": 28.0,
                         "fit_sizes": ((16, 64), (16, 32), (8, 32), (8, 16), (4, 16))},
            "downstream": {"steps": 300}},
    # A tiny network for tests and the synthetic demo.
    "tiny": {"model": {"widths": (8, 16, 32), "out_channels": 16}, "pretrain": {"epochs": 2}},
}

STUDY_PLANS: dict[str, dict] = {
    # The study as committed: the StudyPlan defaults and the preset's budgets.
    "full": {},
    # Smoke run: checks that the pipeline runs end to end; its numbers mean nothing.
    # Its 5-minute cap cuts the epochs anyway: the preset's model, not one fitted to the cap.
    "quick": {"study": {"n": (1, 5), "seeds": (0,), "full_pool": False}, "downstream": {"steps": 100},
              "pretrain": {"max_minutes": 5.0, "fit_sizes": ()}},
    # `pix2rep demo` on its synthetic data, with the `tiny` preset. Its rates were chosen on demo POOL
    # patients only (scripts/demo_pool_validation.py, docs/demo_diagnosis): with 150 steps, METHOD's
    # backbone rate 5e-5 (meant for 200 epochs) leaves the backbone where pretraining put it and the
    # LV is never learned; 3e-3 was the best fine-tuning rate there. Both sides also augment the annotated
    # slices spatially (rotation, zoom): one-shot fine-tuning there rose from 0.41 to 0.53 (3e-3 still
    # its best rate), and the baseline's best rate moved from 1e-3 to 3e-3 (N = 1: 0.48 to 0.54;
    # 1e-2 read 0.56 at N = 1 but 0.53 against 0.65 at N = 2).
    # Four one-shot draws, two at N = 2 and 5; probes on cached features (METHOD's protocol less the
    # augmentation, many times faster per step). Cells run in two worker processes: the `tiny`
    # network leaves threads idle, and on a 2-core AVX2 CPU two one-thread processes trained 1.42x
    # the slices/s of one two-thread process (two grouped cells in one process: 1.0x there; README).
    "demo": {"study": {"methods": ("baseline", "pix2rep-lp", "pix2rep-ft"), "n": (1, 2, 5), "seeds": (0, 1, 2, 3),
                       "seeds_by_n": ((1, 4), (2, 2)), "full_pool": False, "workers": 2},
             "downstream": {"steps": 150, "lr_backbone": 3e-3, "lr_scratch": 3e-3, "probe_features": "cached",
                            "spatial": {"enabled": True}},
             "preprocess": {"size": 96}, "pretrain": {"epochs": 10}},
}


def preset_config(name: str, **overrides: Any) -> RunConfig:
    """The RunConfig of a named preset, with nested ``overrides`` (e.g. pretrain={"epochs": 3})."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{_did_you_mean(name, PRESETS)}; choose one of {', '.join(sorted(PRESETS))}")
    d = _merge({"preset": name}, PRESETS[name])
    d = _merge(d, overrides)
    return RunConfig.from_dict(d, source=f"preset {name!r}")


def study_plan_config(cfg: RunConfig, plan: str) -> RunConfig:
    """``cfg`` with the settings of a named study plan (:data:`STUDY_PLANS`) on top."""
    if plan not in STUDY_PLANS:
        raise ConfigError(f"unknown study plan {plan!r}; choose one of {', '.join(sorted(STUDY_PLANS))}")
    return RunConfig.from_dict(_merge(cfg.to_dict(), STUDY_PLANS[plan]), source=f"study plan {plan!r}")


def apply_overrides(cfg: RunConfig, overrides: Mapping[str, Any], source: str = "command line") -> RunConfig:
    """A copy of ``cfg`` with dotted-key ``overrides`` applied (``{"pretrain.epochs": 5}``).

    Values that are None are skipped (an option not given). Every value is checked like a
    config.yaml value: unknown keys get the closest known one suggested, wrong types are refused.
    """
    data = cfg.to_dict()
    for key, value in overrides.items():
        if value is None:
            continue
        *sections, name = key.split(".")
        node = data
        for depth, section in enumerate(sections):
            if not isinstance(node.get(section), dict):
                known = [k for k, v in node.items() if isinstance(v, dict)]
                raise ConfigError(f"{source}: unknown section {'.'.join(sections[:depth + 1])!r}"
                                  f"{_did_you_mean(section, known)} (known: {', '.join(known)})")
            node = node[section]
        node[name] = _plain(value)
    return RunConfig.from_dict(data, source=source)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"pretrain.epochs=5"`` -> ``("pretrain.epochs", 5)``; the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. pretrain.epochs=5")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML") from None


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _did_you_mean(word: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def _all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, for suggestions across sections."""
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        keys += _all_keys(hint, f"{prefix}{f.name}.") if dataclasses.is_dataclass(hint) else [prefix + f.name]
    return keys


def _build(cls, d: dict, source: str, prefix: str):
    """Rebuild nested dataclasses from plain dicts, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in dict(d or {}).items():
        key = prefix + str(name)
        if name not in hints or name not in names:
            # a key written in the wrong section (epochs for pretrain.epochs), else a misspelling
            elsewhere = [k for k in _all_keys(RunConfig) if k.rsplit(".", 1)[-1] == name]
            close = f"; did you mean {elsewhere[0]!r}?" if elsewhere else _did_you_mean(str(name), names, prefix)
            raise ConfigError(f"{source}: unknown {cls.__name__} setting {key!r}{close} (known: {', '.join(names)})")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key} must be a section of settings, got {value!r}")
            kwargs[name] = _build(hint, value, source, key + ".")
        else:
            kwargs[name] = _check_type(value, hint, source, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a __post_init__ check of a value
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'settings'}: {exc}") from None


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _check_type(value, hint, source: str, key: str):
    """``value`` converted to the annotated type ``hint``, or a ConfigError naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _check_type(value, next(a for a in args if a is not type(None)), source, key)
    if origin is tuple or origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(f"{source}: {key} must have {len(args)} entries, got {list(value)}")
            return tuple(_check_type(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return list(value)
    if hint is float and isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)  # YAML 1.1 (PyYAML) reads "1e-3", without a dot, as a string
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str)}
    if hint in ok:
        if not ok[hint]:
            raise ConfigError(f"{source}: {key} must be {'a number' if hint is float else 'an integer' if hint is int else hint.__name__}, got {value!r}")
        return float(value) if hint is float else value
    return value
