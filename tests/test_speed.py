"""Speed plumbing: the allocator setting changes no number, and ``pix2rep bench`` writes its table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pix2rep.cli import main
from pix2rep.runtime import bf16_is_native

SRC = str(Path(__file__).resolve().parents[1] / "src")

# One tiny pretraining step and one fine-tuning step; prints every number they produce.
_STEPS = """
import torch
from pix2rep.config import preset_config
from pix2rep.runtime import keep_freed_memory
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
    for key in ("pretrain_samples_per_s", "utilisation_vs_fp32_peak", "downstream_slices_per_s",
                "inference_seconds_per_volume", "peak_memory_mb", "backbone_flops_per_sample"):
        assert result[key] > 0, key
    # utilisation is its definition: useful FLOPs x samples/s / measured peak
    useful = result["backbone_flops_per_sample"] * result["pretrain_samples_per_s"]
    assert result["utilisation_vs_fp32_peak"] == pytest.approx(useful / result["peak_fp32_flops"])
    # bf16 is measured and used only where the CPU has it natively
    assert result["bf16"] is bf16_is_native(torch.device("cpu"))
    if result["bf16"]:
        assert result["utilisation_vs_bf16_peak"] == pytest.approx(useful / result["peak_bf16_flops"])
    else:
        assert result["peak_bf16_flops"] is None and result["utilisation_vs_bf16_peak"] is None
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


@pytest.mark.parametrize("native, requested, expected", [
    (True, True, torch.bfloat16),
    (True, False, torch.float32),
    (False, True, torch.float32),  # emulated bf16 is hundreds of times slower: fp32 instead
    (False, False, torch.float32),
])
def test_bf16_autocast_only_where_the_device_computes_bf16_natively(monkeypatch, native, requested, expected):
    from pix2rep import runtime as common

    monkeypatch.setattr(common, "bf16_is_native", lambda device: native)
    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    with common.autocast(torch.device("cpu"), requested):
        assert layer(x).dtype == expected
    assert common.use_bf16(requested, torch.device("cpu")) is (expected == torch.bfloat16)


def test_this_cpu_reports_its_bf16_support_as_mkldnn_does():
    from pix2rep.runtime import bf16_is_native

    assert bf16_is_native(torch.device("cpu")) is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_bench_times_the_functions_the_training_loops_run(monkeypatch):
    from pix2rep import speed
    from pix2rep.config import preset_config
    from pix2rep.training import downstream, pretrain

    calls = []
    for module, name in ((pretrain, "make_views"), (pretrain, "pretrain_step"), (downstream, "train_step")):
        def recorded(*args, _real=getattr(module, name), _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, recorded)
    cfg = preset_config("tiny", preprocess={"size": 32}, pretrain={"batch_size": 2}, downstream={"batch_size": 2})
    augment, _, full_step, _ = speed._pretraining_parts(cfg, torch.device("cpu"), amp=False)
    augment()
    assert calls == ["make_views"]
    full_step()
    assert calls[1:] == ["pretrain_step", "make_views"]  # the step's own augmentation inside
    speed._downstream_slices_per_s(cfg, torch.device("cpu"), amp=False, repeats=1)
    assert calls[3:] == ["train_step"] * 3  # two warm-up steps and one timed


# Step seconds by (first width, D), as a machine without native bf16 might measure them: 20 epochs
# of 800 slices (batch 8: 2000 steps) take 1.05 x 2000 x s / 60 minutes, so 2.0 s is 70 minutes,
# 0.6 s 21 and 0.4 s 14.
_FP32_STEP = {(16, 64): 2.0, (16, 32): 1.2, (8, 32): 0.6, (8, 16): 0.45, (4, 16): 0.4}


@pytest.mark.parametrize("step_by_size, budget, expected", [
    ({(16, 64): 0.6}, 28.0, (16, 64)),  # fast machine: 21 min for the preset's own model, kept
    (_FP32_STEP, 28.0, (8, 32)),  # 70 and 42 minutes for the larger two; 21 for widths 8.., D = 32
    (_FP32_STEP, 10.0, (4, 16)),  # nothing fits: the smallest
])
def test_fit_model_size_keeps_the_largest_model_whose_epochs_fit_the_budget(step_by_size, budget, expected):
    from pix2rep.config import apply_overrides, preset_config
    from pix2rep.speed import fit_model_size

    cfg = apply_overrides(preset_config("cpu"), {"pretrain.max_minutes": budget})
    timed = []

    def step_seconds(candidate):
        size = (candidate.model.widths[0], candidate.model.out_channels)
        timed.append(size)
        return step_by_size[size]

    lines = []
    fitted = fit_model_size(cfg, 800, lines.append, step_seconds=step_seconds)
    sizes = list(cfg.pretrain.fit_sizes)
    assert timed == sizes[: sizes.index(expected) + 1]  # stops at the first that fits
    first, d = expected
    assert fitted.model.widths == tuple(first * 2**k for k in range(5)) and fitted.model.out_channels == d
    assert fitted.pretrain.fit_sizes == () and cfg.pretrain.fit_sizes == tuple(sizes)
    assert f"D = {d}" in lines[0] and ("none fits" in lines[0]) == (expected == (4, 16))


@pytest.mark.parametrize("sizes, message", [([[16, 64, 3]], r"fit_sizes\[0\] must have 2 entries"),
                                           ([[16, 0]], "pairs of positive integers")])
def test_fit_sizes_must_be_pairs_of_positive_integers(sizes, message):
    from pix2rep.config import apply_overrides, preset_config
    from pix2rep.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        apply_overrides(preset_config("cpu"), {"pretrain.fit_sizes": sizes})


def test_a_fitted_run_records_its_model_and_a_resume_keeps_it(synthetic_root, tmp_path, monkeypatch, capsys):
    import pix2rep.speed as speed
    from pix2rep.config import RunConfig

    # widths from 8 cost 1 s a step, from 4 0.01 s: 1 epoch of about 23 steps fits 0.1 minutes only
    # with the smaller model.
    monkeypatch.setattr(speed, "pretraining_step_seconds", lambda c, repeats=3: {8: 1.0, 4: 0.01}[c.model.widths[0]])
    out = tmp_path / "pre"
    args = ["pretrain", "--data", str(synthetic_root), "--preset", "tiny", "--epochs", "1", "--out", str(out),
            "--no-progress", "--set", "pretrain.fit_sizes=[[8,16],[4,8]]", "--set", "pretrain.max_minutes=0.1"]
    assert main(args) == 0
    assert "model size: widths 4-8-16, D = 8" in capsys.readouterr().out
    saved = RunConfig.load(out / "config.yaml")
    assert saved.model.widths == (4, 8, 16) and saved.model.out_channels == 8 and saved.pretrain.fit_sizes == ()
    # a resume does not measure again, even where the machine now measures otherwise
    monkeypatch.setattr(speed, "pretraining_step_seconds", lambda c, repeats=3: 0.0)
    assert main(args + ["--resume"]) == 0
    assert "D = 8, as chosen when this run started" in capsys.readouterr().out
