"""DICOM folder reader, on small synthetic cine series written with pydicom."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pix2rep.data.dicom import read_dicom_folder
from pix2rep.data.discover import load_dataset
from pix2rep.errors import DataError

ROWS, COLS = 8, 10
ROW_SPACING, COL_SPACING, SLICE_GAP = 1.25, 1.5, 8.0
SLOPE, INTERCEPT = 0.5, -100.0
TRIGGERS = (0.0, 412.5)
# An oblique short-axis plane: direction of increasing column, then of increasing row (LPS).
ALONG_ROW = np.array([0.8, 0.6, 0.0])
ALONG_COL = np.array([0.0, 0.0, -1.0])
NORMAL = np.cross(ALONG_ROW, ALONG_COL)


def stored_pixels(phase: int, slice_index: int) -> np.ndarray:
    """Stored values encode phase and slice, so order mistakes show up."""
    base = 1000 * phase + 100 * slice_index
    return (base + np.arange(ROWS * COLS).reshape(ROWS, COLS)).astype(np.uint16)


def write_slice(path, series_uid, phase, slice_index, n_slices, description="cine SA", trigger=True, iop=None):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientID = "anon"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = description
    ds.Rows, ds.Columns = ROWS, COLS
    ds.PixelSpacing = [ROW_SPACING, COL_SPACING]
    ds.ImageOrientationPatient = list(ALONG_ROW) + list(ALONG_COL) if iop is None else iop
    origin = np.array([10.0, -20.0, 30.0])
    # Slices are numbered against the normal, so that file names and positions disagree.
    ds.ImagePositionPatient = [float(v) for v in origin - NORMAL * SLICE_GAP * (n_slices - 1 - slice_index)]
    if trigger:
        ds.TriggerTime = TRIGGERS[phase]
    ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = stored_pixels(phase, slice_index).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def write_series(folder, n_phases=2, n_slices=6, series_uid=None, description="cine SA", seed=0, **kwargs):
    """Write a series in shuffled order, plus a non-DICOM file; returns the series UID."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    jobs = [(p, s) for p in range(n_phases) for s in range(n_slices)]
    random.Random(seed).shuffle(jobs)
    for k, (p, s) in enumerate(jobs):
        write_slice(folder / f"IM{seed}_{k:04d}", series_uid, p, s, n_slices, description, **kwargs)
    (folder / "README.txt").write_text("not DICOM")
    return series_uid


def expected_native(phase: int, n_slices: int = 6) -> np.ndarray:
    """(rows, columns, slices) in increasing position along the normal, rescaled."""
    return np.stack([stored_pixels(phase, s) * SLOPE + INTERCEPT for s in range(n_slices)], axis=-1)


def test_two_phases_round_trip(tmp_path):
    write_series(tmp_path / "study")
    volumes = read_dicom_folder(tmp_path / "study")
    assert [v.phase for v in volumes] == ["t=0ms", "t=412.5ms"]
    for phase, vol in enumerate(volumes):
        assert vol.image.shape == (6, COLS, ROWS) and vol.image.dtype == np.float32
        assert vol.spacing == pytest.approx((SLICE_GAP, COL_SPACING, ROW_SPACING))
        assert vol.mask is None
        np.testing.assert_array_equal(vol.to_native(vol.image), expected_native(phase))
        # The normal is (0.6, -0.8, 0) in RAS, mostly -y, so canonical Z (towards +y) runs
        # against it: canonical slice z is slice 5 - z.
        expected_minima = [(1000 * phase + 100 * (5 - z)) * SLOPE + INTERCEPT for z in range(6)]
        assert [vol.image[z].min() for z in range(6)] == expected_minima


def test_affine_maps_voxels_to_ras_world(tmp_path):
    write_series(tmp_path / "study", n_phases=1)
    vol = read_dicom_folder(tmp_path / "study")[0]
    # Native voxel (row 2, column 3, slice 5) is slice 5's position + 3 columns + 2 rows, in LPS.
    lps = np.array([10.0, -20.0, 30.0]) + 3 * COL_SPACING * ALONG_ROW + 2 * ROW_SPACING * ALONG_COL
    ras = vol.affine @ np.array([2, 3, 5, 1.0])
    np.testing.assert_allclose(ras[:3], lps * np.array([-1, -1, 1]), atol=1e-6)


def test_without_trigger_time_single_phase(tmp_path):
    write_series(tmp_path / "study", n_phases=1, trigger=False)
    volumes = read_dicom_folder(tmp_path / "study")
    assert [v.phase for v in volumes] == ["phase00"]
    np.testing.assert_array_equal(volumes[0].to_native(volumes[0].image), expected_native(0))


def test_mixed_series_error_lists_both_and_series_uid_picks_one(tmp_path):
    first = write_series(tmp_path / "study", description="cine SA", seed=1)
    second = write_series(tmp_path / "study" / "sub", n_phases=1, description="localizer", seed=2)
    with pytest.raises(DataError) as info:
        read_dicom_folder(tmp_path / "study")
    message = str(info.value)
    assert message.startswith(str(tmp_path / "study")) and "holds 2 DICOM series" in message
    assert f"{first} ('cine SA', 12 files)" in message and f"{second} ('localizer', 6 files)" in message
    assert "series_uid=" in message
    assert len(read_dicom_folder(tmp_path / "study", series_uid=second)) == 1
    assert len(read_dicom_folder(tmp_path / "study", series_uid=first)) == 2


def test_load_dataset_dicom_one_patient_per_subfolder(tmp_path):
    write_series(tmp_path / "root" / "anna", seed=1)
    write_series(tmp_path / "root" / "ben", n_phases=1, seed=2)
    ds = load_dataset(tmp_path / "root")
    assert ds.layout == "dicom"
    assert [(p.id, list(p.volumes)) for p in ds.patients] == [("anna", ["t=0ms", "t=412.5ms"]), ("ben", ["t=0ms"])]


@pytest.mark.parametrize("problem", ["empty", "missing_slice", "orientation", "unreadable", "no_trigger"])
def test_bad_series(tmp_path, problem):
    folder = tmp_path / "study"
    if problem == "empty":
        folder.mkdir()
        (folder / "notes.txt").write_text("x")
        expected = "holds no DICOM image files (1 other files skipped)"
    elif problem == "missing_slice":
        write_series(folder)
        victim = next(f for f in sorted(folder.iterdir()) if f.name.startswith("IM"))
        victim.unlink()
        expected = "phases have different numbers of slices"
    elif problem == "orientation":
        uid = write_series(folder, n_phases=1)
        write_slice(folder / "tilted", uid, 0, 0, 6, iop=[1, 0, 0, 0, 1, 0])
        expected = "inconsistent ImageOrientationPatient"
    elif problem == "unreadable":
        write_series(folder)
        victim = next(f for f in sorted(folder.iterdir()) if f.name.startswith("IM"))
        victim.write_bytes(victim.read_bytes()[:-50])  # pixel data cut short
        expected = f"{victim.name}: cannot decode pixel data"
    else:  # two phases, no TriggerTime to separate them
        write_series(folder, trigger=False)
        expected = "no TriggerTime to tell phases apart"
    with pytest.raises(DataError) as info:
        read_dicom_folder(folder)
    assert expected in str(info.value) and str(folder) in str(info.value) and "\n" not in str(info.value)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="nowhere: does not exist"):
        read_dicom_folder(tmp_path / "nowhere")
