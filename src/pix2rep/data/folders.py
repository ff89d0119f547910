"""Generic NIfTI layouts: nnU-Net raw dataset folders and plain folders of images.

- nnU-Net: ``imagesTr/CASE_0000.nii.gz`` with ``labelsTr/CASE.nii.gz`` (labeled), and
  ``imagesTs/CASE_0000.nii.gz`` (unlabeled). One Patient per case, volumes ``{"image": ...}``.
- A folder of ``*.nii`` / ``*.nii.gz`` images: one unlabeled Patient per file, its id the
  file name without the suffix.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import DataError
from .nifti import is_nifti_path, nifti_stem, read_nifti_volume
from .volume import Patient

NNUNET_IMAGE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class NnunetCase:
    """One nnU-Net case: its id, channel-0 image and label file (None for imagesTs)."""

    id: str
    image: Path
    label: Optional[Path]


def is_nnunet_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / "imagesTr").is_dir() or (path / "imagesTs").is_dir()


def _nifti_files(folder: Path) -> list[Path]:
    """The NIfTI files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti_path(p))


def _channel0_images(folder: Path) -> dict[str, Path]:
    """``{case: CASE_0000 file}`` of an images folder; warns about extra channels."""
    images, extra_channels = {}, []
    for path in _nifti_files(folder):
        match = NNUNET_IMAGE.match(nifti_stem(path))
        if match is None:
            raise DataError(path, "image name does not end with a channel number like _0000 (nnU-Net layout)")
        if match["channel"] == "0000":
            images[match["case"]] = path
        else:
            extra_channels.append(path.name)
    if extra_channels:
        warnings.warn(
            f"{folder}: {len(extra_channels)} multi-channel image(s) (e.g. {extra_channels[0]}) ignored; "
            "pix2rep reads channel _0000 only"
        )
    return images


def list_nnunet_cases(root: str | Path) -> list[NnunetCase]:
    """Pair imagesTr with labelsTr and list imagesTs; structural problems raise :class:`DataError`."""
    root = Path(root)
    cases = []
    if (root / "imagesTr").is_dir():
        images = _channel0_images(root / "imagesTr")
        labels_dir = root / "labelsTr"
        labels = {nifti_stem(p): p for p in _nifti_files(labels_dir)} if labels_dir.is_dir() else {}
        for case, label in labels.items():
            if case not in images:
                raise DataError(label, f"label has no image imagesTr/{case}_0000.nii.gz")
        for case, image in images.items():
            if case not in labels:
                raise DataError(image, f"image has no label labelsTr/{case}.nii.gz")
            cases.append(NnunetCase(case, image, labels[case]))
    if (root / "imagesTs").is_dir():
        for case, image in _channel0_images(root / "imagesTs").items():
            cases.append(NnunetCase(case, image, None))
    return cases


def read_nnunet_case(case: NnunetCase) -> Patient:
    volume = read_nifti_volume(case.image, case.label)
    return Patient(id=case.id, volumes={"image": volume})


def read_nnunet_folder(root: str | Path) -> list[Patient]:
    """Every case of an nnU-Net raw dataset folder (labeled imagesTr first, then imagesTs)."""
    return [read_nnunet_case(case) for case in list_nnunet_cases(root)]


def list_nifti_images(folder: str | Path) -> list[Path]:
    """The .nii / .nii.gz files directly inside ``folder``."""
    return _nifti_files(Path(folder))


def read_nifti_image_patient(path: str | Path) -> Patient:
    """One unlabeled image file -> a Patient named after the file."""
    return Patient(id=nifti_stem(path), volumes={"image": read_nifti_volume(path)})


def read_nifti_folder(folder: str | Path) -> list[Patient]:
    """A folder of unlabeled NIfTI images -> one Patient per file."""
    files = list_nifti_images(folder)
    if not files:
        raise DataError(folder, "holds no .nii or .nii.gz files")
    return [read_nifti_image_patient(f) for f in files]
