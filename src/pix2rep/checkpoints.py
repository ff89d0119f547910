"""Checkpoint files: find one from ``-m/--model``, load it safely, save it atomically.

Checkpoints are plain dicts of tensors and built-in values written with ``torch.save`` and
read with ``torch.load(weights_only=True)``: loading one never unpickles arbitrary objects.
Files are written atomically (temporary file, fsync, rename), so a killed run leaves the
previous version intact.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .atomic import atomic_path
from .config import RunConfig
from .errors import Pix2RepError


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomically save a dict of tensors / built-in values (loadable with weights_only=True)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def find_checkpoint(model: str | Path, name: str = "best.pt") -> Path:
    """``-m/--model`` accepts a run folder (its ``name`` checkpoint) or a checkpoint file."""
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
