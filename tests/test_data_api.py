"""The library side of the ``data`` and ``features`` commands: ROI containment, and previews and
feature pictures that never replace a file unasked. (Choosing patients and splits: test_sampling.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pix2rep.data.check import format_roi_containment, roi_containment, write_preview
from pix2rep.data.discover import load_dataset
from pix2rep.data.synthetic import write_synthetic_dataset
from pix2rep.errors import DataError, OutputExistsError

# -- data roi -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_patients(tmp_path_factory):
    return load_dataset(write_synthetic_dataset(tmp_path_factory.mktemp("roi") / "data", n_patients=3, seed=0))


def test_roi_containment_counts_volumes_with_and_without_the_other_phase(three_patients):
    result = roi_containment(three_patients, progress=True)
    assert result["counts"] == {"single volume": (5, 6), "with the other phase": (6, 6)}
    assert [(way, source.split("/")[-1]) for way, source in result["misses"]] == [
        ("single volume", "patient001_frame14.nii.gz")]
    report = format_roi_containment(result).splitlines()
    assert report[:3] == [
        "label-free ROI: 220 mm field of view, 128 px",
        "  single volume: whole heart inside the ROI in 5/6 volumes (83.3 %)",
        "  with the other phase: whole heart inside the ROI in 6/6 volumes (100.0 %)",
    ]
    assert report[3].startswith("  missed (single volume: ") and len(report) == 4
    narrow = roi_containment(three_patients, fov_mm=60)  # smaller than any heart here
    assert narrow["fov_mm"] == 60 and narrow["counts"]["with the other phase"] == (0, 6)


def test_roi_containment_without_labels_names_the_dataset(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((40, 40, 6)).astype(np.float32), np.eye(4)),
             str(tmp_path / "scan.nii.gz"))
    with pytest.raises(DataError) as refused:
        roi_containment(load_dataset(tmp_path))
    assert str(refused.value) == f"{tmp_path}: no labeled volume: ROI containment needs ground truth"


def test_write_preview_refuses_an_existing_file_unless_overwrite(three_patients, tmp_path):
    png = tmp_path / "preview.png"
    png.write_bytes(b"mine")
    with pytest.raises(OutputExistsError) as refused:
        write_preview(three_patients, png)
    assert str(refused.value) == f"{png}: already exists; pass --overwrite to replace it"
    assert png.read_bytes() == b"mine"
    assert write_preview(three_patients, png, n_patients=1, n_slices=2, overwrite=True) == png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_feature_pca_refuses_an_existing_file_unless_overwrite(three_patients, tmp_path):
    from pix2rep.config import preset_config
    from pix2rep.evaluation.features import write_feature_pca
    from pix2rep.models import SegmentationModel, UNet
    from pix2rep.training.downstream import save_segmentation_checkpoint

    cfg = preset_config("tiny")
    torch.manual_seed(0)
    save_segmentation_checkpoint(tmp_path / "model.pt", SegmentationModel(UNet(cfg.model)), cfg, {})
    volume = three_patients.patients[0].volumes["ED"].source
    png = tmp_path / "features.png"
    png.write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite to replace it"):
        write_feature_pca(volume, tmp_path / "model.pt", png)
    assert png.read_bytes() == b"mine"
    assert write_feature_pca(volume, tmp_path / "model.pt", png, n_slices=2, overwrite=True) == png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
