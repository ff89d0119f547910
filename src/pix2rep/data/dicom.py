"""Reading a folder of single-frame DICOM images (a cine short-axis series) into Volumes.

Files are grouped by SeriesInstanceUID, then by cardiac phase: the images at each slice
position are ordered by TriggerTime and the k-th image of every position forms phase k (trigger
times of one phase differ slightly between slices acquired in separate breath-holds, so they
are not matched exactly). Slices are ordered along the slice normal, and each phase becomes a
3D :class:`Volume` in the same canonical orientation as NIfTI files.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError
from .nifti import check_image, describe_exception, volume_from_native
from .volume import Volume

POSITION_TOLERANCE_MM = 0.01  # images closer than this along the normal share a slice position


def has_dicom_magic(path: str | Path) -> bool:
    """True when the file carries the DICOM preamble marker ``DICM`` at bytes 128-132."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


@dataclass
class DicomScan:
    """DICOM image files found under a folder, grouped by series."""

    folder: Path
    series: dict[str, list[tuple[Path, object]]] = field(default_factory=dict)  # uid -> (file, header)
    skipped: int = 0  # files that are not DICOM images (other files, DICOMDIR, reports, ...)

    def describe_series(self) -> str:
        parts = []
        for uid, items in self.series.items():
            description = str(items[0][1].get("SeriesDescription", "") or "no description")
            parts.append(f"{uid} ({description!r}, {len(items)} files)")
        return "; ".join(parts)


def scan_dicom_folder(path: str | Path) -> DicomScan:
    """Read the headers of every DICOM file under ``path`` (recursively), grouped by series."""
    import pydicom

    folder = Path(path)
    if not folder.exists():
        raise DataError(folder, "does not exist")
    if not folder.is_dir():
        raise DataError(folder, "is not a folder")
    scan = DicomScan(folder)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        if not has_dicom_magic(file):
            scan.skipped += 1
            continue
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types on damaged files
            raise DataError(file, f"cannot read DICOM file ({describe_exception(exc)})") from exc
        if "Rows" not in header or "SeriesInstanceUID" not in header:
            scan.skipped += 1  # not an image (DICOMDIR, structured report, ...)
            continue
        scan.series.setdefault(str(header.SeriesInstanceUID), []).append((file, header))
    if not scan.series:
        raise DataError(folder, f"holds no DICOM image files ({scan.skipped} other files skipped)")
    return scan


def _float_list(header, keyword: str, file: Path, length: int) -> np.ndarray:
    value = header.get(keyword)
    if value is None:
        raise DataError(file, f"has no {keyword}")
    try:
        numbers = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        raise DataError(file, f"{keyword} is not numeric: {value!r}") from None
    if numbers.shape != (length,):
        raise DataError(file, f"{keyword} should hold {length} numbers, got {len(numbers)}")
    return numbers


