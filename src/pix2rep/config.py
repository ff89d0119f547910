"""Typed run configuration, named presets, and YAML next to every run's outputs.

A preset names a model size and its training budget: ``paper`` is the architecture of the
paper (GPU only), ``cpu`` the one our CPU benchmarks run (chosen by measurement, see
README "Choosing the cpu preset"). Any value can be overridden; the resolved configuration
is written as ``config.yaml`` in the run folder, and ``RunConfig.load`` reads it back, so a
run can be repeated from its folder alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .data.preprocess import PreprocessConfig
from .models import ModelConfig
from .transforms.intensity import IntensityAugmentConfig


@dataclass
class SpatialAugmentConfig:
    """Random affine between the two views (METHOD section 2, ``affine_grid`` convention)."""

    rotation_deg: float = 90.0
    scale: tuple[float, float] = (0.33, 0.95)
    flip_probs: tuple[float, float, float] = (0.45, 0.32, 0.23)  # none, x, y
    enabled: bool = True  # False: the invariance ablation (intensity changes only)

    def __post_init__(self):
        self.scale = tuple(float(s) for s in self.scale)
        self.flip_probs = tuple(float(p) for p in self.flip_probs)


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
    grad_clip: Optional[float] = None  # clip the global gradient norm to this value (off by default)
    # torchrun only: InfoNCE negatives from every process; SyncBatchNorm (nccl/CUDA only)
    gather_negatives: bool = True
    sync_batchnorm: bool = False

    def __post_init__(self):
        if self.loss not in ("infonce", "barlow", "simclr"):
            raise ValueError(f"pretrain loss must be 'infonce', 'barlow' or 'simclr', got {self.loss!r}")
        _check_grad_clip(self.grad_clip)


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
    augment: bool = True  # intensity augmentation of the images (no spatial, as the reference)
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
    data: str = ""
    patients: list = field(default_factory=list)  # annotated patients used (downstream runs)
    pretrained: str = ""  # the pretrained model a downstream run started from

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        from .atomic import atomic_write_bytes

        atomic_write_bytes(path, yaml.safe_dump(self.to_dict(), sort_keys=False).encode())

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return _build(cls, d)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})


PRESETS: dict[str, dict] = {
    # The paper's U-Net: 6 levels, widths 64..2048, D = 1024, about 134.9M parameters; 200 epochs.
    "paper": {"model": {"widths": (64, 128, 256, 512, 1024, 2048), "out_channels": 1024}, "pretrain": {"epochs": 200}},
    # Measured on the 2-core CPU (README, "Choosing the cpu preset"): widths 16..256, D = 64.
    # 300 downstream steps keep one protocol's whole study (64 cells) within 2 hours there.
    "cpu": {"model": {"widths": (16, 32, 64, 128, 256), "out_channels": 64}, "pretrain": {"epochs": 20, "max_minutes": 28.0},
            "downstream": {"steps": 300}},
    # A tiny network for tests and the synthetic demo.
    "tiny": {"model": {"widths": (8, 16, 32), "out_channels": 16}, "pretrain": {"epochs": 2}},
}


def preset_config(name: str, **overrides: Any) -> RunConfig:
    """The RunConfig of a named preset, with nested ``overrides`` (e.g. pretrain={"epochs": 3})."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    d = _merge({"preset": name}, PRESETS[name])
    d = _merge(d, overrides)
    return RunConfig.from_dict(d)


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


def _build(cls, d: dict):
    """Rebuild nested dataclasses from plain dicts, refusing unknown keys."""
    d = dict(d or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings: {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for name, value in d.items():
        default = names[name].default_factory() if names[name].default_factory is not dataclasses.MISSING else None
        kwargs[name] = _build(type(default), value) if dataclasses.is_dataclass(default) and isinstance(value, dict) else value
    return cls(**kwargs)
