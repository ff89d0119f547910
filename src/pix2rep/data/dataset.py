"""Datasets on disk -> prepared slices in memory, cached on disk.

``prepare_dataset`` reads a dataset (any layout :func:`load_dataset` knows), prepares every
volume (:func:`prepare_volume`) and caches the result under a key made of the files' names,
sizes and modification times and of the preprocessing configuration, so the second run with
the same data and settings skips reading and preprocessing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .. import __version__
from ..atomic import atomic_path

from .preprocess import PreparedVolume, PreprocessConfig, prepare_volume

CACHE_FORMAT = 1  # bump when preprocessing changes what it produces


@dataclass
class PreparedPatient:
    id: str
    group: Optional[str]
    volumes: list[PreparedVolume]
    unlabeled: list[PreparedVolume] = dataclasses.field(default_factory=list)  # extra 4D frames

    @property
    def labeled(self) -> bool:
        return any(v.masks is not None for v in self.volumes)


@dataclass
class SliceSet:
    """Slices stacked for training: images (N, 1, S, S) in [0, 1], masks (N, S, S) or None."""

    images: torch.Tensor
    masks: Optional[torch.Tensor]
    patient_ids: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]


def default_cache_dir() -> Path:
    return Path(os.environ.get("PIX2REP_CACHE", Path.home() / ".cache" / "pix2rep"))


def dataset_fingerprint(root: str | Path, cfg: PreprocessConfig, include_4d: bool) -> str:
    """Key of the cache: every file's relative path, size and mtime, plus the settings."""
    root = Path(root).resolve()
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root) if f != root else f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    h.update(f"{include_4d}|{CACHE_FORMAT}|{str(root)}".encode())
    return h.hexdigest()[:20]


def prepare_patients(patients, cfg: PreprocessConfig) -> list[PreparedPatient]:
    """Prepare every volume of every patient (the other cardiac phase helps the ROI locator)."""
    out = []
    for p in patients:
        vols = list(p.volumes.values())
        prepared = []
        for v in vols:
            other = next((o for o in vols if o is not v), None)
            prepared.append(prepare_volume(v, cfg, other_phase=other, patient_id=p.id))
        extra = []
        if p.unlabeled and cfg.protocol == "label-free":
            extra = [prepare_volume(v, cfg, patient_id=p.id) for v in p.unlabeled]
        out.append(PreparedPatient(p.id, p.group, prepared, extra))
    return out


def prepare_dataset(
    root: str | Path,
    cfg: PreprocessConfig,
    cache_dir: str | Path | None = None,
    include_4d: bool = False,
    use_cache: bool = True,
    log=print,
) -> list[PreparedPatient]:
    """Load and prepare a dataset, from the on-disk cache when it is there."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = dataset_fingerprint(root, cfg, include_4d)
    cache_file = cache_dir / f"prepared-{key}.npz"
    if use_cache and cache_file.exists():
        try:
            return _load_cache(cache_file)
        except Exception as exc:  # a broken cache is rebuilt, never trusted
            log(f"cache {cache_file} unreadable ({exc}); rebuilding it")
    t0 = time.time()
    from .discover import load_dataset  # late import: readers are heavy (pydicom)

    dataset = load_dataset(root, include_4d=include_4d)
    patients = prepare_patients(dataset.patients, cfg)
    log(f"prepared {sum(len(p.volumes) for p in patients)} volumes of {len(patients)} patients in {time.time() - t0:.1f} s")
    if use_cache:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save_cache(cache_file, patients)
    return patients


def load_patients(path, cfg, cache=None, include_4d: bool = False, log=print) -> list[PreparedPatient]:
    """:func:`prepare_dataset` with the preprocessing of a RunConfig ``cfg``, and a line saying how long it took."""
    t0 = time.time()
    patients = prepare_dataset(path, cfg.preprocess, cache_dir=cache, include_4d=include_4d, log=log)
    log(f"{len(patients)} patients ready in {time.time() - t0:.1f} s ({cfg.preprocess.protocol} protocol)")
    return patients


def stack_slices(patients: Sequence[PreparedPatient], labeled: bool = True, include_unlabeled: bool = False) -> SliceSet:
    """Stack all slices of the patients' volumes; ``labeled`` keeps masks (and needs them)."""
    images, masks, ids = [], [], []
    for p in patients:
        vols = list(p.volumes) + (list(p.unlabeled) if include_unlabeled else [])
        for v in vols:
            if labeled and v.masks is None:
                continue
            images.append(v.images)
            ids.extend([p.id] * len(v.images))
            if labeled:
                masks.append(v.masks)
    if not images:
        raise ValueError("no slices to stack" + (" with labels" if labeled else ""))
    x = torch.from_numpy(np.concatenate(images))[:, None].contiguous()
    m = torch.from_numpy(np.concatenate(masks)).long() if labeled else None
    return SliceSet(x, m, ids)


# -- cache: one compressed npz, arrays plus a JSON index (no pickle) -------------------------

_ARRAY_FIELDS = ("images", "masks", "slice_index", "canonical_mask")


def _save_cache(path: Path, patients: list[PreparedPatient]) -> None:
    arrays, index = {}, []
    for pi, p in enumerate(patients):
        entry = {"id": p.id, "group": p.group, "volumes": [], "unlabeled": []}
        for kind in ("volumes", "unlabeled"):
            for vi, v in enumerate(getattr(p, kind)):
                meta = {}
                for f in dataclasses.fields(v):
                    value = getattr(v, f.name)
                    if f.name in _ARRAY_FIELDS:
                        if value is not None:
                            arrays[f"{pi}_{kind}_{vi}_{f.name}"] = value
                    else:
                        meta[f.name] = list(value) if isinstance(value, tuple) else value
                entry[kind].append(meta)
        index.append(entry)
    arrays["index"] = np.frombuffer(json.dumps({"version": __version__, "patients": index}).encode(), dtype=np.uint8)
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)


def _load_cache(path: Path) -> list[PreparedPatient]:
    with np.load(path, allow_pickle=False) as z:
        index = json.loads(bytes(z["index"]).decode())["patients"]
        out = []
        for pi, entry in enumerate(index):
            kinds = {}
            for kind in ("volumes", "unlabeled"):
                vols = []
                for vi, meta in enumerate(entry[kind]):
                    arrays = {f: (z[f"{pi}_{kind}_{vi}_{f}"] if f"{pi}_{kind}_{vi}_{f}" in z else None) for f in _ARRAY_FIELDS}
                    meta = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()}
                    vols.append(PreparedVolume(**meta, **arrays))
                kinds[kind] = vols
            out.append(PreparedPatient(entry["id"], entry["group"], kinds["volumes"], kinds["unlabeled"]))
    return out
