"""Models that ship with the package, loaded by name wherever ``-m/--model`` is accepted.

The weights lie in ``pix2rep/weights/`` (part of the wheel), each listed in
``weights/models.json`` with what it is, how it was trained and its SHA-256. A file whose hash
differs from the recorded one is refused: a truncated download or an edited file cannot pass
for the published model. ``MODEL_CARD.md`` at the repository root describes each model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import Pix2RepError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
REGISTRY = WEIGHTS_DIR / "models.json"
_verified: set[Path] = set()  # files already hashed in this process


@dataclass(frozen=True)
class ShippedModel:
    name: str
    file: str  # inside WEIGHTS_DIR
    sha256: str
    kind: str  # "backbone" (for probe / finetune / features / benchmark) or "segmentation"
    description: str
    training_data: str
    preset: str
    protocol: str
    command: str
    commit: str

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file


def shipped_models() -> list[ShippedModel]:
    """Every shipped model, in the registry's order (none when the registry is absent)."""
    if not REGISTRY.is_file():
        return []
    return [ShippedModel(**entry) for entry in json.loads(REGISTRY.read_text())["models"]]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def looks_like_model_name(model) -> bool:
    """A bare name (no folder, no file suffix) that is not a path here: look it up as shipped."""
    text = str(model)
    return not Path(text).exists() and "/" not in text and "\\" not in text and Path(text).suffix == ""


def shipped_model_path(name: str) -> Path:
    """The verified weights file of the shipped model ``name``; a one-line error otherwise."""
    models = {m.name: m for m in shipped_models()}
    if name not in models:
        known = ", ".join(models) or "none installed"
        raise Pix2RepError(f"{name}: no such run folder, checkpoint file or shipped model (shipped models: {known}; "
                           f"`pix2rep models` describes them)")
    model = models[name]
    if model.path not in _verified:
        if not model.path.is_file():
            raise Pix2RepError(f"{model.path}: the weights of shipped model {name} are missing from this installation")
        actual = file_sha256(model.path)
        if actual != model.sha256:
            raise Pix2RepError(f"{model.path}: SHA-256 {actual[:16]}... differs from the recorded {model.sha256[:16]}... "
                               f"of shipped model {name}; the file is damaged or was changed")
        _verified.add(model.path)
    return model.path
