"""Reading NIfTI files (.nii, .nii.gz) into canonical :class:`~pix2rep.data.volume.Volume` objects.

Every problem with a file (missing, truncated, corrupt, wrong dimensionality, NaN/Inf or
constant intensities, a mask that does not fit its image) is reported as a one-line
:class:`~pix2rep.errors.DataError` naming the file, never as a traceback from deep inside
nibabel or gzip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError
from .volume import LABELS, Volume, short_axis_orientation, to_canonical

MASK_LABELS = tuple(LABELS)
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | Path) -> bool:
    """True when the file name ends with .nii or .nii.gz (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """File name without its .nii / .nii.gz suffix: ``case_01.nii.gz`` -> ``case_01``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` on one line, for wrapping library errors in a DataError."""
    text = " ".join(str(exc).split()) or "no details"
    return f"{type(exc).__name__}: {text}"


def load_nifti(path: str | Path, ndim: int = 3) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read a NIfTI file completely: ``(data, affine, zooms)`` in the file's own axis order.

    ``data`` is the array as stored (scaled by nibabel if the header asks for it, so its dtype
    varies). The whole file is decompressed here, so a truncated or corrupt file fails now,
    with a :class:`DataError`, rather than later. ``ndim`` is the dimensionality expected (3 or 4);
    trailing axes of length 1 beyond it are dropped (e.g. a 3D volume stored as ``(X, Y, Z, 1)``).
    """
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise DataError(path, "does not exist")
    if path.is_dir():
        raise DataError(path, "is a folder, expected a NIfTI file (.nii or .nii.gz)")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=float)
        zooms = tuple(float(z) for z in img.header.get_zooms())
    # nibabel, gzip and zlib raise a wide variety of exceptions on broken files (ImageFileError,
    # EOFError, OSError, zlib.error, ValueError, ...); all mean the same thing to the user.
    except Exception as exc:
        raise DataError(path, f"cannot read NIfTI file, truncated or corrupt? ({describe_exception(exc)})") from exc
    if not np.isfinite(affine).all():
        raise DataError(path, "has no usable affine (voxel-to-world matrix)")
    while data.ndim > ndim and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != ndim:
        hint = "; use read_nifti_4d for 4D cine files" if data.ndim == 4 and ndim == 3 else ""
        raise DataError(path, f"is {data.ndim}D with shape {data.shape}, expected a {ndim}D volume{hint}")
    if data.size == 0:
        raise DataError(path, f"holds no voxels (shape {data.shape})")
    zooms = (zooms + (1.0,) * ndim)[:ndim]
    spatial = np.asarray(zooms[:3], dtype=float)
    if not (np.isfinite(spatial).all() and (spatial > 0).all()):
        raise DataError(path, f"has invalid voxel spacing {tuple(spatial.tolist())} in its header (pixdim)")
    return data, affine, zooms


def orientation_for(affine: np.ndarray, zooms: tuple[float, ...], shape: tuple[int, ...]) -> np.ndarray:
    """:func:`short_axis_orientation` of a file, trusting the header's voxel sizes.

    ACDC's sform has unit-length columns (directions only) while pixdim holds the true voxel
    size (e.g. 1.56 x 1.56 x 10 mm), so the slice axis must be chosen from the zooms, with the
    affine only giving directions.
    """
    directions = np.asarray(affine, dtype=float)[:3, :3].copy()
    norms = np.sqrt((directions**2).sum(axis=0))
    directions /= np.where(norms > 0, norms, 1.0)
    scaled = np.eye(4)
    scaled[:3, :3] = directions * np.asarray(zooms[:3], dtype=float)
    scaled[:3, 3] = np.asarray(affine)[:3, 3]
    return short_axis_orientation(scaled, tuple(shape[:3]))


def check_image(image: np.ndarray, path: str | Path) -> None:
    """Reject images with NaN/Inf or a single intensity value."""
    finite = np.isfinite(image)
    if not finite.all():
        raise DataError(path, f"image holds {int(image.size - finite.sum())} NaN/Inf values")
    low, high = float(image.min()), float(image.max())
    if low == high:
        raise DataError(path, f"image is constant (every voxel is {low:g})")


def mask_to_uint8(data: np.ndarray, path: str | Path) -> np.ndarray:
    """Check that a stored mask holds only the labels 0-3 and return it as uint8."""
    if not np.issubdtype(data.dtype, np.integer) and not np.issubdtype(data.dtype, np.bool_):
        data = np.asarray(data, dtype=np.float64)
        if not np.isfinite(data).all():
            raise DataError(path, "mask holds NaN/Inf values")
        fractional = data != np.round(data)
        if fractional.any():
            raise DataError(path, f"mask holds non-integer values (e.g. {data[fractional].flat[0]:g})")
    values = np.unique(data)
    bad = [v for v in values.tolist() if v not in MASK_LABELS]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise DataError(path, f"mask holds values outside {{0, 1, 2, 3}}: {shown}")
    return data.astype(np.uint8)


def volume_from_native(
    image: np.ndarray,
    affine: np.ndarray,
    zooms: tuple[float, ...],
    source: str | Path,
    mask: Optional[np.ndarray] = None,
    phase: Optional[str] = None,
) -> Volume:
    """Build a canonical :class:`Volume` from arrays in the file's own axis order.

    ``image`` is converted to float32 and ``mask`` (already checked, uint8) follows the image's
    orientation; ``zooms`` are the voxel sizes of the file axes.
    """
    orientation = orientation_for(affine, zooms, image.shape)
    axes = [int(a) for a in orientation[:, 0]]
    canonical_image = np.ascontiguousarray(to_canonical(image, orientation), dtype=np.float32)
    canonical_mask = None if mask is None else np.ascontiguousarray(to_canonical(mask, orientation), dtype=np.uint8)
    return Volume(
        image=canonical_image,
        spacing=tuple(float(zooms[a]) for a in axes),
        affine=np.asarray(affine, dtype=float),
        mask=canonical_mask,
        orientation=orientation,
        source=str(source),
        phase=phase,
    )


def read_nifti_volume(
    image_path: str | Path, mask_path: str | Path | None = None, phase: Optional[str] = None
) -> Volume:
    """Read a 3D image (and optionally its label mask) into a canonical :class:`Volume`.

    The image becomes float32 and the mask uint8, whatever their stored dtypes. The mask is
    assumed to share the image's voxel grid; its shape must match.
    """
    data, affine, zooms = load_nifti(image_path, ndim=3)
    image = data.astype(np.float32)
    check_image(image, image_path)
    mask = None
    if mask_path is not None:
        mask_data, _, _ = load_nifti(mask_path, ndim=3)
        if mask_data.shape != image.shape:
            problem = f"mask shape {mask_data.shape} differs from image shape {image.shape} of {Path(image_path).name}"
            raise DataError(mask_path, problem)
        mask = mask_to_uint8(mask_data, mask_path)
    return volume_from_native(image, affine, zooms, image_path, mask=mask, phase=phase)


def read_nifti_4d(path: str | Path) -> list[Volume]:
    """Read a 4D cine file ``(X, Y, Z, T)`` into one unlabeled Volume per frame.

    Frames are named like ACDC's files, from 1: ``"frame01"``, ``"frame02"``, ...
    """
    data, affine, zooms = load_nifti(path, ndim=4)
    volumes = []
    for t in range(data.shape[3]):
        frame = data[..., t].astype(np.float32)
        name = f"frame{t + 1:02d}"
        try:
            check_image(frame, path)
        except DataError as exc:
            raise DataError(path, f"{name}: {exc.problem}") from None
        volumes.append(volume_from_native(frame, affine, zooms[:3], path, phase=name))
    return volumes
