"""Few-shot segmentation on top of a backbone (METHOD section 5).

Modes, all training a 1x1-conv head (D -> 4 classes) on the backbone output:

- ``probe``: linear probing; the pretrained backbone is frozen and kept in eval mode.
- ``finetune``: the whole pretrained network, with separate learning rates for backbone
  and head.
- ``scratch``: the supervised baseline, the same U-Net and head from random initialisation.
- ``random-probe``: a linear probe on a randomly initialised, frozen backbone (the floor
  that shows what pretraining adds to probing).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from ..config import RunConfig
from ..data.dataset import PreparedPatient, stack_slices
from ..errors import Pix2RepError
from ..models import SegmentationModel, UNet
from ..transforms import augment_intensity
from .common import MetricsLog, autocast, plot_curves, resolve_device, save_checkpoint, versions

METRIC_COLUMNS = ("epoch", "step", "train_loss", "val_loss", "samples_per_s", "seconds")
FROZEN_MODES = ("probe", "random-probe")


def segmentation_loss(name: str) -> nn.Module:
    """MONAI soft Dice with softmax over 4 classes, background included (optionally + CE)."""
    if name == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True, include_background=True)
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)


def build_segmentation_model(cfg: RunConfig, backbone_state: Optional[dict] = None) -> SegmentationModel:
    backbone = UNet(cfg.model)
    if backbone_state is not None:
        backbone.load_state_dict(backbone_state)
    return SegmentationModel(backbone, cfg.model.num_classes)


@torch.no_grad()
def calibrate_batchnorm(backbone: nn.Module, images: torch.Tensor, device, amp: bool, memory_format, batch_size: int = 32) -> None:
    """Set BatchNorm running statistics from the training images (cumulative average).

    A randomly initialised backbone has running statistics (mean 0, variance 1) that match no
    real activations; in eval mode its deep features then blow up or vanish, and a probe on
    them learns nothing. Recomputing them on the training slices makes the random-backbone
    probe a fair floor. (Pretrained backbones keep the statistics learned in pretraining.)
    """
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the calibration batches
    backbone.train()
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).contiguous(memory_format=memory_format)
        with autocast(device, amp):
            backbone(x)
    backbone.eval()


def _optimizer(model: SegmentationModel, cfg: RunConfig) -> torch.optim.Optimizer:
    d = cfg.downstream
    if d.mode in FROZEN_MODES:
        return torch.optim.Adam(model.head.parameters(), lr=d.lr_probe)
    if d.mode == "finetune":
        return torch.optim.Adam(
            [{"params": model.backbone.parameters(), "lr": d.lr_backbone}, {"params": model.head.parameters(), "lr": d.lr_head}]
        )
    return torch.optim.Adam(model.parameters(), lr=d.lr_scratch)


def _forward(model: SegmentationModel, x: torch.Tensor, frozen: bool) -> torch.Tensor:
    if frozen:
        with torch.no_grad():
            feats = model.backbone(x)
        return model.head(feats)
    return model(x)


@torch.no_grad()
def _mean_loss(model, slices, loss_fn, cfg: RunConfig, device, amp: bool) -> float:
    model.eval()
    losses = []
    for i in range(0, len(slices), 32):
        x = slices.images[i : i + 32].to(device)
        y = slices.masks[i : i + 32, None].to(device)
        with autocast(device, amp):
            logits = model(x)
        losses.append(float(loss_fn(logits.float(), y)) * len(x))
    return float(np.sum(losses) / len(slices))


def train_segmentation(
    cfg: RunConfig,
    patients: Sequence[PreparedPatient],
    out_dir: Optional[Path] = None,
    backbone_state: Optional[dict] = None,
    val_patients: Sequence[PreparedPatient] = (),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[SegmentationModel, dict]:
    """Train on the annotated slices of ``patients``; returns (model, summary).

    ``backbone_state`` is the pretrained backbone (probe, finetune); it must be None for
    ``scratch`` and ``random-probe``. With ``out_dir``, writes config.yaml, model.pt,
    metrics.csv and loss.png. Model selection only ever looks at ``val_patients``.
    """
    from tqdm.auto import tqdm

    d = cfg.downstream
    if d.mode in ("probe", "finetune") and backbone_state is None:
        raise Pix2RepError(f"mode {d.mode!r} needs a pretrained model (-m)")
    if d.mode in ("scratch", "random-probe") and backbone_state is not None:
        raise Pix2RepError(f"mode {d.mode!r} starts from a random backbone; do not pass a pretrained model")
    if d.stopping == "validation" and not val_patients:
        raise Pix2RepError("stopping='validation' needs validation patients (downstream.val_patients > 0)")
    device = resolve_device(cfg.device)
    amp = bool(cfg.bf16)
    torch.manual_seed(d.seed)
    train = stack_slices(patients, labeled=True)
    val = stack_slices(val_patients, labeled=True) if val_patients else None
    model = build_segmentation_model(cfg, backbone_state)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    frozen = d.mode in FROZEN_MODES
    if frozen:
        model.backbone.requires_grad_(False)
    if d.mode == "random-probe":
        calibrate_batchnorm(model.backbone, train.images, device, amp, memory_format)
    optimizer = _optimizer(model, cfg)
    loss_fn = segmentation_loss(d.loss)
    gen = torch.Generator(device=device).manual_seed(d.seed)
    pick_gen = torch.Generator().manual_seed(d.seed)
    metrics = MetricsLog(out_dir / "metrics.csv", METRIC_COLUMNS) if out_dir else None
    if out_dir:
        cfg.save(out_dir / "config.yaml")

    log_every = max(1, min(d.eval_every, d.steps))
    best = (float("inf"), None)
    bad_evals, running, t0, t_block = 0, 0.0, time.time(), time.time()
    bar = tqdm(range(1, d.steps + 1), desc=d.mode, disable=not progress, leave=False)
    for step in bar:
        model.train()
        if frozen:
            model.backbone.eval()  # frozen backbone: BatchNorm uses its pretrained statistics
        idx = torch.randint(len(train), (d.batch_size,), generator=pick_gen)
        x = train.images[idx].to(device)
        y = train.masks[idx, None].to(device)
        if d.augment:
            x = augment_intensity(x, cfg.intensity, gen)
        x = x.contiguous(memory_format=memory_format)
        with autocast(device, amp):
            logits = _forward(model, x, frozen)
        loss = loss_fn(logits.float(), y)
        if not torch.isfinite(loss):
            raise Pix2RepError(f"non-finite loss ({float(loss)}) at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += float(loss.detach())
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if step % log_every == 0 or step == d.steps:
            n_block = step - (0 if not metrics or not metrics.rows else int(metrics.rows[-1]["step"]))
            val_loss = _mean_loss(model, val, loss_fn, cfg, device, amp) if val is not None else float("nan")
            row = {
                "epoch": step // log_every,
                "step": step,
                "train_loss": f"{running / n_block:.6f}",
                "val_loss": f"{val_loss:.6f}",
                "samples_per_s": f"{n_block * d.batch_size / (time.time() - t_block):.2f}",
                "seconds": f"{time.time() - t0:.1f}",
            }
            running, t_block = 0.0, time.time()
            if metrics is not None:
                metrics.append(row)
            if d.stopping == "validation":
                if val_loss < best[0]:
                    best = (val_loss, {k: v.detach().clone() for k, v in model.state_dict().items()})
                    bad_evals = 0
                else:
                    bad_evals += 1
                    if bad_evals >= d.patience:
                        log(f"early stop at step {step}: no validation improvement in {d.patience} evaluations")
                        break
    if d.stopping == "validation" and best[1] is not None:
        model.load_state_dict(best[1])
    model.eval()
    summary = {"steps": step, "seconds": time.time() - t0, "best_val_loss": best[0], "train_slices": len(train)}
    if out_dir:
        save_segmentation_checkpoint(out_dir / "model.pt", model, cfg, summary)
        plot_curves(metrics.rows, out_dir / "loss.png", ("train_loss", "val_loss"), f"{d.mode} ({len(patients)} patients)")
    return model, summary


def save_segmentation_checkpoint(path: Path, model: SegmentationModel, cfg: RunConfig, summary: dict) -> None:
    save_checkpoint(
        path,
        {
            "kind": "pix2rep-segmentation",
            "config": cfg.to_dict(),
            "versions": versions(),
            "backbone": model.backbone.state_dict(),
            "segmentation_head": model.head.state_dict(),
            "summary": {k: float(v) for k, v in summary.items()},
        },
    )
