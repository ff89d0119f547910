"""Find out what a path holds (ACDC, nnU-Net, NIfTI images, DICOM) and load it as patients."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import DataError
from .acdc import is_acdc_patient_folder, list_acdc_patient_folders, read_acdc_patient
from .dicom import has_dicom_magic, read_dicom_folder
from .folders import is_nnunet_folder, list_nifti_images, list_nnunet_cases, read_nifti_image_patient, read_nnunet_case
from .nifti import is_nifti_path
from .volume import Patient

LAYOUTS = ("acdc", "nnunet", "nifti-folder", "nifti-file", "dicom")
EXPECTED = (
    "expected ACDC patientXXX folders (or training/ and testing/ folders holding them), "
    "an nnU-Net folder (imagesTr/, labelsTr/, imagesTs/), .nii/.nii.gz files or DICOM files"
)


@dataclass
class Dataset:
    """Patients read from ``root``, the layout recognised, and problems met on the way."""

    root: str
    layout: str
    patients: list[Patient]
    problems: list[str] = field(default_factory=list)


def _acdc_folders(root: Path) -> list[Path]:
    """ACDC patient folders of ``root``: its own patientXXX subfolders, or those of training/ and testing/."""
    if is_acdc_patient_folder(root) and (root / "Info.cfg").exists():
        return [root]
    folders = list_acdc_patient_folders(root)
    if folders:
        return folders
    for split in ("training", "testing"):
        if (root / split).is_dir():
            folders += list_acdc_patient_folders(root / split)
    return folders


def _first_dicom_file(folder: Path):
    return next((p for p in folder.rglob("*") if p.is_file() and has_dicom_magic(p)), None)


def _dicom_patient(folder: Path) -> Patient:
    volumes = read_dicom_folder(folder)
    return Patient(id=folder.name, volumes={v.phase: v for v in volumes})


def _dicom_patient_folders(root: Path) -> list[Path]:
    """The root itself when it holds DICOM files directly, else each subfolder holding some."""
    if any(p.is_file() and has_dicom_magic(p) for p in root.iterdir()):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and _first_dicom_file(p) is not None)


def _plan(root: Path, include_4d: bool) -> tuple[str, list[Callable[[], Patient]]]:
    """The layout of ``root`` and one loader per patient, without reading any image."""
    if root.is_file():
        if is_nifti_path(root):
            return "nifti-file", [lambda: read_nifti_image_patient(root)]
        raise DataError(root, "is a file but not a .nii/.nii.gz image; " + EXPECTED)
    acdc = _acdc_folders(root)
    if acdc:
        return "acdc", [lambda f=f: read_acdc_patient(f, include_4d=include_4d) for f in acdc]
    if is_nnunet_folder(root):
        cases = list_nnunet_cases(root)
        if not cases:
            raise DataError(root, "nnU-Net folder holds no images (CASE_0000.nii.gz) in imagesTr/ or imagesTs/")
        return "nnunet", [lambda c=c: read_nnunet_case(c) for c in cases]
    images = list_nifti_images(root)
    if images:
        return "nifti-folder", [lambda f=f: read_nifti_image_patient(f) for f in images]
    if _first_dicom_file(root) is not None:
        folders = _dicom_patient_folders(root)
        return "dicom", [lambda f=f: _dicom_patient(f) for f in folders]
    if not any(root.iterdir()):
        raise DataError(root, "is an empty folder; " + EXPECTED)
    raise DataError(root, "holds nothing recognisable; " + EXPECTED)


def load_dataset(path: str | Path, include_4d: bool = False, on_error: str = "raise") -> Dataset:
    """Detect the layout of ``path`` and read every patient.

    ``on_error="raise"`` stops at the first bad patient; ``"skip"`` leaves it out, records its
    one-line problem in ``Dataset.problems`` and warns once with the count.
    ``include_4d`` adds ACDC's 4D cine frames (other than ED/ES) as unlabeled volumes.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    root = Path(path)
    if not root.exists():
        raise DataError(root, "does not exist")
    layout, plan = _plan(root, include_4d)
    patients, problems = [], []
    for load in plan:
        try:
            patients.append(load())
        except DataError as exc:
            if on_error == "raise":
                raise
            problems.append(str(exc))
    if problems:
        warnings.warn(f"{root}: {len(problems)} of {len(plan)} patients skipped because of data problems")
        if not patients:
            raise DataError(root, f"no patient could be read; first problem: {problems[0]}")
    return Dataset(root=str(root), layout=layout, patients=patients, problems=problems)
