"""End to end on a small synthetic dataset: pretrain -> probe / finetune / train -> evaluate."""

import csv
import pickle

import pytest
import yaml

from pix2rep.cli import main
from pix2rep.config import RunConfig
from pix2rep.errors import Pix2RepError
from pix2rep.checkpoints import load_checkpoint
from pix2rep.runs import prepare_run_dir


@pytest.fixture(scope="module")
def pretrained(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pre"
    rc = main(["pretrain", "--data", str(synthetic_root), "--preset", "tiny", "--epochs", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def test_pretrain_writes_a_complete_run_folder(pretrained):
    for name in ("config.yaml", "best.pt", "last.pt", "metrics.csv", "loss.png"):
        assert (pretrained / name).is_file(), name
    rows = list(csv.DictReader(open(pretrained / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1"]
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "samples_per_s", "seconds"}
    cfg = RunConfig.load(pretrained / "config.yaml")
    assert cfg.preset == "tiny" and cfg.pretrain.epochs == 1
    payload, _ = load_checkpoint(pretrained)  # weights_only=True inside
    assert payload["kind"] == "pix2rep-pretrain" and payload["epoch"] == 1


def test_existing_run_folder_is_refused_then_resumed(pretrained, synthetic_root, capsys):
    args = ["pretrain", "--data", str(synthetic_root), "--preset", "tiny", "--out", str(pretrained), "--no-progress"]
    assert main(args + ["--epochs", "2"]) == 2
    assert "--resume" in capsys.readouterr().err
    # resume continues the same run to a second epoch and keeps the first epoch's row
    cfg = yaml.safe_load(open(pretrained / "config.yaml"))
    cfg["pretrain"]["epochs"] = 2
    (pretrained / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(args + ["--resume"]) == 0
    rows = list(csv.DictReader(open(pretrained / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_resume_without_checkpoints_starts_a_fresh_metrics_table(pretrained, synthetic_root, tmp_path):
    """A committed study keeps metrics.csv but not the .pt files: re-pretraining there must not
    append a second epoch 1 to the old table."""
    kept = tmp_path / "pre"
    kept.mkdir()
    for name in ("config.yaml", "metrics.csv"):
        (kept / name).write_bytes((pretrained / name).read_bytes())
    args = ["pretrain", "--data", str(synthetic_root), "--preset", "tiny", "--epochs", "1", "--out", str(kept),
            "--no-progress", "--resume"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(kept / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1"]


def test_a_time_cap_that_will_cut_the_schedule_is_announced_after_the_first_epoch(synthetic_root, tmp_path, capsys):
    out = tmp_path / "capped"
    assert main(["pretrain", "--data", str(synthetic_root), "--preset", "tiny", "--epochs", "3", "--max-minutes", "0.0001",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "covers about 1 of the 3 epochs" in printed
    assert printed.index("covers about") < printed.index("stopping after epoch 1")
    assert [r["epoch"] for r in csv.DictReader(open(out / "metrics.csv"))] == ["1"]


def test_overwrite_only_deletes_run_folders(tmp_path):
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(Pix2RepError, match="not a pix2rep run folder"):
        prepare_run_dir(other, overwrite=True)
    assert (other / "thesis.tex").exists()


def test_a_crafted_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').write('x')",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"config": {}, "x": Evil()}, f)
    with pytest.raises(Pix2RepError, match="refused to load"):
        load_checkpoint(bad)
    assert not (tmp_path / "pwned").exists()


def test_mismatched_architecture_names_the_keys(pretrained):
    from pix2rep.models import UNet
    from pix2rep.checkpoints import load_state

    payload, path = load_checkpoint(pretrained)
    other = UNet(RunConfig.from_dict({"model": {"widths": [8, 16], "out_channels": 16}}).model)
    with pytest.raises(Pix2RepError, match="do not match the configured architecture"):
        load_state(other, payload["backbone"], "backbone", path)


@pytest.mark.parametrize("command", ["probe", "finetune", "train"])
def test_downstream_then_evaluate(pretrained, synthetic_root, tmp_path, command):
    out = tmp_path / command
    args = [command, "--data", str(synthetic_root), "--out", str(out), "--patients", "2", "--seed", "0", "--steps", "40", "--no-progress"]
    args += ["--preset", "tiny"] if command == "train" else ["-m", str(pretrained)]
    assert main(args) == 0
    cfg = RunConfig.load(out / "config.yaml")
    assert len(cfg.patients) == 2 and cfg.downstream.steps == 40
    assert cfg.downstream.mode == {"probe": "probe", "finetune": "finetune", "train": "scratch"}[command]
    ev = tmp_path / f"eval-{command}"
    assert main(["evaluate", "-m", str(out), "--data", str(synthetic_root), "--out", str(ev)]) == 0
    rows = list(csv.DictReader(open(ev / "per_case.csv")))
    assert len(rows) == 20  # 10 patients x ED/ES (no ACDC development split in synthetic data)
    assert all(0.0 <= float(r["dice_mean"]) <= 1.0 for r in rows)
    assert (ev / "summary.json").is_file() and (ev / "clinical.csv").is_file()


def test_predict_on_a_dicom_folder_writes_one_nifti_per_phase(synthetic_root, tmp_path):
    import nibabel as nib
    import numpy as np
    from test_dicom import expected_native, write_series

    seg = tmp_path / "seg"
    assert main(["train", "--data", str(synthetic_root), "--preset", "tiny", "--patients", "1", "--steps", "5", "--out", str(seg), "--no-progress"]) == 0
    dicom = tmp_path / "dicom"
    write_series(dicom, n_phases=2, n_slices=6)
    out = tmp_path / "pred"
    assert main(["predict", "-i", str(dicom), "-o", str(out), "-m", str(seg)]) == 0
    outputs = sorted(out.glob("*.nii.gz"))
    assert len(outputs) == 2
    for path in outputs:
        img = nib.load(path)
        assert img.shape == expected_native(0).shape
        assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1, 2, 3}
        assert path.with_name(path.name[: -len(".nii.gz")] + ".json").is_file()


@pytest.mark.parametrize("lr_backbone, learns_every_class", [(None, True), (5e-5, False)])
def test_demo_fine_tuning_learns_every_class_of_its_annotated_patient(pretrained, synthetic_root, lr_backbone,
                                                                      learns_every_class):
    """Issue 18: the demo fine-tuned with METHOD's backbone rate 5e-5 (meant for 200 epochs) for 150
    steps, so the backbone hardly moved and the LV was never predicted, not even on the annotated
    patient. The demo plan's own rate must fit every class of that patient; 5e-5 must not (the
    check has teeth)."""
    import numpy as np

    from pix2rep.config import apply_overrides, preset_config, study_plan_config
    from pix2rep.data.dataset import load_patients
    from pix2rep.evaluation.evaluate import evaluate_patients
    from pix2rep.training.downstream import train_segmentation

    cfg = apply_overrides(study_plan_config(preset_config("tiny"), "demo"),
                          {"downstream.mode": "finetune", "downstream.lr_backbone": lr_backbone})
    patient = load_patients(synthetic_root, cfg, log=lambda *_: None)[:1]
    backbone = load_checkpoint(pretrained / "best.pt")[0]["backbone"]
    model, _ = train_segmentation(cfg, patient, backbone_state=backbone, progress=False, log=lambda *_: None,
                                  pretrained_prefixes=[""])
    rows, _, _ = evaluate_patients(model, patient, "cpu", cfg.bf16)
    dice = {c: float(np.mean([r[f"dice_{c}"] for r in rows])) for c in ("RV", "MYO", "LV")}
    assert (min(dice.values()) > 0.3) == learns_every_class, dice
