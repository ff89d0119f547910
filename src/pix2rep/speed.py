"""``pix2rep bench``: throughput, FLOP utilisation and memory of one preset on this machine.

Definitions (issue 7):

- a pretraining *sample* is one slice, seen as two views;
- useful FLOPs per sample = forward + backward FLOPs of the BACKBONE on the two views, counted
  with ``torch.utils.flop_counter``; the head, the warp, the augmentation and the loss are
  overhead;
- utilisation = useful FLOPs x samples/s / the machine's matmul peak, measured in the same run
  with large square matmuls (bf16, and fp32 for reference).

This is a benchmark, not a test: it measures, prints a table and writes JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .atomic import atomic_write_bytes
from .config import RunConfig
from .models import SegmentationModel, UNet, memory_format
from .provenance import cpu_model_name
from .runtime import autocast, keep_freed_memory, resolve_device, use_bf16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: Optional[int] = None, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matmul (2 n^3 FLOPs), the machine's practical peak."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _timed(lambda: a @ b, device, repeats)
    return 2 * n**3 / seconds


def backbone_flops_per_sample(cfg: RunConfig, device: torch.device) -> int:
    """Forward + backward FLOPs of the backbone on the two views of one slice."""
    from torch.utils.flop_counter import FlopCounterMode

    backbone = UNet(cfg.model).to(device)
    size = cfg.preprocess.size
    views = torch.rand(2, 1, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        backbone(views).sum().backward()
    return int(counter.get_total_flops())


def _pretraining_parts(cfg: RunConfig, device: torch.device, amp: bool, compile_backbone: bool = False):
    """Callables timing the parts of the training loop's own step on one fixed batch: the
    augmentation (:func:`make_views`), the backbone alone, the whole :func:`pretrain_step`,
    and the optimiser's update."""
    from .training.pretrain import PretrainNet, build_pretraining_modules, make_views, pretrain_step

    backbone, head = build_pretraining_modules(cfg)
    backbone.to(device, memory_format=memory_format(cfg.channels_last)).train()
    head.to(device).train()
    if compile_backbone:  # scripts/fp32_step_options.py: does inductor raise the step's speed?
        backbone = torch.compile(backbone)
    net = PretrainNet(backbone, head, cfg, amp)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.pretrain.lr)
    gen = torch.Generator(device=device).manual_seed(0)
    B, S = cfg.pretrain.batch_size, cfg.preprocess.size
    x = torch.rand(B, 1, S, S, generator=gen, device=device)

    def augment():
        return make_views(x, cfg, gen)

    def backbone_only(views):
        with autocast(device, amp):
            feats = backbone(views)
        feats.backward(torch.ones_like(feats))  # a gradient of the features' shape, no loss ops

    def full_step():
        pretrain_step(net, optimizer, x, gen, params, cfg.pretrain.grad_clip)

    def optimiser_step():
        optimizer.step()

    return augment, backbone_only, full_step, optimiser_step


def pretraining_step_seconds(cfg: RunConfig, repeats: int = 3, compile_backbone: bool = False) -> float:
    """Median seconds of one whole pretraining step of ``cfg`` (batch ``pretrain.batch_size``) on
    its device, after two warm-up steps (which also compile, with ``compile_backbone``)."""
    device = resolve_device(cfg.device)
    keep_freed_memory()  # as pretraining runs (measured: 0.53 against 0.65 s for the `cpu` step)
    full_step = _pretraining_parts(cfg, device, use_bf16(cfg.bf16, device), compile_backbone)[2]
    return _timed(full_step, device, repeats, warmup=2)


def _with_model(cfg: RunConfig, model) -> RunConfig:
    """``cfg`` with ``model`` and no ``fit_sizes`` left: what a fitted run records and reruns."""
    return dataclasses.replace(cfg, model=model, pretrain=dataclasses.replace(cfg.pretrain, fit_sizes=()))


def _model_size(model) -> str:
    return f"widths {'-'.join(map(str, model.widths))}, D = {model.out_channels}"


def sized_model(cfg: RunConfig, first_width: int, d: int) -> RunConfig:
    """``cfg`` with widths doubling from ``first_width`` (as many levels as before), D = ``d``, and
    no ``fit_sizes`` left."""
    widths = tuple(first_width * 2**level for level in range(len(cfg.model.widths)))
    return _with_model(cfg, dataclasses.replace(cfg.model, widths=widths, out_channels=d))


