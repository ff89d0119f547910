"""Readers on the real ACDC training set (Bernard et al., IEEE TMI 37(11):2514-2525, 2018).

Skipped when the data is absent. Set PIX2REP_ACDC to the training folder to use another copy.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pix2rep.data.check import describe_dataset
from pix2rep.data.discover import load_dataset

ACDC_TRAINING = Path(
    os.environ.get("PIX2REP_ACDC") or Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc" / "training"
)

pytestmark = [
    pytest.mark.acdc,
    pytest.mark.skipif(
        not ACDC_TRAINING.is_dir(), reason=f"ACDC training data not found at {ACDC_TRAINING} (set PIX2REP_ACDC)"
    ),
]


@pytest.fixture(scope="module")
def acdc():
    """All 100 patients, loaded once (about 3 s)."""
    return load_dataset(ACDC_TRAINING)


def test_patients_and_groups(acdc):
    assert acdc.layout == "acdc" and acdc.problems == []
    assert len(acdc.patients) == 100
    assert [p.id for p in acdc.patients] == [f"patient{k:03d}" for k in range(1, 101)]
    assert Counter(p.group for p in acdc.patients) == {"DCM": 20, "HCM": 20, "MINF": 20, "NOR": 20, "RV": 20}


def test_every_patient_has_labeled_ed_and_es(acdc):
    for patient in acdc.patients:
        assert list(patient.volumes) == ["ED", "ES"], patient.id
        for phase, volume in patient.volumes.items():
            assert volume.phase == phase
            assert volume.mask is not None and volume.mask.shape == volume.image.shape
            assert volume.image.dtype == np.float32 and volume.mask.dtype == np.uint8
            assert 6 <= volume.image.shape[0] <= 21, (patient.id, volume.image.shape)
            slice_spacing, *in_plane = volume.spacing
            assert 5.0 <= slice_spacing <= 10.0 and all(0.6 <= s <= 2.0 for s in in_plane), volume.spacing
            assert np.isfinite(volume.image).all()


def test_patient090_frames_from_info_cfg(acdc):
    patient = next(p for p in acdc.patients if p.id == "patient090")
    assert patient.group == "RV"
    assert patient.info["ED"] == 4 and patient.info["ES"] == 11 and patient.info["NbFrame"] == 12
    assert patient.volumes["ED"].source.endswith("patient090_frame04.nii.gz")
    assert patient.volumes["ES"].source.endswith("patient090_frame11.nii.gz")
    assert patient.volumes["ED"].image.shape == (7, 154, 224)
    assert patient.volumes["ED"].spacing == pytest.approx((10.0, 1.7857, 1.7857), abs=1e-4)


def test_label_values_are_exactly_the_four_classes(acdc):
    for patient in acdc.patients:
        for volume in patient.volumes.values():
            counts = np.bincount(volume.mask.ravel(), minlength=4)
            assert len(counts) == 4 and (counts > 0).all(), (patient.id, volume.phase, counts)


def test_report(acdc):
    report = describe_dataset(acdc)
    assert "patients:  100" in report
    assert "groups:    DCM 20, HCM 20, MINF 20, NOR 20, RV 20" in report
    assert "volumes:   200 (200 labeled)" in report
    assert "labels:    0, 1, 2, 3" in report
