"""Segmenting files with a model (``pix2rep predict``'s library side), devices, and evaluation's
progress bar. The models here are untrained U-Nets whose head answers one class everywhere,
so every outcome is known in advance."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from pix2rep.data.volume import LABELS
from pix2rep.errors import ConfigError, DataError, OutputExistsError
from pix2rep.inference import list_input_volumes, predict_from_files
from pix2rep.runtime import resolve_device

LV = 3


def save_constant_model(folder, label: int):
    """A segmentation run folder whose model predicts ``label`` on every pixel."""
    from pix2rep.config import preset_config
    from pix2rep.models import SegmentationModel, UNet
    from pix2rep.training.downstream import save_segmentation_checkpoint

    cfg = preset_config("tiny")
    cfg.device = "cpu"
    torch.manual_seed(0)
    model = SegmentationModel(UNet(cfg.model), cfg.model.num_classes)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(label), cfg.model.num_classes) * 10.0)
    folder.mkdir(parents=True)
    save_segmentation_checkpoint(folder / "model.pt", model, cfg, {})
    return folder


@pytest.fixture(scope="module")
def lv_model(tmp_path_factory):
    return save_constant_model(tmp_path_factory.mktemp("models") / "lv", LV)


@pytest.fixture(scope="module")
def background_model(tmp_path_factory):
    return save_constant_model(tmp_path_factory.mktemp("models") / "background", 0)


@pytest.fixture()
def patient_folder(synthetic_root, tmp_path):
    """An ACDC patient folder: Info.cfg, two frames and their two *_gt label files."""
    return shutil.copytree(synthetic_root / "patient001", tmp_path / "patient001")


def image_names(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("*.nii.gz") if not p.name.endswith("_gt.nii.gz"))


def test_an_acdc_patient_folder_gives_one_segmentation_per_image_and_none_per_label_file(lv_model, patient_folder, tmp_path):
    lines = []
    out = tmp_path / "pred"
    written = predict_from_files(lv_model, patient_folder, out, log=lines.append)
    assert sorted(p.name for p in written) == image_names(patient_folder)  # frame01 and the ES frame
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in written] + [p.name.replace(".nii.gz", ".json") for p in written])
    assert lines[0] == f"{patient_folder}: skipping 2 label file(s) (*_gt)"
    assert lines[-1] == f"wrote 2 segmentation(s) to {out}"
    assert len(lines) == 4 and not any(line.startswith("warning") for line in lines)
    for path in written:
        source = patient_folder / path.name
        labels = np.asarray(nib.load(path).dataobj)
        assert labels.shape == nib.load(source).shape and labels.dtype == np.uint8
        assert set(np.unique(labels)) == {0, LV}  # LV inside the label-free ROI, background outside
        sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["input"] == str(source) and sidecar["labels"] == {str(k): v for k, v in LABELS.items()}


def test_resume_skips_finished_volumes_and_overwrite_redoes_them(lv_model, patient_folder, tmp_path):
    out = tmp_path / "pred"
    first = predict_from_files(lv_model, patient_folder, out, log=lambda line: None)
    stamps = {p: p.stat().st_mtime_ns for p in first}

    with pytest.raises(OutputExistsError) as refused:
        predict_from_files(lv_model, patient_folder, out, log=lambda line: None)
    assert str(refused.value) == f"{out}: already exists; pass --resume to skip finished volumes or --overwrite to redo them"

    first[0].unlink()
    lines = []
    assert predict_from_files(lv_model, patient_folder, out, resume=True, log=lines.append) == [first[0]]
    assert lines[-1] == f"wrote 1 segmentation(s) to {out} (1 finished earlier, kept)"
    assert first[1].stat().st_mtime_ns == stamps[first[1]]

    assert predict_from_files(lv_model, patient_folder, out, overwrite=True, log=lambda line: None) == first
    with pytest.raises(ConfigError, match="not both"):
        predict_from_files(lv_model, patient_folder, out, resume=True, overwrite=True)


def test_a_single_file_gives_a_single_file_and_inputs_are_never_written_over(lv_model, patient_folder, tmp_path):
    image = patient_folder / "patient001_frame01.nii.gz"
    out = tmp_path / "seg.nii.gz"
    assert predict_from_files(lv_model / "model.pt", image, out, log=lambda line: None) == [out]
    assert (tmp_path / "seg.json").is_file()
    with pytest.raises(OutputExistsError, match="seg.nii.gz: already exists; pass --overwrite to replace it"):
        predict_from_files(lv_model, image, out)
    with pytest.raises(DataError, match="the output folder is the input folder"):
        predict_from_files(lv_model, patient_folder, patient_folder)
    with pytest.raises(DataError, match="is one of the inputs"):
        predict_from_files(lv_model, image, image, overwrite=True)
    assert nib.load(image).get_data_dtype() == np.int16  # still the image


def test_a_prediction_of_background_only_is_a_warning_naming_the_input(background_model, patient_folder, tmp_path):
    lines = []
    image = patient_folder / "patient001_frame01.nii.gz"
    [out] = predict_from_files(background_model, image, tmp_path / "pred", log=lines.append)
    assert not np.asarray(nib.load(out).dataobj).any()
    warnings = [line for line in lines if line.startswith("warning")]
    assert warnings == [f"warning: {image}: the model predicted background only (no RV, MYO, LV voxel); "
                        "is this a short-axis cine MRI of the heart?"]


def test_a_folder_of_label_files_only_is_a_data_error(patient_folder, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    for path in patient_folder.glob("*_gt.nii.gz"):
        shutil.copy(path, labels)
    with pytest.raises(DataError, match="holds only label files \\(2 \\*_gt NIfTI files\\), no image to segment"):
        list_input_volumes(labels)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "meta", ""])
def test_an_unknown_device_is_a_one_line_config_error(name):
    with pytest.raises(ConfigError) as refused:
        resolve_device(name)
    assert str(refused.value) == f"--device {name}: not a device pix2rep runs on; choose one of auto, cpu, cuda, cuda:N"


def test_known_devices_resolve(lv_model, patient_folder, tmp_path):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda:1: CUDA is not available on this machine"):
            resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="--device gpu"):  # checked before any output is made
        predict_from_files(lv_model, patient_folder, tmp_path / "pred", device="gpu")
    assert not (tmp_path / "pred").exists()


def test_evaluation_with_a_progress_bar_gives_the_same_rows(lv_model, synthetic_root, capsys):
    from pix2rep.checkpoints import load_segmentation_model
    from pix2rep.data.dataset import prepare_dataset
    from pix2rep.evaluation.evaluate import evaluate_patients

    model, cfg, _ = load_segmentation_model(lv_model)
    patients = prepare_dataset(synthetic_root, cfg.preprocess)[:2]
    quiet = evaluate_patients(model, patients, "cpu", False)
    shown = evaluate_patients(model, patients, "cpu", False, progress=True)
    assert repr(shown[:2]) == repr(quiet[:2])  # repr: NaN (a missing HD95) equals itself there
    assert len(quiet[0]) == 4 and len(quiet[1]) == 2
    assert quiet[0][0]["dice_RV"] == 0.0 and 0.0 < quiet[0][0]["dice_LV"] < 1.0  # LV everywhere in the ROI


def test_evaluate_model_writes_the_evaluation_and_names_training_patients(lv_model, synthetic_root, tmp_path):
    from pix2rep.checkpoints import load_segmentation_model
    from pix2rep.data.dataset import prepare_dataset
    from pix2rep.evaluation.evaluate import evaluate_model

    model, cfg, path = load_segmentation_model(lv_model)
    cfg.patients = ["patient002"]  # as if trained on it
    patients = prepare_dataset(synthetic_root, cfg.preprocess)[:2]
    lines = []
    summary = evaluate_model(model, cfg, path, patients, synthetic_root, tmp_path / "eval", split="all", log=lines.append)
    assert summary["volumes"] == 4 and summary["split"] == "all" and summary["dice_RV_mean"] == 0.0
    assert lines == ["warning: 1 evaluation patient(s) were used to train this model: ['patient002']"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "clinical.csv", "config.yaml", "dice.png", "per_case.csv", "summary.json"]
    with pytest.raises(OutputExistsError):
        evaluate_model(model, cfg, path, patients, synthetic_root, tmp_path / "eval")
    unlabeled = [type(p)(p.id, p.group, [], p.volumes) for p in patients]  # only unlabeled frames
    with pytest.raises(DataError, match="no labeled volume to evaluate"):
        evaluate_model(model, cfg, path, unlabeled, synthetic_root, tmp_path / "eval-unlabeled")
    assert not (tmp_path / "eval-unlabeled").exists()
