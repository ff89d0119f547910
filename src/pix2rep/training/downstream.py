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
from ..runs import MetricsLog, plot_curves
from ..runtime import autocast, keep_freed_memory, resolve_device, use_bf16
from ..checkpoints import save_checkpoint
from ..provenance import versions
from .distributed import SINGLE, DistContext, any_rank, barrier, mean_over_ranks, wrap_ddp

METRIC_COLUMNS = ("epoch", "step", "train_loss", "val_loss", "samples_per_s", "seconds")
FROZEN_MODES = ("probe", "random-probe")
MT_METRIC_COLUMNS = ("epoch", "step", "train_loss", "consistency", "weight", "seconds")


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


def _optimizer(
    model: SegmentationModel, cfg: RunConfig, mode: str, pretrained_prefixes: Optional[Sequence[str]] = None
) -> torch.optim.Optimizer:
    """Adam with METHOD's rates; in fine-tuning, backbone parameters that pretraining did not
    train (``pretrained_prefixes``, e.g. a SimCLR decoder) get the from-scratch rate."""
    d = cfg.downstream
    if mode in FROZEN_MODES:
        return torch.optim.Adam(model.head.parameters(), lr=d.lr_probe)
    if mode == "finetune":
        prefixes = tuple(pretrained_prefixes or ("",))
        if prefixes == ("",):
            return torch.optim.Adam(
                [{"params": model.backbone.parameters(), "lr": d.lr_backbone}, {"params": model.head.parameters(), "lr": d.lr_head}]
            )
        named = list(model.backbone.named_parameters())
        trained = [p for n, p in named if n.startswith(prefixes)]
        untrained = [p for n, p in named if not n.startswith(prefixes)]
        return torch.optim.Adam(
            [{"params": trained, "lr": d.lr_backbone}, {"params": untrained, "lr": d.lr_scratch},
             {"params": model.head.parameters(), "lr": d.lr_head}]
        )
    return torch.optim.Adam(model.parameters(), lr=d.lr_scratch)


def _forward(model: SegmentationModel, x: torch.Tensor, frozen: bool) -> torch.Tensor:
    if frozen:
        with torch.no_grad():
            feats = model.backbone(x)
        return model.head(feats)
    return model(x)