def fit_model_size(cfg: RunConfig, n_train_slices: int, log=print, step_seconds=None) -> RunConfig:
    """``cfg`` with the first model of ``pretrain.fit_sizes`` whose ``epochs`` over
    ``n_train_slices`` fit in ``pretrain.max_minutes`` at the measured step time (the last one if
    none fits), and that list emptied, so the returned configuration trains that model when rerun.
    Unchanged when there is no list or no time cap. ``step_seconds(cfg)`` times one step
    (:func:`pretraining_step_seconds` by default)."""
    p = cfg.pretrain
    if not p.fit_sizes or p.max_minutes is None:
        return cfg
    step_seconds = step_seconds or pretraining_step_seconds
    steps = p.epochs * math.ceil(n_train_slices / p.batch_size)
    projected = []
    for first_width, d in p.fit_sizes:
        candidate = sized_model(cfg, first_width, d)
        # validation passes and the per-epoch checkpoint cost a little on top of the steps
        minutes = 1.05 * steps * step_seconds(candidate) / 60
        projected.append(f"widths from {first_width}, D = {d}: about {minutes:.0f} min")
        if minutes <= p.max_minutes:
            break
    verdict = (f"the largest candidate that fits the {p.max_minutes}-minute budget" if minutes <= p.max_minutes
               else f"the smallest candidate; none fits the {p.max_minutes}-minute budget, which will cut the epochs")
    log(f"model size: {_model_size(candidate.model)}, {verdict} ({p.epochs} epochs of {n_train_slices} slices, "
        f"projected from a measured step: {', '.join(projected)})")
    return candidate


def fit_model_size_for_run(cfg: RunConfig, patients, out: Path, resume: bool, log=print) -> RunConfig:
    """:func:`fit_model_size` for a run in ``out`` that pretrains on ``patients``: a resumed run
    keeps the model its config.yaml recorded instead of measuring again."""
    if not cfg.pretrain.fit_sizes:
        return cfg
    saved = Path(out) / "config.yaml"
    if resume and saved.is_file():
        model = RunConfig.load(saved).model
        log(f"model size: {_model_size(model)}, as chosen when this run started ({saved})")
        return _with_model(cfg, model)
    from .training.pretrain import split_validation_patients

    train, _ = split_validation_patients(patients, cfg.pretrain.val_fraction, cfg.pretrain.seed)
    n = sum(len(v.images) for p in train for v in (*p.volumes, *p.unlabeled))
    return fit_model_size(cfg, n, log)


def measure(cfg: RunConfig, repeats: int = 8, volume_path: Optional[Path] = None, log=print) -> dict:
    """Every figure of the bench table for ``cfg`` on its device."""
    device = resolve_device(cfg.device)
    amp = use_bf16(cfg.bf16, device)  # a device without native bf16 trains in fp32
    torch.manual_seed(0)
    result: dict = {"preset": cfg.preset, "device": str(device), "bf16": amp, "channels_last": cfg.channels_last,
                    "keep_freed_memory": keep_freed_memory(),
                    "image_size": cfg.preprocess.size, "batch_size": cfg.pretrain.batch_size,
                    "threads": torch.get_num_threads(), "torch": str(torch.__version__), "machine": _machine(device)}
    log("measuring matmul peaks ...")
    # emulated bf16 would take minutes per matmul and is never used for training there
    result["peak_bf16_flops"] = matmul_peak_flops(device, torch.bfloat16) if amp else None
    result["peak_fp32_flops"] = matmul_peak_flops(device, torch.float32)
    result["backbone_flops_per_sample"] = backbone_flops_per_sample(cfg, device)

    log("measuring the pretraining step ...")
    augment, backbone_only, full_step, optimiser_step = _pretraining_parts(cfg, device, amp)
    step_s = _timed(full_step, device, repeats)
    aug_s = _timed(augment, device, repeats)
    views = augment()[0]
    backbone_s = _timed(lambda: backbone_only(views), device, repeats)
    optim_s = _timed(optimiser_step, device, repeats)
    B = cfg.pretrain.batch_size
    samples_per_s = B / step_s
    result["pretrain_samples_per_s"] = samples_per_s
    result["pretrain_step_seconds"] = step_s
    result["step_split_seconds"] = {
        "augmentation (2 intensity views, affine, warp)": aug_s,
        "backbone forward + backward": backbone_s,
        "optimiser": optim_s,
        "sampling, warp lookup, head, loss (the rest)": max(step_s - aug_s - backbone_s - optim_s, 0.0),
    }
    useful = result["backbone_flops_per_sample"] * samples_per_s
    result["useful_flops_per_s"] = useful
    result["utilisation_vs_bf16_peak"] = useful / result["peak_bf16_flops"] if amp else None
    result["utilisation_vs_fp32_peak"] = useful / result["peak_fp32_flops"]

    log("measuring downstream training ...")
    result["downstream_slices_per_s"] = _downstream_slices_per_s(cfg, device, amp, repeats)
    log("measuring inference ...")
    result.update(_inference_seconds(cfg, device, amp, volume_path))
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS
    return result


