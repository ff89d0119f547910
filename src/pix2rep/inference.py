"""Segment volumes with a trained model: prepared slices -> probabilities -> native labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path
from .data.preprocess import PreparedVolume, probabilities_to_canonical
from .models import SegmentationModel
from .runtime import autocast
from .checkpoints import load_segmentation_model  # noqa: F401 (part of this module's API)


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


def list_input_volumes(path: str | Path):
    """Yield ``(name, loader)`` for every volume under INPUT, lazily (one volume in memory at a time).

    INPUT is a NIfTI file, a folder of NIfTI files (nnU-Net ``imagesTs``-style ``CASE_0000``
    names lose their channel suffix) or a DICOM folder (one output per cardiac phase).
    """
    from .data.dicom import has_dicom_magic, read_dicom_folder
    from .data.nifti import is_nifti_path, nifti_stem, read_nifti_volume
    from .errors import DataError

    path = Path(path)
    if not path.exists():
        raise DataError(path, "does not exist")
    if path.is_file():
        if not is_nifti_path(path):
            raise DataError(path, "expected a NIfTI file (.nii or .nii.gz) or a folder")
        return [(nifti_stem(path), lambda p=path: [read_nifti_volume(p)])]
    niftis = sorted(p for p in path.iterdir() if p.is_file() and is_nifti_path(p))
    if niftis:
        def name(p):
            stem = nifti_stem(p)
            return stem[:-5] if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() else stem

        return [(name(p), lambda p=p: [read_nifti_volume(p)]) for p in niftis]
    if any(has_dicom_magic(p) for p in path.rglob("*") if p.is_file()):
        return [(path.name or "dicom", lambda: read_dicom_folder(path))]
    raise DataError(path, "holds no NIfTI file and no DICOM file")


def write_label_nifti(labels_native: np.ndarray, volume, out_path: Path) -> None:
    """Write labels on the input's voxel grid, with the input's affine and header (NIfTI) or the
    series geometry (DICOM)."""
    import nibabel as nib

    from .data.nifti import is_nifti_path

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