class _TrainingForward(nn.Module):
    """The training forward (frozen backbone or not) as a module, the unit DDP wraps."""

    def __init__(self, model: SegmentationModel, frozen: bool):
        super().__init__()
        self.model, self.frozen = model, frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self.model, x, self.frozen)


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
    ctx: DistContext = SINGLE,
    pretrained_prefixes: Optional[Sequence[str]] = None,
    unlabeled_patients: Sequence[PreparedPatient] = (),
) -> tuple[SegmentationModel, dict]:
    """Train on the annotated slices of ``patients``; returns (model, summary).

    ``backbone_state`` is the pretrained backbone (probe, finetune); it must be None for
    ``scratch`` and ``random-probe``. With ``out_dir``, writes config.yaml, model.pt,
    metrics.csv and loss.png. Model selection only ever looks at ``val_patients``.
    Under torchrun (``ctx``), each rank draws its own batches of ``batch_size``, DDP averages
    the gradients (and broadcasts rank 0's BatchNorm buffers), and only rank 0 writes files.
    """
    from tqdm.auto import tqdm

    d = cfg.downstream
    keep_freed_memory()
    if d.mode == "mean-teacher":
        if ctx.enabled:
            raise Pix2RepError("Mean Teacher runs in one process (no torchrun support yet)")
        return train_mean_teacher(cfg, patients, unlabeled_patients, out_dir, backbone_state, pretrained_prefixes, progress, log)
    if d.mode in ("probe", "finetune") and backbone_state is None:
        raise Pix2RepError(f"mode {d.mode!r} needs a pretrained model (-m)")
    if d.mode in ("scratch", "random-probe") and backbone_state is not None:
        raise Pix2RepError(f"mode {d.mode!r} starts from a random backbone; do not pass a pretrained model")
    if d.stopping == "validation" and not val_patients:
        raise Pix2RepError("stopping='validation' needs validation patients (downstream.val_patients > 0)")
    device = resolve_device(cfg.device)
    amp = use_bf16(cfg.bf16, device)
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
    optimizer = _optimizer(model, cfg, d.mode, pretrained_prefixes)
    net = wrap_ddp(_TrainingForward(model, frozen), ctx)
    loss_fn = segmentation_loss(d.loss)
    gen = torch.Generator(device=device).manual_seed(d.seed + ctx.rank)
    pick_gen = torch.Generator().manual_seed(d.seed + ctx.rank)
    if not ctx.is_main:
        out_dir, log = None, _silent
    metrics = MetricsLog(out_dir / "metrics.csv", METRIC_COLUMNS) if out_dir else None
    if out_dir:
        cfg.save(out_dir / "config.yaml")

    log_every = max(1, min(d.eval_every, d.steps))
    best = (float("inf"), None)
    bad_evals, running, t0, t_block = 0, 0.0, time.time(), time.time()
    bar = tqdm(range(1, d.steps + 1), desc=d.mode, disable=not (progress and ctx.is_main), leave=False)
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
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        if any_rank(not bool(torch.isfinite(loss)), ctx):
            raise Pix2RepError(
                f"non-finite loss ({float(loss)}) at step {step} of {d.steps}; nothing was saved from this run"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if d.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], d.grad_clip)
        optimizer.step()
        running += float(loss.detach())
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if step % log_every == 0 or step == d.steps:
            n_block = step - (0 if not metrics or not metrics.rows else int(metrics.rows[-1]["step"]))
            val_loss = _mean_loss(model, val, loss_fn, cfg, device, amp) if val is not None else float("nan")
            row = {
                "epoch": step // log_every,
                "step": step,
                "train_loss": f"{mean_over_ranks(running / n_block, ctx):.6f}",
                "val_loss": f"{val_loss:.6f}",
                "samples_per_s": f"{n_block * d.batch_size * ctx.world / (time.time() - t_block):.2f}",
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
    barrier(ctx)
    return model, summary


def _silent(*args, **kwargs) -> None:
    pass


def consistency_weight(step: int, cfg: RunConfig) -> float:
    """Mean Teacher's sigmoid ramp-up, w(t) = w_max exp(-5 (1 - t)^2), t = step / ramp steps."""
    d = cfg.downstream
    ramp = max(1.0, d.mt_rampup * d.steps)
    t = min(1.0, step / ramp)
    return d.mt_consistency * float(np.exp(-5.0 * (1.0 - t) ** 2))


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """theta_teacher <- decay * theta_teacher + (1 - decay) * theta_student, for parameters only.

    BatchNorm buffers are left alone: the teacher runs in training mode and keeps statistics
    of its own weights (the student's statistics do not describe the averaged weights)."""
    for p_t, p_s in zip(teacher.parameters(), student.parameters()):
        p_t.lerp_(p_s, 1.0 - decay)


def train_mean_teacher(
    cfg: RunConfig,
    patients: Sequence[PreparedPatient],
    unlabeled_patients: Sequence[PreparedPatient],
    out_dir: Optional[Path] = None,
    backbone_state: Optional[dict] = None,
    pretrained_prefixes: Optional[Sequence[str]] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[SegmentationModel, dict]:
    """Mean Teacher (Tarvainen and Valpola, 2017) on top of fine-tuning or training from scratch.

    The student starts from ``backbone_state`` (learning rates of fine-tuning) or at random
    (the baseline's rate). Each step: the supervised loss on a batch of annotated slices, plus
    ``w(step)`` x the mean squared difference between the student's softmax on one intensity
    view of a batch of unlabeled pool slices and the teacher's softmax on another view. The
    teacher's weights are the exponential moving average of the student's (decay
    ``min(1 - 1/(step + 1), mt_ema)``); the teacher is evaluated.

    The teacher keeps BatchNorm statistics of its own (:func:`update_teacher` says why); copying
    the student's made a from-scratch teacher predict almost nothing (baseline-mt Dice 0.02-0.10
    in the first GPU study, commit 6e3da19).
    """
    import copy

    from tqdm.auto import tqdm

    d = cfg.downstream
    if not unlabeled_patients:
        raise Pix2RepError("Mean Teacher needs unlabeled patients (the pretraining pool)")
    device = resolve_device(cfg.device)
    amp = use_bf16(cfg.bf16, device)
    torch.manual_seed(d.seed)
    train = stack_slices(patients, labeled=True)
    pool = stack_slices(unlabeled_patients, labeled=False, include_unlabeled=True)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    student = build_segmentation_model(cfg, backbone_state).to(device, memory_format=memory_format)
    teacher = copy.deepcopy(student).requires_grad_(False).train()  # train mode: BatchNorm statistics of its own
    optimizer = _optimizer(student, cfg, "finetune" if backbone_state is not None else "scratch", pretrained_prefixes)
    loss_fn = segmentation_loss(d.loss)
    gen = torch.Generator(device=device).manual_seed(d.seed)
    pick_gen = torch.Generator().manual_seed(d.seed)
    metrics = MetricsLog(out_dir / "metrics.csv", MT_METRIC_COLUMNS) if out_dir else None
    if out_dir:
        cfg.save(out_dir / "config.yaml")
    log_every = max(1, min(d.eval_every, d.steps))
    sums, t0 = np.zeros(2), time.time()
    bar = tqdm(range(1, d.steps + 1), desc="mean-teacher", disable=not progress, leave=False)
    for step in bar:
        student.train()
        idx = torch.randint(len(train), (d.batch_size,), generator=pick_gen)
        x, y = train.images[idx].to(device), train.masks[idx, None].to(device)
        if d.augment:
            x = augment_intensity(x, cfg.intensity, gen)
        u = pool.images[torch.randint(len(pool), (d.mt_unlabeled_batch,), generator=pick_gen)].to(device)
        u_student, u_teacher = augment_intensity(u, cfg.intensity, gen), augment_intensity(u, cfg.intensity, gen)
        with autocast(device, amp):
            logits = student(torch.cat([x, u_student]).contiguous(memory_format=memory_format))
            with torch.no_grad():
                target = torch.softmax(teacher(u_teacher.contiguous(memory_format=memory_format)).float(), dim=1)
        supervised = loss_fn(logits[: len(x)].float(), y)
        consistency = (torch.softmax(logits[len(x) :].float(), dim=1) - target).pow(2).mean()
        loss = supervised + consistency_weight(step, cfg) * consistency
        if not torch.isfinite(loss):
            raise Pix2RepError(f"non-finite loss ({float(loss)}) at step {step} of {d.steps}; nothing was saved from this run")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if d.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(student.parameters(), d.grad_clip)
        optimizer.step()
        update_teacher(teacher, student, min(1.0 - 1.0 / (step + 1), d.mt_ema))
        sums += (float(supervised.detach()), float(consistency.detach()))
        bar.set_postfix(sup=f"{supervised.item():.4f}", cons=f"{consistency.item():.4f}")
        if metrics is not None and (step % log_every == 0 or step == d.steps):
            n_block = step - (int(metrics.rows[-1]["step"]) if metrics.rows else 0)
            metrics.append({"step": step, "epoch": step // log_every, "train_loss": f"{sums[0] / n_block:.6f}",
                            "consistency": f"{sums[1] / n_block:.6f}", "weight": f"{consistency_weight(step, cfg):.4f}",
                            "seconds": f"{time.time() - t0:.1f}"})
            sums[:] = 0
    teacher.eval()
    summary = {"steps": d.steps, "seconds": time.time() - t0, "best_val_loss": float("nan"), "train_slices": len(train)}
    if out_dir:
        save_segmentation_checkpoint(out_dir / "model.pt", teacher, cfg, summary)
        plot_curves(metrics.rows, out_dir / "loss.png", ("train_loss", "consistency"), f"mean teacher ({len(patients)} patients)")
    return teacher, summary


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
