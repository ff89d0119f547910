"""The training loops on tiny in-memory data: the step functions they call, what they record,
interruption and resumption."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import yaml

from pix2rep.checkpoints import load_checkpoint
from pix2rep.config import preset_config
from pix2rep.data.dataset import PreparedPatient
from pix2rep.data.preprocess import PreparedVolume
from pix2rep.training import downstream, pretrain

SIZE, SLICES = 32, 4
TIMING_COLUMNS = {"seconds", "samples_per_s"}


def patients(n: int, labeled: bool = True, seed: int = 0) -> list[PreparedPatient]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        images = rng.random((SLICES, SIZE, SIZE), dtype=np.float32)
        masks = rng.integers(0, 4, (SLICES, SIZE, SIZE)).astype(np.uint8) if labeled else None
        volume = PreparedVolume(images, masks, np.arange(SLICES), (0, SIZE, 0, SIZE), (SLICES, SIZE, SIZE),
                                (10.0, 1.5, 1.5), f"s{seed}p{k}", "ED")
        out.append(PreparedPatient(f"s{seed}p{k}", "NOR", [volume]))
    return out


def tiny_config(**overrides):
    cfg = preset_config("tiny", **overrides)
    cfg.device = "cpu"
    return cfg


def rows(path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(open(path))]


def counting(monkeypatch, module, name: str, interrupt_at: int | None = None) -> list:
    """Wrap ``module.name``, recording each call's result; raise KeyboardInterrupt (as SIGTERM
    does through the CLI) at call number ``interrupt_at``."""
    real, results = getattr(module, name), []

    def wrapper(*args, **kwargs):
        if len(results) + 1 == interrupt_at:
            raise KeyboardInterrupt
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(module, name, wrapper)
    return results


# ---------------------------------------------------------------- pretraining


def test_the_pretraining_loop_takes_its_steps_with_pretrain_step(tmp_path, monkeypatch):
    cohort = patients(5)  # 1 validation patient, 16 training slices: 2 steps of 8 per epoch
    losses = counting(monkeypatch, pretrain, "pretrain_step")
    pretrain.pretrain(tiny_config(pretrain={"epochs": 1}), cohort, tmp_path, progress=False, log=lambda _: None)
    assert len(losses) == 2
    (row,) = rows(tmp_path / "metrics.csv")
    assert row["train_loss"] == f"{sum(float(x) for x in losses) / 2:.6f}"


def test_pretraining_records_its_patients_and_the_precision_it_ran_in(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "use_bf16", lambda requested, device: False)  # as on a CPU without native bf16
    cohort = patients(5)
    pretrain.pretrain(tiny_config(pretrain={"epochs": 1}), cohort, tmp_path, progress=False, log=lambda _: None)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["bf16"] is False
    for name in ("best.pt", "last.pt"):
        payload, _ = load_checkpoint(tmp_path / name)
        assert payload["pretraining_patients"] == sorted(p.id for p in cohort)  # validation patients too
        assert payload["config"]["bf16"] is False


def test_an_interrupted_pretraining_keeps_the_last_finished_epoch(tmp_path, monkeypatch):
    counting(monkeypatch, pretrain, "pretrain_step", interrupt_at=4)  # the second step of epoch 2
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(tiny_config(pretrain={"epochs": 3}), patients(5), tmp_path, progress=False, log=lambda _: None)
    last, _ = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 1
    assert [r["epoch"] for r in rows(tmp_path / "metrics.csv")] == ["1"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_non_finite_loss_is_refused_before_the_step():
    cfg = tiny_config()
    backbone, head = pretrain.build_pretraining_modules(cfg)
    net = pretrain.PretrainNet(backbone, head, cfg, amp=False)
    params = list(backbone.parameters()) + list(head.parameters())
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=1.0)
    x = torch.full((4, 1, SIZE, SIZE), float("nan"))
    with pytest.raises(pretrain.NonFiniteLoss, match=r"non-finite loss \(nan\)"):
        pretrain.pretrain_step(net, optimizer, x, torch.Generator().manual_seed(0), params, None)
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(before, params))


# ---------------------------------------------------------------- downstream


@pytest.mark.parametrize("mode, schedule", [("finetune", "constant"), ("mean-teacher", "constant"), ("finetune", "cosine")])
def test_an_interrupted_downstream_run_resumes_bit_for_bit(tmp_path, monkeypatch, mode, schedule):
    cfg = tiny_config(downstream={"mode": mode, "steps": 7, "eval_every": 2, "batch_size": 4, "mt_unlabeled_batch": 4,
                                  "stopping": "validation", "patience": 10, "lr_schedule": schedule})
    backbone_state = {k: v.clone() for k, v in downstream.UNet(cfg.model).state_dict().items()}
    labeled, validation, pool = patients(2), patients(1, seed=1), patients(2, labeled=False, seed=2)

    def run(out, **kwargs):
        out.mkdir(exist_ok=True)
        return downstream.train_segmentation(cfg, labeled, out, backbone_state=backbone_state, val_patients=validation,
                                             progress=False, pretrained_prefixes=[""], unlabeled_patients=pool, **kwargs)

    whole, summary = run(tmp_path / "whole")
    with monkeypatch.context() as patch:
        counting(patch, downstream, "optimizer_step", interrupt_at=6)  # after the logging block of step 4
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "cut")
    assert load_checkpoint(tmp_path / "cut" / "last.pt")[0]["step"] == 4
    resumed, resumed_summary = run(tmp_path / "cut", resume=True)

    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed_summary["steps"] == summary["steps"] == 7
    assert rows(tmp_path / "cut" / "metrics.csv") == rows(tmp_path / "whole" / "metrics.csv")
    assert [r["step"] for r in rows(tmp_path / "whole" / "metrics.csv")] == ["2", "4", "6", "7"]
    for out in ("whole", "cut"):  # a finished run leaves its model, not its resumption state
        assert (tmp_path / out / "model.pt").is_file() and not (tmp_path / out / "last.pt").exists()


@pytest.mark.parametrize("schedule, step, steps, expected", [
    ("constant", 1, 10, 1.0), ("constant", 10, 10, 1.0),
    ("cosine", 1, 10, 1.0),  # the first step at the full rate
    ("cosine", 6, 10, 0.5),  # (1 + cos(pi / 2)) / 2
    ("cosine", 10, 10, (1 + math.cos(0.9 * math.pi)) / 2),  # the last step, 0.0245
])
def test_lr_factor(schedule, step, steps, expected):
    assert downstream.lr_factor(schedule, step, steps) == pytest.approx(expected)


def test_cosine_schedule_sets_every_group_rate_at_every_step(tmp_path, monkeypatch):
    cfg = tiny_config(downstream={"mode": "finetune", "steps": 4, "batch_size": 4, "lr_schedule": "cosine"})
    backbone_state = downstream.UNet(cfg.model).state_dict()
    seen = []
    real = downstream.optimizer_step

    def recording(loss, optimizer, *args, **kwargs):
        seen.append([group["lr"] for group in optimizer.param_groups])
        return real(loss, optimizer, *args, **kwargs)

    monkeypatch.setattr(downstream, "optimizer_step", recording)
    downstream.train_segmentation(cfg, patients(1), None, backbone_state=backbone_state, progress=False,
                                  pretrained_prefixes=[""])
    d = cfg.downstream
    expected = [[d.lr_backbone * f, d.lr_head * f] for f in (1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                                               (1 + math.cos(3 * math.pi / 4)) / 2)]
    assert seen == [pytest.approx(e) for e in expected]


@pytest.mark.parametrize("mode", ["probe", "random-probe"])
def test_a_probe_on_cached_features_trains_the_head_as_the_live_probe_does(tmp_path, monkeypatch, mode):
    # frozen backbone in eval mode, no augmentation: the features of a slice are the same at every
    # step, so computing them once must give the same head (up to float rounding)
    monkeypatch.setattr(downstream, "use_bf16", lambda requested, device: False)
    heads = {}
    state = downstream.UNet(tiny_config().model).state_dict() if mode == "probe" else None  # one backbone for both
    for features in ("live", "cached"):
        cfg = tiny_config(downstream={"mode": mode, "steps": 6, "batch_size": 4, "augment": False,
                                      "probe_features": features})
        model, _ = downstream.train_segmentation(cfg, patients(2), None, backbone_state=state, progress=False,
                                                 pretrained_prefixes=[""] if state else None)
        heads[features] = model.head.state_dict()
    for name, live in heads["live"].items():
        assert torch.allclose(live, heads["cached"][name], atol=1e-5), name


def test_downstream_records_the_precision_it_ran_in(tmp_path, monkeypatch):
    monkeypatch.setattr(downstream, "use_bf16", lambda requested, device: False)
    cfg = tiny_config(downstream={"mode": "scratch", "steps": 2, "batch_size": 4})
    downstream.train_segmentation(cfg, patients(1), tmp_path, progress=False)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["bf16"] is False
    assert load_checkpoint(tmp_path / "model.pt")[0]["config"]["bf16"] is False


@pytest.mark.parametrize("mode,atol,spatial", [("finetune", 1e-3, False), ("probe", 1e-5, False),
                                               ("random-probe", 1e-5, False), ("scratch", 1e-4, False),
                                               ("finetune", 1e-3, True)])
def test_cells_trained_at_once_are_the_cells_trained_alone(mode, atol, spatial):
    """Each cell of train_segmentation_cells starts, draws and steps as train_segmentation with
    its seed. Adam turns the rounding noise of gradients that are zero in exact arithmetic (a
    conv bias before BatchNorm) into steps of up to the rate, so the from-scratch network runs
    at rate 1e-6 here: its outputs still check its initialisation and, through the BatchNorm
    statistics, the slices each cell drew (its gradients: tests/test_models.py)."""
    cfg = tiny_config()
    cfg.bf16 = False
    cfg.downstream.mode, cfg.downstream.steps, cfg.downstream.lr_schedule = mode, 4, "cosine"
    cfg.downstream.lr_scratch = 1e-6
    cfg.downstream.spatial.enabled = spatial  # each cell warps its batches from its own seed too
    state = None
    if mode in ("finetune", "probe"):
        torch.manual_seed(99)
        state = downstream.build_segmentation_model(cfg).backbone.state_dict()
    cells = [(0, patients(1, seed=0)), (3, patients(2, seed=1))]
    together = downstream.train_segmentation_cells(cfg, cells, state, progress=False)
    assert len(together) == 2
    x = torch.rand(2, 1, SIZE, SIZE)
    for (seed, chosen), (model, summary) in zip(cells, together):
        assert summary["steps"] == 4 and summary["train_slices"] == SLICES * len(chosen)
        cfg.downstream.seed = seed
        alone, _ = downstream.train_segmentation(cfg, chosen, None, backbone_state=state, progress=False)
        with torch.no_grad():
            torch.testing.assert_close(model(x), alone(x), atol=atol, rtol=0)
        if mode in downstream.FROZEN_MODES:  # the frozen backbone is untouched
            assert all(torch.equal(a, b) for a, b in
                       zip(model.backbone.state_dict().values(), alone.backbone.state_dict().values()))


@pytest.mark.parametrize("change,message", [
    ({"mode": "mean-teacher"}, "one cell at a time"),
    ({"grad_clip": 1.0}, "no grad_clip"),
    ({"stopping": "validation", "val_patients": 1}, "fixed-steps"),
    ({"mode": "probe", "probe_features": "cached"}, "cached features"),
    ({"mode": "finetune"}, "needs a pretrained model"),
])
def test_cells_at_once_refuse_what_would_couple_them_or_is_not_built(change, message):
    cfg = tiny_config()
    for key, value in change.items():
        setattr(cfg.downstream, key, value)
    with pytest.raises(Exception, match=message):
        downstream.train_segmentation_cells(cfg, [(0, patients(1))], None, progress=False)
