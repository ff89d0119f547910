"""A small end-to-end run on real ACDC patients: pretrain -> train -> predict on NIfTI."""

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import ACDC_TRAINING, needs_acdc
from pix2rep.cli import main

pytestmark = [needs_acdc, pytest.mark.acdc, pytest.mark.slow]

PATIENTS = ("patient001", "patient021", "patient041", "patient061", "patient081")  # one per group


@pytest.fixture(scope="module")
def small_acdc(tmp_path_factory):
    """Five real patients, linked (not copied) into a temporary ACDC folder."""
    root = tmp_path_factory.mktemp("acdc") / "training"
    root.mkdir()
    for pid in PATIENTS:
        (root / pid).symlink_to(ACDC_TRAINING / pid, target_is_directory=True)
    return root


def test_pretrain_train_predict(small_acdc, tmp_path):
    pre, seg = tmp_path / "pre", tmp_path / "seg"
    assert main(["pretrain", "--data", str(small_acdc), "--preset", "tiny", "--epochs", "1", "--out", str(pre), "--no-progress"]) == 0
    assert main(["train", "--data", str(small_acdc), "--preset", "tiny", "--patient-ids", "patient001,patient021,patient041,patient061",
                 "--steps", "150", "--out", str(seg), "--no-progress"]) == 0
    image = ACDC_TRAINING / "patient081" / "patient081_frame01.nii.gz"  # not a training patient
    out = tmp_path / "pred"
    assert main(["predict", "-i", str(image), "-o", str(out), "-m", str(seg), "--overlay", str(tmp_path / "png")]) == 0
    pred_img = nib.load(out / "patient081_frame01.nii.gz")
    src = nib.load(image)
    assert pred_img.shape == src.shape
    np.testing.assert_allclose(pred_img.affine, src.affine)
    np.testing.assert_allclose(pred_img.header.get_zooms(), src.header.get_zooms())
    pred = np.asarray(pred_img.dataobj)
    assert set(np.unique(pred)) <= {0, 1, 2, 3}
    gt = np.asarray(nib.load(ACDC_TRAINING / "patient081" / "patient081_frame01_gt.nii.gz").dataobj)
    heart_pred, heart_gt = pred > 0, gt > 0
    overlap = 2 * (heart_pred & heart_gt).sum() / (heart_pred.sum() + heart_gt.sum())
    assert overlap > 0.2, f"predicted heart overlaps the ground truth with Dice {overlap:.3f}"
    sidecar = json.loads((out / "patient081_frame01.json").read_text())
    assert sidecar["config"]["preset"] == "tiny" and "pix2rep" in sidecar["versions"]
    assert (tmp_path / "png" / "patient081_frame01.png").is_file()
    # outputs are never written over inputs, and an existing output folder is refused
    assert main(["predict", "-i", str(image), "-o", str(out), "-m", str(seg)]) == 2
    assert main(["predict", "-i", str(image.parent), "-o", str(image.parent), "-m", str(seg)]) == 2
