"""Segment volumes with a trained model: prepared slices -> probabilities -> native labels."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .atomic import atomic_path, atomic_write_bytes
from .checkpoints import load_segmentation_model
from .runs import check_output_file
from .data.dicom import has_dicom_magic, read_dicom_folder
from .data.folders import NNUNET_IMAGE
from .data.nifti import is_nifti_path, nifti_stem, read_nifti_volume
from .data.preprocess import PreparedVolume, prepare_volume, probabilities_to_canonical
from .data.volume import CLASS_NAMES, LABELS, Volume
from .errors import ConfigError, DataError, OutputExistsError
from .models import SegmentationModel
from .provenance import versions
from .runtime import autocast, resolve_device


@torch.no_grad()
def predict_probabilities(model: SegmentationModel, images: np.ndarray, device, amp: bool, batch_size: int = 32) -> torch.Tensor:
    """Softmax probabilities ``(K, C, S, S)`` for prepared slices ``(K, S, S)``."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size])[:, None].to(device).contiguous(memory_format=torch.channels_last)
        with autocast(torch.device(device), amp):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out)


def keep_largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep, for each class, only its largest 3D connected component (26-connectivity)."""
    from scipy import ndimage

    out = labels.copy()
    for label in np.unique(labels):
        if label == 0:
            continue
        components, n = ndimage.label(labels == label, structure=np.ones((3, 3, 3)))
        if n > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[(components > 0) & (components != 1 + int(np.argmax(sizes)))] = 0
    return out


def predict_prepared(
    model: SegmentationModel, prepared: PreparedVolume, device="cpu", amp: bool = True, postprocess: str = "none"
) -> np.ndarray:
    """Label volume on the canonical grid of the volume ``prepared`` came from."""
    probs = predict_probabilities(model, prepared.images, device, amp)
    labels = probabilities_to_canonical(probs, prepared)
    return keep_largest_component(labels) if postprocess == "largest-component" else labels


# -- files in, files out (``pix2rep predict``) -------------------------------------------------


def is_label_file(path: str | Path) -> bool:
    """ACDC's ground-truth files, ``*_gt.nii(.gz)``: label maps, not images to segment."""
    return nifti_stem(path).endswith("_gt")


def list_input_volumes(path: str | Path) -> tuple[list[tuple[str, Callable[[], list[Volume]]]], int]:
    """``(inputs, n_label_files)``: a ``(name, loader)`` pair per input under PATH, read lazily
    (one input in memory at a time), and how many label files were left out.

    PATH is a NIfTI file, a folder of NIfTI files (nnU-Net ``imagesTs``-style ``CASE_0000``
    names lose their channel suffix; ACDC's ``*_gt`` label files are skipped) or a DICOM
    folder (one volume per cardiac phase).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "does not exist")
    if path.is_file():
        if not is_nifti_path(path):
            raise DataError(path, "expected a NIfTI file (.nii or .nii.gz) or a folder")
        return [(nifti_stem(path), lambda: [read_nifti_volume(path)])], 0
    niftis = sorted(p for p in path.iterdir() if p.is_file() and is_nifti_path(p))
    images = [p for p in niftis if not is_label_file(p)]
    if images:
        def name(p: Path) -> str:
            match = NNUNET_IMAGE.match(nifti_stem(p))
            return match["case"] if match else nifti_stem(p)

        return [(name(p), lambda p=p: [read_nifti_volume(p)]) for p in images], len(niftis) - len(images)
    if niftis:
        raise DataError(path, f"holds only label files ({len(niftis)} *_gt NIfTI files), no image to segment")
    if any(has_dicom_magic(p) for p in path.rglob("*") if p.is_file()):
        return [(path.name or "dicom", lambda: read_dicom_folder(path))], 0
    raise DataError(path, "holds no NIfTI file and no DICOM file")


def _output_stem(name: str, volume: Volume, k: int, n_volumes: int) -> str:
    """The input's name, plus the phase where one input holds several volumes (DICOM)."""
    if n_volumes == 1:
        return name
    return f"{name}_{re.sub(r'[^A-Za-z0-9.=-]+', '_', volume.phase or str(k))}"


