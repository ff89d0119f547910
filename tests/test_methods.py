"""The methods beyond Pix2Rep: SimCLR pretraining, Mean Teacher, invariance ablation, Pix2Rep-v2."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pix2rep.cli import main
from pix2rep.config import preset_config
from pix2rep.models import SegmentationModel, UNet
from pix2rep.training.downstream import build_optimizer, consistency_weight
from pix2rep.training.pretrain import build_pretraining_modules, pretrain_loss, pretrained_prefixes


def test_simclr_trains_the_encoder_only_and_starts_near_log_2b_minus_1():
    cfg = preset_config("tiny", pretrain={"loss": "simclr"})
    torch.manual_seed(0)
    backbone, head = build_pretraining_modules(cfg)
    x = torch.rand(8, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    loss = pretrain_loss(backbone, head, x, cfg, torch.Generator().manual_seed(1), amp=False)
    # 16 vectors from an untrained network: NT-Xent is near log(2B - 1) = log(15)
    assert abs(float(loss) - math.log(15)) < 0.5
    loss.backward()
    for name, p in backbone.named_parameters():
        if name.startswith("encoders."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name  # decoder and upsampling never see the SimCLR loss
    assert pretrained_prefixes(cfg) == ["encoders."]
    assert pretrained_prefixes(preset_config("tiny")) == [""]


def test_finetuning_gives_untrained_backbone_parts_the_scratch_rate():
    cfg = preset_config("tiny")
    model = SegmentationModel(UNet(cfg.model), cfg.model.num_classes)
    whole = build_optimizer(model, cfg, "finetune", [""])
    assert [g["lr"] for g in whole.param_groups] == [cfg.downstream.lr_backbone, cfg.downstream.lr_head]
    split = build_optimizer(model, cfg, "finetune", ["encoders."])
    lrs = [g["lr"] for g in split.param_groups]
    assert lrs == [cfg.downstream.lr_backbone, cfg.downstream.lr_scratch, cfg.downstream.lr_head]
    n_encoder = sum(1 for n, _ in model.backbone.named_parameters() if n.startswith("encoders."))
    assert len(split.param_groups[0]["params"]) == n_encoder
    assert sum(len(g["params"]) for g in split.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "step, expected",
    [(0, math.exp(-5.0)), (20, math.exp(-5.0 * 0.25)), (40, 1.0), (100, 1.0)],  # ramp over 0.4 x 100 steps
)
def test_mean_teacher_consistency_ramp(step, expected):
    cfg = preset_config("tiny", downstream={"steps": 100, "mt_rampup": 0.4, "mt_consistency": 1.0})
    assert consistency_weight(step, cfg) == pytest.approx(expected)


def test_invariance_ablation_pairs_the_same_pixel_in_both_views():
    """With the spatial transform off (and here every intensity change off too), the two views
    are the same image, so each positive pair is one vector twice."""
    from pix2rep.training.pretrain import pretrain_projections

    no_change = {k: 0.0 for k in ("noise_p", "blur_p", "gamma_p", "bias_p", "invert_p")}
    cfg = preset_config("tiny", spatial={"enabled": False}, intensity=no_change)
    torch.manual_seed(0)
    backbone, head = build_pretraining_modules(cfg)
    backbone.eval()
    head.eval()
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    zu, zv = pretrain_projections(backbone, head, x, cfg, torch.Generator().manual_seed(1), amp=False)
    torch.testing.assert_close(zu, zv, atol=1e-5, rtol=0)
    with_geometry = preset_config("tiny", intensity=no_change)
    zu, zv = pretrain_projections(backbone, head, x, with_geometry, torch.Generator().manual_seed(1), amp=False)
    assert (zu - zv).abs().max() > 1e-3  # a real transform: features read at T(p), not p


def _modules_and_batch(cfg, size: int):
    """A pretraining backbone and head of ``cfg`` (seeded) and a batch of 3 random slices."""
    torch.manual_seed(0)
    backbone, head = build_pretraining_modules(cfg)
    return backbone, head, torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(0))


def _projections(backbone, head, x, cfg):
    """``pretrain_projections`` in fp32 with the draws of generator seed 1 (the tests redo them)."""
    from pix2rep.training.pretrain import pretrain_projections

    return pretrain_projections(backbone, head, x, cfg, torch.Generator().manual_seed(1), amp=False)


def test_separate_view_passes_normalise_each_view_with_its_own_batch_statistics():
    """``pretrain.separate_view_passes`` runs the backbone on v1 and on v2' apart (the reference's
    BatchNorm statistics per view): its projections equal that computation written out by hand,
    and differ from the one-pass default in training mode, where BatchNorm uses batch statistics."""
    from pix2rep.losses import gather_positions, sample_valid_positions
    from pix2rep.training.pretrain import make_views
    from pix2rep.transforms import sample_at

    separate = preset_config("tiny", pretrain={"separate_view_passes": True})
    backbone, head, x = _modules_and_batch(separate, 64)
    zu, zv = _projections(backbone, head, x, separate)

    g = torch.Generator().manual_seed(1)  # the same draws, in the same order
    views, theta, valid = make_views(x, separate, g)
    f1, f2 = backbone(views[:3]), backbone(views[3:])
    b, y, px = sample_valid_positions(valid, separate.pretrain.n_samples, g)
    z = head(torch.cat([sample_at(f1, theta, (b, y, px)), gather_positions(f2, (b, y, px))]))
    torch.testing.assert_close(torch.cat([zu, zv]), z)

    joint_u, _ = _projections(backbone, head, x, preset_config("tiny"))
    assert (joint_u - zu).abs().max() > 1e-3
    backbone.eval()
    head.eval()
    eval_u, _ = _projections(backbone, head, x, separate)
    joint_eval_u, _ = _projections(backbone, head, x, preset_config("tiny"))
    torch.testing.assert_close(eval_u, joint_eval_u)  # running statistics: the passes agree


def test_head_on_full_maps_projects_every_pixel_then_reads_view_one_at_t_of_p():
    """``pretrain.head_on_full_maps`` is METHOD step 4 as written: z1 = warp(g(f(v1)), T) and
    z2 = g(f(v2')) at the sampled p. Its projections equal that computation written out by hand
    (the head as a 1x1-conv stack over whole maps, the warp by grid_sample); in eval mode with no
    spatial transform they equal the default's (head on the sampled vectors), and in training
    they differ, since the head's BatchNorm then normalises over every pixel."""
    import torch.nn.functional as F

    from pix2rep.losses import sample_valid_positions
    from pix2rep.training.pretrain import make_views
    from pix2rep.transforms import warp

    full = preset_config("tiny", pretrain={"head_on_full_maps": True})
    backbone, head, x = _modules_and_batch(full, 32)
    zu, zv = _projections(backbone, head, x, full)

    g = torch.Generator().manual_seed(1)  # the same draws, in the same order
    views, theta, valid = make_views(x, full, g)
    f = backbone(views)
    lin1, bn, _, lin2 = head.net
    hidden = F.conv2d(f, lin1.weight[:, :, None, None], lin1.bias)
    mean, var = hidden.mean(dim=(0, 2, 3)), hidden.var(dim=(0, 2, 3), unbiased=False)
    hidden = (hidden - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
    hidden = hidden * bn.weight[:, None, None] + bn.bias[:, None, None]
    z = F.conv2d(hidden.relu(), lin2.weight[:, :, None, None], lin2.bias)
    z1 = warp(z[:3], theta)[0]
    b, y, px = sample_valid_positions(valid, full.pretrain.n_samples, g)
    torch.testing.assert_close(zu, z1[b, :, y, px], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(zv, z[3 + b, :, y, px], atol=1e-4, rtol=1e-4)

    default = preset_config("tiny")
    assert (_projections(backbone, head, x, default)[1] - zv).abs().max() > 1e-3
    backbone.eval()
    head.eval()
    for cfg in (full, default):
        cfg.spatial.enabled = False  # identity T: every source pixel-aligned
    torch.testing.assert_close(_projections(backbone, head, x, full), _projections(backbone, head, x, default))


@pytest.mark.slow
def test_benchmark_runs_the_extra_methods_by_name(synthetic_root, tmp_path):
    from pix2rep.data.synthetic import write_synthetic_dataset

    held_out = write_synthetic_dataset(tmp_path / "eval", n_patients=2, seed=7)
    out = tmp_path / "study"
    methods = "pix2rep-v2-lp,pix2rep-mt,baseline-mt,simclr-ft,simclr-lp,invariance-ft"
    assert main(["benchmark", "--data", str(synthetic_root), "--eval-data", str(held_out), "--preset", "tiny",
                 "--epochs", "1", "--methods", methods, "--n", "1", "--seeds", "0", "--no-full-pool", "--steps", "6",
                 "--out", str(out), "--no-progress"]) == 0
    for folder in ("pretrain", "pretrain-v2", "pretrain-simclr", "pretrain-invariance"):  # pretrain: for pix2rep-mt
        assert (out / folder / "best.pt").is_file(), folder
    assert "simclr" in (out / "pretrain-simclr" / "config.yaml").read_text()
    cells = sorted(p.stem for p in (out / "cells").glob("*.json"))
    assert cells == sorted(f"{m}-N1-s0" for m in methods.split(","))
    report = (out / "REPORT.md").read_text()
    assert "SimCLR (image-level) fine-tuning" in report and "baseline + Mean Teacher" in report
    assert "downstream training + evaluation, baseline-mt" in report


def test_finetune_and_train_take_mean_teacher(synthetic_root, tmp_path):
    pre = tmp_path / "pre"
    assert main(["pretrain", "--data", str(synthetic_root), "--preset", "tiny", "--epochs", "1", "--out", str(pre),
                 "--no-progress"]) == 0
    for command in (["finetune", "-m", str(pre)], ["train", "--preset", "tiny"]):
        out = tmp_path / command[0]
        assert main(command + ["--mean-teacher", "--data", str(synthetic_root), "--patients", "1", "--steps", "4",
                               "--out", str(out), "--no-progress"]) == 0
        rows = (out / "metrics.csv").read_text().splitlines()
        assert rows[0].split(",")[:4] == ["epoch", "step", "train_loss", "consistency"]
        assert np.isfinite(float(rows[-1].split(",")[3]))
        assert (out / "model.pt").is_file()


def test_benchmark_pretrains_each_kind_just_before_its_cells_and_never_for_finished_ones(synthetic_root, tmp_path, capsys):
    from pix2rep.data.synthetic import write_synthetic_dataset

    held_out = write_synthetic_dataset(tmp_path / "eval", n_patients=2, seed=3)
    out = tmp_path / "study"
    args = ["benchmark", "--data", str(synthetic_root), "--eval-data", str(held_out), "--preset", "tiny", "--epochs", "1",
            "--methods", "invariance-lp,pix2rep-lp,baseline", "--n", "1", "--seeds", "0", "--no-full-pool",
            "--steps", "3", "--out", str(out), "--no-progress"]

    def events(printed: str) -> list[str]:
        return [line.split(" ->")[0] if line.startswith("pretraining:") else line.split("] ")[1].split(":")[0]
                for line in printed.splitlines() if line.startswith(("pretraining:", "["))]

    assert main(args) == 0
    assert events(capsys.readouterr().out) == [
        "baseline-N1-s0", "pretraining: pix2rep", "pix2rep-lp-N1-s0", "pretraining: invariance", "invariance-lp-N1-s0"]
    # a committed study keeps no .pt files: resuming it with every cell present pretrains nothing
    for checkpoint in out.glob("pretrain*/*.pt"):
        checkpoint.unlink()
    assert main(args + ["--resume"]) == 0
    assert events(capsys.readouterr().out) == []
    assert not list(out.glob("pretrain*/*.pt"))


def test_report_only_rebuilds_a_stopped_study_from_its_cells_and_marks_missing_seeds(synthetic_root, tmp_path, capsys):
    from pix2rep.data.synthetic import write_synthetic_dataset

    held_out = write_synthetic_dataset(tmp_path / "eval", n_patients=2, seed=5)
    out = tmp_path / "study"
    args = ["benchmark", "--data", str(synthetic_root), "--eval-data", str(held_out), "--preset", "tiny",
            "--methods", "baseline", "--n", "1", "--seeds", "0,1", "--no-full-pool", "--steps", "3",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    # as if the run had been stopped after its first cell: one of the two planned seeds is left
    (out / "cells" / "baseline-N1-s1.json").unlink()
    (out / "REPORT.md").unlink()
    kept = out / "cells" / "baseline-N1-s0.json"
    cell = json.loads(kept.read_text())
    assert cell["commit"] and cell["torch"] == torch.__version__  # each cell records where it ran
    kept.write_text(json.dumps({**cell, "machine": "a GPU elsewhere"}))  # as if it had run on another machine
    capsys.readouterr()
    # rebuilt here with the study's own command line, --device cuda included, CUDA or not
    assert main(args + ["--report-only", "--device", "cuda"]) == 0
    assert "[" not in capsys.readouterr().out  # no cell ran
    assert sorted(p.stem for p in (out / "cells").glob("*.json")) == ["baseline-N1-s0"]
    report = (out / "REPORT.md").read_text()
    table_row = next(line for line in report.splitlines() if line.startswith("| supervised baseline"))
    assert table_row.endswith("(1 of 2 seeds) |")
    assert f"- machine: a GPU elsewhere; torch {torch.__version__}\n" in report  # not the machine rebuilding it
    assert len((out / "invocations.jsonl").read_text().splitlines()) == 2  # the report-only run is on record


def test_report_only_needs_an_existing_study(tmp_path, capsys):
    assert main(["benchmark", "--data", str(tmp_path), "--out", str(tmp_path / "none"), "--report-only"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_commit_outside_a_git_checkout_comes_from_the_environment(monkeypatch):
    import subprocess

    from pix2rep import provenance

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    monkeypatch.delenv("PIX2REP_GIT_COMMIT", raising=False)
    assert provenance.git_commit() == "unknown"
    monkeypatch.setenv("PIX2REP_GIT_COMMIT", "abc1234")
    assert provenance.git_commit() == "abc1234 (PIX2REP_GIT_COMMIT; not a git checkout)"


def test_machine_line_names_the_gpu_only_for_a_cuda_device():
    from pix2rep.provenance import machine_meta
    from pix2rep.provenance import cpu_model_name

    assert machine_meta("cpu")["machine"].startswith(cpu_model_name())
    assert "GPU" not in machine_meta("cpu")["machine"]
    if torch.cuda.is_available():
        assert machine_meta("cuda")["machine"].startswith(torch.cuda.get_device_name(0))


def test_teacher_update_averages_parameters_and_keeps_its_own_batchnorm_statistics():
    from pix2rep.training.downstream import update_teacher

    teacher = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    student = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    for module, value in ((teacher, 1.0), (student, 3.0)):
        for p in module.parameters():
            p.data.fill_(value)
        module[1].running_mean.fill_(10 * value)
    update_teacher(teacher, student, decay=0.75)
    for p in teacher.parameters():  # 0.75 * 1 + 0.25 * 3
        assert torch.allclose(p, torch.full_like(p, 1.5))
    assert torch.equal(teacher[1].running_mean, torch.full((2,), 10.0))  # not the student's 30
    assert torch.equal(student[1].running_mean, torch.full((2,), 30.0))