def _downstream_slices_per_s(cfg: RunConfig, device: torch.device, amp: bool, repeats: int) -> float:
    """Annotated slices per second of the downstream loop's own step (:func:`train_step`),
    training from scratch."""
    from .losses import segmentation_loss
    from .training.downstream import Supervised, build_optimizer, build_segmentation_model, train_step

    model = build_segmentation_model(cfg).to(device, memory_format=memory_format(cfg.channels_last))
    optimizer = build_optimizer(model, cfg, "scratch")
    training = Supervised(model, segmentation_loss(cfg.downstream.loss), False, cfg, device, amp)
    training.train()
    B, S = cfg.downstream.batch_size, cfg.preprocess.size
    x = torch.rand(B, 1, S, S, device=device)
    y = torch.randint(0, cfg.model.num_classes, (B, 1, S, S), device=device)
    return B / _timed(lambda: train_step(training, optimizer, x, y, 1, cfg.downstream.grad_clip), device, repeats)


def _inference_seconds(cfg: RunConfig, device: torch.device, amp: bool, volume_path: Optional[Path]) -> dict:
    """Seconds to segment one volume: preprocessing (label-free ROI) + network + back to the grid."""
    from .data.nifti import read_nifti_volume
    from .data.preprocess import prepare_volume
    from .data.volume import Volume
    from .inference import predict_prepared

    model = SegmentationModel(UNet(cfg.model), cfg.model.num_classes).to(device).eval()
    if volume_path is not None:
        volume = read_nifti_volume(volume_path)
        source = str(volume_path)
    else:  # an ACDC-like volume: 10 slices of 216 x 256 at 1.5 x 1.5 x 10 mm
        rng = np.random.default_rng(0)
        image = rng.normal(200, 50, (10, 216, 256)).astype(np.float32)
        volume = Volume(image=image, spacing=(10.0, 1.5, 1.5), affine=np.diag([1.5, 1.5, 10.0, 1.0]))
        source = "a random 10 x 216 x 256 volume"

    def run():
        prepared = prepare_volume(volume, cfg.preprocess)
        predict_prepared(model, prepared, device, amp)

    seconds = _timed(run, device, repeats=5, warmup=1)
    return {"inference_seconds_per_volume": seconds, "inference_volume": source,
            "inference_volume_slices": int(volume.image.shape[0])}


def _machine(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()


def _gflops(flops: Optional[float]) -> str:
    return "n/a (no native bf16: training runs in fp32)" if flops is None else f"{flops / 1e9:.1f}"


def _percent(fraction: Optional[float]) -> str:
    return "n/a (no native bf16)" if fraction is None else f"{100 * fraction:.1f} %"


def format_table(r: dict) -> str:
    g = 1e9
    rows = [
        ("machine", f"{r['machine']} ({r['device']}, {r['threads']} threads), torch {r['torch']}"),
        ("preset / input", f"{r['preset']}, {r['image_size']} px, batch {r['batch_size']}, bf16 {r['bf16']}, channels_last {r['channels_last']}, "
                           f"keep_freed_memory {r.get('keep_freed_memory')}"),
        ("matmul peak bf16 / fp32", f"{_gflops(r['peak_bf16_flops'])} / {_gflops(r['peak_fp32_flops'])} GFLOP/s"),
        ("backbone FLOPs per sample (fwd+bwd, 2 views)", f"{r['backbone_flops_per_sample'] / g:.3f} GFLOP"),
        ("pretraining", f"{r['pretrain_samples_per_s']:.1f} samples/s ({r['pretrain_step_seconds'] * 1000:.0f} ms per step)"),
        ("utilisation vs bf16 peak", _percent(r["utilisation_vs_bf16_peak"])),
        ("utilisation vs fp32 peak", f"{100 * r['utilisation_vs_fp32_peak']:.1f} %"),
    ]
    for part, secs in r["step_split_seconds"].items():
        rows.append((f"  step: {part}", f"{secs * 1000:.0f} ms ({100 * secs / r['pretrain_step_seconds']:.0f} %)"))
    rows += [
        ("downstream training", f"{r['downstream_slices_per_s']:.1f} slices/s"),
        ("inference per volume", f"{r['inference_seconds_per_volume']:.3f} s ({r['inference_volume_slices']} slices; {r['inference_volume']})"),
        ("peak memory", f"{r['peak_memory_mb']:.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def write_json(result: dict, path: Path) -> None:
    atomic_write_bytes(path, json.dumps(result, indent=2).encode())
