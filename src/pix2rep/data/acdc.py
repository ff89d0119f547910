"""The ACDC layout: ``patientXXX/`` folders with Info.cfg, ED/ES frames and their ``_gt`` masks.

Cite Bernard et al., IEEE TMI 37(11):2514-2525, 2018 whenever this data is used.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from ..errors import DataError
from .nifti import describe_exception, read_nifti_4d, read_nifti_volume
from .volume import Patient, Volume

PATIENT_FOLDER = re.compile(r"^patient\d{3}$")

INT_KEYS = ("ED", "ES", "NbFrame")
FLOAT_KEYS = ("Height", "Weight")
# Group is optional: ACDC's testing Info.cfg files did not always carry it.
REQUIRED_KEYS = INT_KEYS + FLOAT_KEYS


def is_acdc_patient_folder(path: str | Path) -> bool:
    """True for a folder named ``patientXXX`` (three digits)."""
    path = Path(path)
    return path.is_dir() and PATIENT_FOLDER.match(path.name) is not None


def parse_info_cfg(path: str | Path) -> dict:
    """Parse an ACDC ``Info.cfg`` (``Key: value`` lines).

    Returns ED, ES, NbFrame as int, Height and Weight as float, Group as str (None if absent),
    and any other key as its string value.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "does not exist" if not path.exists() else "is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read Info.cfg ({describe_exception(exc)})") from exc
    raw = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            raise DataError(path, f"line {number} is not 'Key: value': {line.strip()!r}")
        raw[key.strip()] = value.strip()
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise DataError(path, f"missing key(s): {', '.join(missing)}")
    info: dict = dict(raw)
    for key in INT_KEYS + FLOAT_KEYS:
        try:
            number = float(raw[key])
        except ValueError:
            raise DataError(path, f"{key} is not a number: {raw[key]!r}") from None
        if key in INT_KEYS:
            if number != int(number):
                raise DataError(path, f"{key} is not a whole number: {raw[key]!r}")
            number = int(number)
        info[key] = number
    info["Group"] = raw.get("Group") or None
    for key in ("ED", "ES"):
        if not 1 <= info[key] <= info["NbFrame"]:
            raise DataError(path, f"{key} frame {info[key]} is outside 1..NbFrame={info['NbFrame']}")
    return info


def _frame_file(folder: Path, patient_id: str, frame: int, suffix: str = "") -> Path:
    """``patientXXX_frameNN[_gt].nii.gz``, or the uncompressed .nii if only that exists."""
    stem = f"{patient_id}_frame{frame:02d}{suffix}"
    gz = folder / f"{stem}.nii.gz"
    plain = folder / f"{stem}.nii"
    return plain if not gz.exists() and plain.exists() else gz


def read_acdc_patient(folder: str | Path, include_4d: bool = False) -> Patient:
    """Read one ACDC patient folder into a :class:`Patient` with volumes ``{"ED", "ES"}``.

    Masks come from the ``_gt`` files where present. With ``include_4d`` and a
    ``patientXXX_4d.nii.gz`` file, the cine frames other than ED and ES go to ``unlabeled``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "does not exist" if not folder.exists() else "is not a folder")
    patient_id = folder.name
    info = parse_info_cfg(folder / "Info.cfg")
    volumes: dict[str, Volume] = {}
    for phase in ("ED", "ES"):
        frame = info[phase]
        image = _frame_file(folder, patient_id, frame)
        if not image.exists():
            raise DataError(image, f"does not exist (Info.cfg gives {phase} as frame {frame:02d})")
        mask = _frame_file(folder, patient_id, frame, "_gt")
        volumes[phase] = read_nifti_volume(image, mask if mask.exists() else None, phase=phase)
    unlabeled: list[Volume] = []
    cine = folder / f"{patient_id}_4d.nii.gz"
    if include_4d and cine.exists():
        frames = read_nifti_4d(cine)
        if len(frames) != info["NbFrame"]:
            warnings.warn(f"{cine}: {len(frames)} frames, Info.cfg says NbFrame={info['NbFrame']}")
        unlabeled = [v for t, v in enumerate(frames, start=1) if t not in (info["ED"], info["ES"])]
    group = info.pop("Group")
    return Patient(id=patient_id, volumes=volumes, group=group, info=info, unlabeled=unlabeled)


def list_acdc_patient_folders(root: str | Path) -> list[Path]:
    """The ``patientXXX`` folders directly inside ``root``, sorted by name."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if is_acdc_patient_folder(p))
