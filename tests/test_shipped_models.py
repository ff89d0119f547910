"""The shipped models: listed, verified by SHA-256, loadable by name everywhere, and in
agreement with MODEL_CARD.md on real patients."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pix2rep import shipped
from pix2rep.checkpoints import load_backbone, load_segmentation_model
from pix2rep.cli import main
from pix2rep.errors import Pix2RepError
from pix2rep.shipped import file_sha256, shipped_model_path, shipped_models

from conftest import ACDC_TRAINING, needs_acdc

ROOT = Path(__file__).resolve().parents[1]
MODELS = shipped_models()
BY_KIND = {m.kind: m.name for m in MODELS}


def test_at_least_a_backbone_and_a_segmentation_model_ship():
    assert {"backbone", "segmentation"} <= set(BY_KIND)


@pytest.mark.parametrize("model", MODELS, ids=[m.name for m in MODELS])
def test_each_shipped_file_is_small_and_matches_its_recorded_sha256(model):
    assert model.path.is_file()
    assert model.path.stat().st_size <= 10 * 1024 * 1024
    assert file_sha256(model.path) == model.sha256
    assert shipped_model_path(model.name) == model.path
    # weights only: loads with weights_only=True and holds tensors, a config, no optimiser state
    payload = torch.load(model.path, map_location="cpu", weights_only=True)
    assert "config" in payload and "backbone" in payload and "optimizer" not in payload


def test_models_command_lists_every_shipped_model(capsys):
    assert main(["models"]) == 0
    printed = capsys.readouterr().out
    for m in MODELS:
        assert m.name in printed and m.kind in printed


def test_unknown_name_is_one_line_listing_the_shipped_names(capsys, tmp_path):
    assert main(["predict", "-i", str(tmp_path / "x.nii.gz"), "-o", str(tmp_path / "y.nii.gz"), "-m", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no-such-model" in err
    for m in MODELS:
        assert m.name in err


def test_a_changed_file_is_refused(tmp_path, monkeypatch):
    model = MODELS[0]
    copy = tmp_path / model.file
    data = bytearray(model.path.read_bytes())
    data[-100] ^= 0xFF
    copy.write_bytes(bytes(data))
    (tmp_path / "models.json").write_text(shipped.REGISTRY.read_text())
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(shipped, "REGISTRY", tmp_path / "models.json")
    monkeypatch.setattr(shipped, "_verified", set())
    with pytest.raises(Pix2RepError, match="SHA-256 .* differs"):
        shipped_model_path(model.name)


def test_shipped_backbone_gives_finite_features_on_a_synthetic_slice():
    backbone, cfg, _ = load_backbone(BY_KIND["backbone"])
    size = cfg.preprocess.size
    with torch.no_grad():
        features = backbone.eval()(torch.rand(2, 1, size, size))
    assert features.shape == (2, cfg.model.out_channels, size, size)
    assert torch.isfinite(features).all()


def test_shipped_segmentation_model_predicts_a_synthetic_volume(synthetic_root, tmp_path):
    scan = sorted(synthetic_root.glob("patient001/patient001_frame??.nii.gz"))[0]
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "-i", str(scan), "-o", str(out), "-m", BY_KIND["segmentation"], "--device", "cpu"]) == 0
    prediction, image = nib.load(out), nib.load(scan)
    labels = np.asarray(prediction.dataobj)
    assert labels.shape == image.shape and set(np.unique(labels)) <= {0, 1, 2, 3}
    assert np.allclose(prediction.affine, image.affine)


def test_features_and_evaluate_take_shipped_names(synthetic_root, tmp_path):
    scan = sorted(synthetic_root.glob("patient001/patient001_frame??.nii.gz"))[0]
    assert main(["features", "-i", str(scan), "-m", BY_KIND["backbone"], "-o", str(tmp_path / "f.png"), "--slices", "1"]) == 0
    assert (tmp_path / "f.png").stat().st_size > 0
    assert main(["evaluate", "-m", BY_KIND["segmentation"], "--data", str(synthetic_root), "--split", "all",
                 "--out", str(tmp_path / "ev"), "--no-progress", "--device", "cpu"]) == 0
    assert (tmp_path / "ev" / "summary.json").is_file()


def test_shipped_backbone_fine_tunes_by_name(synthetic_root, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", "-m", BY_KIND["backbone"], "--data", str(synthetic_root), "--patients", "1", "--steps", "2",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    net, cfg, _ = load_segmentation_model(out)
    backbone = next(m for m in MODELS if m.kind == "backbone")
    assert Path(cfg.pretrained) == backbone.path


def _card_rows() -> dict[tuple[str, str], list[float]]:
    """The per-volume Dice table of MODEL_CARD.md: (patient, phase) -> [RV, MYO, LV, mean]."""
    rows = {}
    for line in (ROOT / "MODEL_CARD.md").read_text().splitlines():
        m = re.match(r"\| (patient\d{3}) \| \w+ \| (ED|ES) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", line)
        if m:
            rows[(m.group(1), m.group(2))] = [float(x) for x in m.groups()[2:]]
    return rows


@needs_acdc
@pytest.mark.acdc
def test_model_card_dice_is_reproduced_on_three_evaluation_patients(tmp_path):
    from pix2rep.data.dataset import prepare_dataset
    from pix2rep.evaluation.evaluate import evaluate_patients

    card = _card_rows()
    chosen = ["patient002", "patient034", "patient071"]  # groups DCM, HCM, NOR
    assert all((p, phase) in card for p in chosen for phase in ("ED", "ES"))
    subset = tmp_path / "acdc"
    subset.mkdir()
    for p in chosen:
        (subset / p).symlink_to(ACDC_TRAINING / p, target_is_directory=True)
    net, cfg, _ = load_segmentation_model(BY_KIND["segmentation"])
    patients = prepare_dataset(subset, cfg.preprocess, cache_dir=tmp_path / "cache", log=lambda *a: None)
    rows, _, _ = evaluate_patients(net, patients, "cpu", amp=False, postprocess=cfg.downstream.postprocess)
    assert len(rows) == 6
    for r in rows:
        measured = [r[f"dice_{c}"] for c in ("RV", "MYO", "LV", "mean")]
        assert np.allclose(measured, card[(r["patient"], r["phase"])], atol=0.005), (r["patient"], r["phase"])