def _check_output_folder(src: Path, out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write among the inputs, or into a non-empty folder without resume / overwrite."""
    if src.is_dir() and out_dir.resolve() == src.resolve():
        raise DataError(out_dir, "the output folder is the input folder; refusing to write among the inputs")
    if out_dir.exists() and any(out_dir.iterdir()) and not (resume or overwrite):
        raise OutputExistsError(f"{out_dir}: already exists; pass --resume to skip finished volumes "
                                "or --overwrite to redo them")


def _sidecar(volume: Volume, prepared: PreparedVolume, model_path: Path, cfg, seconds: float) -> dict:
    """What goes beside each segmentation: its input, the model and settings, the ROI, the labels."""
    return {
        "input": volume.source,
        "phase": volume.phase,
        "model": str(model_path.resolve()),
        "config": cfg.to_dict(),
        "versions": versions(),
        "roi_box_canonical": list(prepared.box),
        "labels": {str(label): class_name for label, class_name in LABELS.items()},
        "seconds": round(seconds, 3),
        "note": "research use only, not for clinical use",
    }


def predict_from_files(model, input, output, *, device=None, resume: bool = False, overwrite: bool = False,
                       overlay=None, progress: bool = False, log: Callable[[str], None] = print) -> list[Path]:
    """Segment the volumes of INPUT into OUTPUT, like nnU-Net's ``predict_from_files``.

    ``model``: a segmentation run folder or its ``model.pt``. ``input``: a NIfTI file, a
    folder of NIfTI files or a DICOM folder (see :func:`list_input_volumes`). ``output``: a
    ``.nii(.gz)`` file for a single input file, else a folder receiving ``NAME.nii.gz`` (labels
    0 background, 1 RV, 2 MYO, 3 LV on the input's voxel grid) and ``NAME.json`` (provenance)
    per volume. ``overlay``: a folder for PNGs of each prediction over its image.

    The heart region is always located without labels (a gt-crop model is told so in the
    log). A non-empty output folder is refused unless ``resume`` (volumes already written are
    kept and skipped) or ``overwrite`` (they are written again); outputs never go among or over
    the inputs. One input is in memory at a time. ``device`` defaults to the model's config.
    ``log`` receives one line per volume, warnings (a prediction with no foreground voxel)
    and a final summary. Returns the files written.
    """
    from tqdm.auto import tqdm

    if resume and overwrite:
        raise ConfigError("give --resume or --overwrite, not both")
    net, cfg, model_path = load_segmentation_model(model)
    device = resolve_device(device or cfg.device)
    net.to(device)
    preprocess = cfg.preprocess
    if preprocess.protocol != "label-free":
        log(f"note: the model was trained with the {preprocess.protocol} protocol; prediction uses the label-free ROI")
        preprocess = dataclasses.replace(preprocess, protocol="label-free")

    src, output = Path(input), Path(output)
    inputs, n_label_files = list_input_volumes(src)
    if n_label_files:
        log(f"{src}: skipping {n_label_files} label file(s) (*_gt)")
    single = src.is_file() and is_nifti_path(output)
    out_dir = output.parent if single else output
    if not single:
        _check_output_folder(src, out_dir, resume, overwrite)
    input_files = {src.resolve()} if src.is_file() else {p.resolve() for p in src.rglob("*") if p.is_file()}
    out_dir.mkdir(parents=True, exist_ok=True)
    if overlay:
        Path(overlay).mkdir(parents=True, exist_ok=True)
    written, kept = [], 0
    for name, load in tqdm(inputs, desc="predict", unit="input", disable=not progress, leave=False):
        volumes = load()  # one input at a time: memory stays bounded on large folders
        for k, volume in enumerate(volumes):
            stem = _output_stem(name, volume, k, len(volumes))
            out_path = output if single else out_dir / f"{stem}.nii.gz"
            if out_path.resolve() in input_files:
                raise DataError(out_path, "is one of the inputs; refusing to overwrite it")
            if out_path.exists() and resume:
                kept += 1
                continue
            check_output_file(out_path, overwrite)
            t0 = time.time()
            prepared = prepare_volume(volume, preprocess)
            labels = predict_prepared(net, prepared, device, cfg.bf16, cfg.downstream.postprocess)
            if not labels.any():
                log(f"warning: {volume.source or name}: the model predicted background only (no "
                    f"{', '.join(CLASS_NAMES)} voxel); is this a short-axis cine MRI of the heart?")
            write_label_nifti(volume.to_native(labels), volume, out_path)
            sidecar = _sidecar(volume, prepared, model_path, cfg, time.time() - t0)
            atomic_write_bytes(out_path.with_name(nifti_stem(out_path) + ".json"), json.dumps(sidecar, indent=2).encode())
            if overlay:
                from .evaluation.overlay import write_overlay

                write_overlay(volume.image, labels, Path(overlay) / f"{stem}.png", title=f"{stem} (prediction)")
            written.append(out_path)
            log(f"{out_path}  ({time.time() - t0:.2f} s)")
    log(f"wrote {len(written)} segmentation(s) to {out_dir}" + (f" ({kept} finished earlier, kept)" if kept else ""))
    return written


def write_label_nifti(labels_native: np.ndarray, volume, out_path: Path) -> None:
    """Write labels on the input's voxel grid, with the input's affine and header (NIfTI) or the
    series geometry (DICOM)."""
    import nibabel as nib

    header = None
    if volume.source and is_nifti_path(volume.source) and Path(volume.source).is_file():
        header = nib.load(volume.source).header.copy()
    img = nib.Nifti1Image(labels_native.astype(np.uint8), volume.affine, header=header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    if header is None:
        axes = [int(a) for a in volume.orientation[:, 0]]
        zooms = [0.0, 0.0, 0.0]
        for k, a in enumerate(axes):
            zooms[a] = volume.spacing[k]
        img.header.set_zooms(zooms)
    with atomic_path(out_path) as tmp:
        nib.save(img, str(tmp))
