"""Checkpoint files: find one from ``-m/--model``, load it safely, save it atomically.

Checkpoints are plain dicts of tensors and built-in values written with ``torch.save`` and
read with ``torch.load(weights_only=True)``: loading one never unpickles arbitrary objects.
Files are written atomically (temporary file, fsync, rename), so a killed run leaves the
previous version intact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_path
from .config import RunConfig
from .errors import Pix2RepError
from .models import SegmentationModel, UNet
from .shipped import looks_like_model_name, shipped_model_path


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomically save a dict of tensors / built-in values (loadable with weights_only=True)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def find_checkpoint(model: str | Path, name: str = "best.pt") -> Path:
    """``-m/--model`` accepts a run folder (its ``name`` checkpoint), a checkpoint file or the
    name of a shipped model (:mod:`pix2rep.shipped`)."""
    if looks_like_model_name(model):
        return shipped_model_path(str(model))
    path = Path(model)
    if path.is_dir():
        for candidate in (name, "best.pt", "last.pt", "model.pt"):
            if (path / candidate).is_file():
                return path / candidate
        raise Pix2RepError(f"{path}: no checkpoint (best.pt, last.pt or model.pt) in this run folder")
    if not path.is_file():
        raise Pix2RepError(f"{path}: no such run folder or checkpoint file")
    return path


def load_checkpoint(model: str | Path, map_location="cpu") -> tuple[dict, Path]:
    """Load a checkpoint safely (``weights_only=True``); returns (payload, file)."""
    path = find_checkpoint(model)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for crafted files, zip errors for broken ones
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else type(exc).__name__)
        raise Pix2RepError(f"{path}: refused to load: not a plain pix2rep checkpoint ({why[:300]})") from None
    if not isinstance(payload, dict) or "config" not in payload:
        raise Pix2RepError(f"{path}: not a pix2rep checkpoint (no config inside)")
    return payload, path


def load_state(module: torch.nn.Module, state: dict, what: str, path: Path) -> None:
    """``load_state_dict`` with a clear message listing mismatched keys."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        own = module.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        raise Pix2RepError(
            f"{path}: the {what} weights do not match the configured architecture "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}, shape differs {shape[:5]}{'...' if len(shape) > 5 else ''})"
        ) from exc


def config_from_checkpoint(payload: dict) -> RunConfig:
    return RunConfig.from_dict(payload["config"])


@dataclass
class PretrainedBackbone:
    """What a downstream run needs from a checkpoint: the backbone weights, the names of the
    parameters pretraining trained (SimCLR trains the encoder only), the run's configuration
    and the patients it was trained on (empty where the checkpoint predates that record)."""

    state: dict
    prefixes: list
    config: RunConfig
    path: Path
    patients: list


def load_pretrained_backbone_weights(model: str | Path) -> PretrainedBackbone:
    """The backbone of a pretraining run or of any checkpoint that holds one (``-m/--model``)."""
    payload, path = load_checkpoint(model)
    if "backbone" not in payload:
        raise Pix2RepError(f"{path}: this checkpoint holds no backbone weights")
    return PretrainedBackbone(payload["backbone"], list(payload.get("pretrained_prefixes", [""])),
                              config_from_checkpoint(payload), path, list(payload.get("pretraining_patients", [])))


def load_backbone(model: str | Path, map_location="cpu") -> tuple[UNet, RunConfig, Path]:
    """A backbone module with its weights, from a run folder or checkpoint file (pretraining or downstream)."""
    weights = load_pretrained_backbone_weights(model)
    backbone = UNet(weights.config.model)
    load_state(backbone, weights.state, "backbone", weights.path)
    return backbone.to(map_location), weights.config, weights.path


def load_segmentation_model(model: str | Path, device="cpu") -> tuple[SegmentationModel, RunConfig, Path]:
    """A segmentation model from a downstream run folder or its ``model.pt``."""
    folder = Path(model)
    if folder.is_dir() and not (folder / "model.pt").is_file():
        if any((folder / name).is_file() for name in ("best.pt", "last.pt")):
            raise Pix2RepError(f"{folder}: a pretraining run (no segmentation head); train one first with "
                               f"`pix2rep probe` or `pix2rep finetune -m {folder}`, then pass that run folder")
        raise Pix2RepError(f"{folder}: no model.pt in this folder; pass a segmentation run folder or its model.pt")
    payload, path = load_checkpoint(folder / "model.pt" if folder.is_dir() else folder)
    if "segmentation_head" not in payload:
        raise Pix2RepError(f"{path}: a pretraining checkpoint (no segmentation head); train one first with "
                           f"`pix2rep probe` or `pix2rep finetune -m {path}`")
    cfg = config_from_checkpoint(payload)
    net = SegmentationModel(UNet(cfg.model), cfg.model.num_classes)
    load_state(net.backbone, payload["backbone"], "backbone", path)
    load_state(net.head, payload["segmentation_head"], "segmentation head", path)
    return net.to(device).eval(), cfg, path
