"""torchrun with 2 CPU processes (gloo) against a single-process computation of the same step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pix2rep.losses import barlow_twins, nt_xent, nt_xent_gathered
from pix2rep.training.pretrain import build_pretraining_modules, pretrain_projections

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from ddp_step import CASES, case_config, global_batch  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(HELPERS / "ddp_step.py"), str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {name: [torch.load(out / f"{name}-rank{r}.pt") for r in range(WORLD)] for name in CASES}


def reference_step(name: str) -> tuple[float, dict]:
    """What DDP should compute: each rank's half separately (its own BatchNorm statistics and
    random stream), losses combined as DDP combines them (the mean of the ranks' losses)."""
    loss_name, gather = CASES[name]
    cfg = case_config(loss_name, gather)
    torch.set_default_dtype(torch.float64)  # as the worker
    try:
        return _reference_step(cfg, loss_name, gather)
    finally:
        torch.set_default_dtype(torch.float32)


def _reference_step(cfg, loss_name: str, gather: bool) -> tuple[float, dict]:
    torch.manual_seed(0)
    backbone, head = build_pretraining_modules(cfg)
    halves = global_batch().chunk(WORLD)
    z = [pretrain_projections(backbone, head, x, cfg, torch.Generator().manual_seed(100 + r), False) for r, x in enumerate(halves)]
    zu_all, zv_all = torch.cat([a for a, _ in z]), torch.cat([b for _, b in z])
    if loss_name == "barlow":  # every rank computes the global-batch loss
        total = barlow_twins(zu_all, zv_all, cfg.pretrain.barlow_lambda)
    elif gather:
        n = len(z[0][0])
        total = torch.stack([nt_xent_gathered(zu, zv, zu_all, zv_all, r * n, cfg.pretrain.temperature)
                             for r, (zu, zv) in enumerate(z)]).mean()
    else:
        total = torch.stack([nt_xent(zu, zv, cfg.pretrain.temperature) for zu, zv in z]).mean()
    total.backward()
    grads = {f"backbone.{k}": p.grad for k, p in backbone.named_parameters()}
    grads.update({f"head.{k}": p.grad for k, p in head.named_parameters()})
    return float(total.detach()), grads


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_the_single_process_step(ddp_results, name):
    ranks = ddp_results[name]
    loss_ref, grads_ref = reference_step(name)
    assert float(torch.stack([r["loss"] for r in ranks]).mean()) == pytest.approx(loss_ref, abs=1e-5)
    for key, g_ref in grads_ref.items():
        for r in ranks:  # after DDP's all-reduce both ranks hold the same averaged gradient
            torch.testing.assert_close(r["grads"][key], g_ref, atol=1e-5, rtol=0, msg=f"{name}: {key}")


def test_gathered_negatives_change_the_loss(ddp_results):
    """A guard that the gathered case really used the other rank's vectors."""
    local = float(torch.stack([r["loss"] for r in ddp_results["infonce-local"]]).mean())
    gathered = float(torch.stack([r["loss"] for r in ddp_results["infonce-gathered"]]).mean())
    assert gathered > local + 0.1  # twice the negatives: a harder task


@pytest.mark.slow
def test_torchrun_pretrain_then_finetune_write_one_run_folder_each(synthetic_root, tmp_path):
    """The commands themselves under torchrun: rank 0 alone writes, the folders are complete."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "PIX2REP_CACHE": str(tmp_path / "cache")}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m", "pix2rep"]
    for args in (["pretrain", "--data", str(synthetic_root), "--preset", "tiny", "--epochs", "1", "--out", str(tmp_path / "pre")],
                 ["finetune", "--data", str(synthetic_root), "-m", str(tmp_path / "pre"), "--patients", "2", "--steps", "10",
                  "--out", str(tmp_path / "ft")]):
        res = subprocess.run(launch + args + ["--no-progress"], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert res.stdout.count("done:") == 1  # only rank 0 reports
    assert [r.split(",")[0] for r in (tmp_path / "pre" / "metrics.csv").read_text().split()[1:]] == ["1"]
    assert (tmp_path / "ft" / "model.pt").is_file()
    assert not [p for p in tmp_path.rglob(".tmp-*")]
