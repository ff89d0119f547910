"""Speed plumbing: the allocator setting changes no number, and ``pix2rep bench`` writes its table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from pix2rep.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")

# One tiny pretraining step and one fine-tuning step; prints every number they produce.
_STEPS = """
import torch
from pix2rep.config import preset_config
from pix2rep.training.common import keep_freed_memory
from pix2rep.training.pretrain import build_pretraining_modules, pretrain_loss
from pix2rep.models import SegmentationModel
print("tuned", keep_freed_memory())
torch.manual_seed(0)
cfg = preset_config("tiny")
backbone, head = build_pretraining_modules(cfg)
backbone.to(memory_format=torch.channels_last)
x = torch.rand(4, 1, 64, 64)
loss = pretrain_loss(backbone, head, x, cfg, torch.Generator().manual_seed(1), True)
loss.backward()
print("loss", loss.item().hex())
print("grad", sum(p.grad.double().abs().sum() for p in backbone.parameters()).item().hex())
model = SegmentationModel(backbone)
model(x).square().mean().backward()
print("grad2", sum(p.grad.double().abs().sum() for p in model.parameters()).item().hex())
"""


def _run_steps(keep: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "PIX2REP_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", _STEPS], env=env, capture_output=True, text=True, timeout=300, check=True)
    return out.stdout.split("\n")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_keep_freed_memory_changes_no_number_and_can_be_switched_off():
    kept, default = _run_steps("1"), _run_steps("0")
    assert kept[0] == "tuned True" and default[0] == "tuned False"
    assert kept[1:] == default[1:]  # losses and gradient sums, bit for bit (float.hex)


def test_bench_writes_its_table_and_json(tmp_path, capsys):
    # numbers of a tiny model on a loaded CPU mean nothing; the test checks the plumbing
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--repeats", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    for key in ("pretrain_samples_per_s", "utilisation_vs_bf16_peak", "downstream_slices_per_s",
                "inference_seconds_per_volume", "peak_memory_mb", "backbone_flops_per_sample"):
        assert result[key] > 0, key
    # utilisation is its definition: useful FLOPs x samples/s / measured peak
    expected = result["backbone_flops_per_sample"] * result["pretrain_samples_per_s"] / result["peak_bf16_flops"]
    assert result["utilisation_vs_bf16_peak"] == pytest.approx(expected)
    assert "samples/s" in table and "utilisation vs bf16 peak" in table
    # an existing file is refused without --overwrite, and left as it was
    before = out.read_bytes()
    assert main(["bench", "--preset", "tiny", "--repeats", "1", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (the paper preset's GPU check)")
def test_paper_preset_trains_on_cuda_and_reports_speed_and_memory(tmp_path):
    out = tmp_path / "bench-paper-cuda.json"
    assert main(["bench", "--preset", "paper", "--device", "cuda", "--repeats", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"].startswith("cuda") and result["bf16"] is True
    assert result["pretrain_samples_per_s"] > 0 and result["peak_memory_mb"] > 0


def test_pretraining_sends_channels_last_gradients_into_the_backbone():
    # A (B, C, H, W)-ordered gradient reaching the channels_last backbone output (it came from
    # slicing the features into f1 and f2) made the last ReLU's backward take a strided path
    # about 25x slower; the lookups must hand back the features' own layout.
    import torch

    from pix2rep.config import preset_config
    from pix2rep.training.pretrain import build_pretraining_modules, pretrain_loss

    cfg = preset_config("tiny")
    backbone, head = build_pretraining_modules(cfg)
    backbone.to(memory_format=torch.channels_last)
    seen = []

    def record_output_gradient(module, inputs, out):
        out.register_hook(seen.append)  # returns None: the output itself is unchanged

    backbone.register_forward_hook(record_output_gradient)
    x = torch.rand(4, 1, 32, 32)
    pretrain_loss(backbone, head, x, cfg, torch.Generator().manual_seed(0), amp=True).backward()
    assert len(seen) == 1 and seen[0].shape == (8, cfg.model.out_channels, 32, 32)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