def _pixels(file: Path) -> np.ndarray:
    """The rescaled pixel array (Rows, Columns) of one file, in float64."""
    import pydicom

    try:
        ds = pydicom.dcmread(file)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DataError(file, "multi-frame (enhanced) DICOM is not supported; export single-frame images")
        array = ds.pixel_array
    except DataError:
        raise
    except Exception as exc:
        raise DataError(file, f"cannot decode pixel data ({describe_exception(exc)})") from exc
    if array.ndim != 2:
        raise DataError(file, f"expected a 2D grey-level image, got pixel array shape {array.shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return array.astype(np.float64) * slope + intercept


def _group_positions(positions: np.ndarray) -> list[list[int]]:
    """Indices of images grouped by slice position (within tolerance), in increasing position."""
    order = np.argsort(positions, kind="stable")
    groups: list[list[int]] = []
    for i in order:
        if groups and positions[i] - positions[groups[-1][0]] < POSITION_TOLERANCE_MM:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return groups


def read_dicom_folder(path: str | Path, series_uid: Optional[str] = None) -> list[Volume]:
    """Read one DICOM series under ``path`` into one 3D Volume per cardiac phase.

    With several series in the folder, ``series_uid`` says which one to read. Phases are named
    ``"t=<TriggerTime>ms"`` or, without TriggerTime, ``"phase00"``. Volumes carry no mask.
    """
    scan = scan_dicom_folder(path)
    folder = scan.folder
    if series_uid is None:
        if len(scan.series) > 1:
            raise DataError(
                folder,
                f"holds {len(scan.series)} DICOM series: {scan.describe_series()}; "
                "pick one with series_uid=<UID> or put each series in its own folder",
            )
        series_uid = next(iter(scan.series))
    if series_uid not in scan.series:
        raise DataError(folder, f"has no series {series_uid}; found: {scan.describe_series()}")
    items = scan.series[series_uid]

    files = [f for f, _ in items]
    headers = [h for _, h in items]
    orientations = [_float_list(h, "ImageOrientationPatient", f, 6) for f, h in items]
    if not all(np.allclose(o, orientations[0], atol=1e-4) for o in orientations):
        raise DataError(folder, f"series {series_uid} has inconsistent ImageOrientationPatient between files")
    pixel_spacing = [_float_list(h, "PixelSpacing", f, 2) for f, h in items]
    if not all(np.allclose(s, pixel_spacing[0], atol=1e-4) for s in pixel_spacing):
        raise DataError(folder, f"series {series_uid} has inconsistent PixelSpacing between files")
    sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(sizes) > 1:
        raise DataError(folder, f"series {series_uid} mixes image sizes {sorted(sizes)}")

    along_row = orientations[0][:3]  # direction of increasing column index
    along_column = orientations[0][3:]  # direction of increasing row index
    normal = np.cross(along_row, along_column)
    positions = np.array([_float_list(h, "ImagePositionPatient", f, 3) @ normal for f, h in items])
    slices = _group_positions(positions)

    # Phases: the k-th image (by TriggerTime) at every slice position.
    has_trigger = all("TriggerTime" in h and h.TriggerTime not in (None, "") for h in headers)
    if not has_trigger and any(len(s) > 1 for s in slices):
        raise DataError(
            folder,
            f"series {series_uid}: several images share a slice position "
            "and there is no TriggerTime to tell phases apart",
        )
    counts = sorted({len(s) for s in slices})
    if len(counts) > 1:
        raise DataError(
            folder,
            f"series {series_uid}: phases have different numbers of slices (slice positions hold {counts} images)",
        )
    if has_trigger:
        slices = [sorted(s, key=lambda i: float(headers[i].TriggerTime)) for s in slices]
    n_phases = counts[0]

    sorted_positions = np.array([positions[s[0]] for s in slices])
    if len(sorted_positions) > 1:
        gaps = np.diff(sorted_positions)
        slice_spacing = float(np.median(gaps))
        if np.abs(gaps - slice_spacing).max() > 0.1 * slice_spacing:
            warnings.warn(f"{folder}: uneven slice spacing ({gaps.min():.2f}-{gaps.max():.2f} mm), using the median")
    else:
        slice_spacing = float(headers[0].get("SpacingBetweenSlices") or headers[0].get("SliceThickness") or 1.0)
    row_spacing, column_spacing = (float(v) for v in pixel_spacing[0])

    # Native array axes are (row, column, slice), so that equal spacings leave slices last.
    first = _float_list(headers[slices[0][0]], "ImagePositionPatient", files[slices[0][0]], 3)
    affine = np.eye(4)
    affine[:3, 0] = along_column * row_spacing
    affine[:3, 1] = along_row * column_spacing
    affine[:3, 2] = normal * slice_spacing
    affine[:3, 3] = first
    affine[:2] *= -1  # DICOM world is LPS, NIfTI's is RAS
    zooms = (row_spacing, column_spacing, slice_spacing)

    volumes, names = [], set()
    for k in range(n_phases):
        members = [s[k] for s in slices]
        image = np.stack([_pixels(files[i]) for i in members], axis=-1).astype(np.float32)
        if has_trigger:
            trigger = float(np.median([float(headers[i].TriggerTime) for i in members]))
            phase = f"t={round(trigger, 1):g}ms"
        if not has_trigger or phase in names:  # equal trigger times still need distinct names
            phase = f"phase{k:02d}"
        names.add(phase)
        check_image(image, f"{folder} ({phase})")
        volumes.append(volume_from_native(image, affine, zooms, folder, phase=phase))
    return volumes
