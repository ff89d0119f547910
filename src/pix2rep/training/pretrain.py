"""Pix2Rep self-supervised pretraining (METHOD sections 2 and 3).

One step, for a batch x of B slices:

1. two intensity views v1 = I1(x), v2 = I2(x), and one random affine T per slice;
2. v2' = warp(v2, T) and the mask of positions whose source lies inside the image;
3. one backbone pass on [v1, v2'] gives f1 = f(v1) and f2 = f(v2') (two passes, with
   BatchNorm statistics per view, under ``pretrain.separate_view_passes``);
4. N positions p valid in both views are sampled over the batch;
5. u = f1 at T(p) (bilinear lookup), v = f2 at p; z = g(u), z' = g(v) (projection head);
6. loss = NT-Xent(z, z') (Pix2Rep) or Barlow Twins(z, z') (Pix2Rep-v2).

Step 5 differs from the reference, which warps the whole head output g(f(v1)) and then
samples it: here the backbone features are interpolated at T(p) and the head is applied to
those N vectors only. It skips running the head and the warp on every pixel of every slice,
the largest avoidable cost of a step. Two things change: off pixel-aligned sources this one
interpolates before the (non-linear) head instead of after, and in training the head's
BatchNorm normalises over the N sampled vectors instead of every pixel (in eval mode, at
pixel-aligned sources, the two agree exactly). ``pretrain.head_on_full_maps`` runs the
reference's order.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoints import load_checkpoint, load_state, save_checkpoint
from ..config import RunConfig
from ..data.dataset import PreparedPatient, SliceSet, stack_slices
from ..errors import Pix2RepError
from ..losses import barlow_twins, gather_positions, loss_dtype, nt_xent, sample_valid_positions
from ..models import ProjectionHead, UNet, memory_format
from ..provenance import versions
from ..runs import MetricsLog, plot_curves
from ..runtime import autocast, keep_freed_memory, precision_note, resolve_device, use_bf16
from ..transforms import augment_intensity, sample_affine, sample_at, warp
from .distributed import SINGLE, DistContext, any_rank, barrier, mean_over_ranks, wrap_ddp
from .step import NonFiniteLoss, optimizer_step

METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "samples_per_s", "seconds")
BARLOW_PIXELS = 4096  # pixel vectors per batch for the Barlow Twins statistics


def split_validation_patients(patients: Sequence[PreparedPatient], fraction: float, seed: int):
    """Hold out a fraction of the PATIENTS (never slices of a training patient) for validation."""
    ids = sorted(p.id for p in patients)
    n_val = int(math.ceil(fraction * len(ids))) if len(ids) > 1 and fraction > 0 else 0
    rng = np.random.default_rng(seed)
    val_ids = set(ids[i] for i in rng.permutation(len(ids))[:n_val])
    return [p for p in patients if p.id not in val_ids], [p for p in patients if p.id in val_ids]


def build_pretraining_modules(cfg: RunConfig) -> tuple[UNet, ProjectionHead]:
    backbone = UNet(cfg.model)
    # SimCLR projects the pooled bottleneck; Pix2Rep projects the D-dimensional pixel features
    in_dim = cfg.model.widths[-1] if cfg.pretrain.loss == "simclr" else cfg.model.out_channels
    head = ProjectionHead(in_dim, cfg.model.projection_hidden, cfg.model.projection_out)
    return backbone, head


def pretrained_prefixes(cfg: RunConfig) -> list[str]:
    """Backbone parameter-name prefixes that pretraining trains ("" = all of them)."""
    return list(UNet.ENCODER_PREFIXES) if cfg.pretrain.loss == "simclr" else [""]


def simclr_projections(backbone, head, x, cfg: RunConfig, generator: torch.Generator, amp: bool):
    """The image-level baseline (SimCLR): two views, each with its own intensity change and
    affine; the encoder's bottleneck, average-pooled over space, through the head."""
    B = x.shape[0]
    views = []
    for _ in range(2):
        v = augment_intensity(x, cfg.intensity, generator)
        theta = sample_affine(B, generator, cfg.spatial, device=x.device)
        views.append(warp(v, theta)[0])
    views = torch.cat(views).contiguous(memory_format=memory_format(cfg.channels_last))
    with autocast(x.device, amp):
        z = head(backbone.encode(views).mean(dim=(2, 3)))
    dtype = loss_dtype(z.dtype)
    return z[:B].to(dtype), z[B:].to(dtype)


def make_views(x: torch.Tensor, cfg: RunConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-2 of the module docstring for a batch ``x`` (B, 1, H, W) in [0, 1]: returns
    ``views`` = [v1; v2'] (2B, 1, H, W) in the configured memory format, the affine ``theta``
    (B, 2, 3) of T, and ``valid`` (B, 1, H, W), the positions whose source lies in the image.

    Draws from ``generator`` in this order: intensity view 1, intensity view 2, the affine."""
    B = x.shape[0]
    v1 = augment_intensity(x, cfg.intensity, generator)
    v2 = augment_intensity(x, cfg.intensity, generator)
    if cfg.spatial.enabled:
        theta = sample_affine(B, generator, cfg.spatial, device=x.device)
    else:  # invariance ablation: same geometry in both views
        theta = torch.eye(2, 3, device=x.device).expand(B, 2, 3).contiguous()
    v2, valid = warp(v2, theta)
    views = torch.cat([v1, v2]).contiguous(memory_format=memory_format(cfg.channels_last))
    return views, theta, valid


def head_on_maps(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The projection head on every pixel of ``features`` (M, D, H, W): (M, d, H, W), a
    channels_last view. One call over all M H W vectors, so BatchNorm normalises over them all."""
    M, D, H, W = features.shape
    z = head(features.permute(0, 2, 3, 1).reshape(M * H * W, D))
    return z.reshape(M, H, W, -1).permute(0, 3, 1, 2)


def pretrain_projections(
    backbone: nn.Module,
    head: nn.Module,
    x: torch.Tensor,
    cfg: RunConfig,
    generator: torch.Generator,
    amp: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-5 of the module docstring for a batch ``x`` (B, 1, H, W) in [0, 1]: the paired
    projections ``z = g(f1 at T(p))`` and ``z' = g(f2 at p)``, (N, d) in float32 (float64 for
    a float64 model, as the distributed test uses)."""
    if cfg.pretrain.loss == "simclr":
        return simclr_projections(backbone, head, x, cfg, generator, amp)
    B = x.shape[0]
    views, theta, valid = make_views(x, cfg, generator)
    with autocast(x.device, amp):
        if cfg.pretrain.separate_view_passes:  # the reference's two passes: BatchNorm statistics per view
            f1, f2, offset = backbone(views[:B]), backbone(views[B:]), 0
        else:  # rows 0..B-1 of one pass: f1 = f(v1); rows B..2B-1: f2 = f(v2')
            f1 = f2 = backbone(views)
            offset = B
    n = cfg.pretrain.n_samples if cfg.pretrain.loss == "infonce" else BARLOW_PIXELS
    b, y, px = sample_valid_positions(valid, n, generator)
    # Read the N sampled vectors first, then cast: no float32 copy of whole feature maps.
    # Both reads index the backbone's outputs themselves (one pass: rows b and B + b) rather than
    # slices of them, so that the gradient reaches the backbone in their memory format (channels_last).
    dtype = loss_dtype(f1.dtype)  # float32, or float64 for a float64 model
    if cfg.pretrain.head_on_full_maps:  # METHOD step 4 as written: the head first, then the warp
        with autocast(x.device, amp):  # per pass: with separate passes, head statistics per view too
            g1 = g2 = head_on_maps(head, f1)
            if f2 is not f1:
                g2 = head_on_maps(head, f2)
        u = sample_at(g1, theta, (b, y, px), dtype=dtype)
        v = gather_positions(g2, (b + offset, y, px)).to(dtype)
        return u, v
    u = sample_at(f1, theta, (b, y, px), dtype=dtype)
    v = gather_positions(f2, (b + offset, y, px)).to(dtype)
    with autocast(x.device, amp):
        z = head(torch.cat([u, v]))
    return z[: len(u)].to(dtype), z[len(u) :].to(dtype)


def projection_loss(zu: torch.Tensor, zv: torch.Tensor, cfg: RunConfig, ctx: DistContext = SINGLE) -> torch.Tensor:
    """Step 6. Across processes (``ctx``): InfoNCE takes its negatives from every rank when
    ``gather_negatives`` is set; Barlow Twins always standardises and correlates over the
    vectors of every rank (the statistics of the global batch)."""
    if cfg.pretrain.loss in ("infonce", "simclr"):
        return nt_xent(zu, zv, cfg.pretrain.temperature, gather_distributed=ctx.enabled and cfg.pretrain.gather_negatives)
    return barlow_twins(zu, zv, cfg.pretrain.barlow_lambda, gather_distributed=ctx.enabled)


def pretrain_loss(
    backbone: nn.Module,
    head: nn.Module,
    x: torch.Tensor,
    cfg: RunConfig,
    generator: torch.Generator,
    amp: bool,
    ctx: DistContext = SINGLE,
) -> torch.Tensor:
    """The self-supervised loss of one batch ``x`` (B, 1, H, W) in [0, 1] (module docstring)."""
    zu, zv = pretrain_projections(backbone, head, x, cfg, generator, amp)
    return projection_loss(zu, zv, cfg, ctx)


class PretrainNet(nn.Module):
    """Backbone + projection head whose forward is the loss: the unit DDP wraps."""

    def __init__(self, backbone: nn.Module, head: nn.Module, cfg: RunConfig, amp: bool, ctx: DistContext = SINGLE):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.cfg, self.amp, self.ctx = cfg, amp, ctx

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return pretrain_loss(self.backbone, self.head, x, self.cfg, generator, self.amp, self.ctx)


def pretrain_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    generator: torch.Generator,
    params: Sequence[nn.Parameter],
    grad_clip: float | None,
    ctx: DistContext = SINGLE,
) -> torch.Tensor:
    """One optimiser step of pretraining on the batch ``x``, as the training loop takes it:
    the loss ``net(x, generator)`` (a :class:`PretrainNet`, DDP-wrapped under torchrun), then
    :func:`~pix2rep.training.step.optimizer_step`. Returns the loss, detached; raises
    :class:`~pix2rep.training.step.NonFiniteLoss` (before any backward) on a NaN or inf."""
    return optimizer_step(net(x, generator), optimizer, params, grad_clip, ctx)


@torch.no_grad()
def validation_loss(backbone, head, slices: SliceSet, cfg: RunConfig, device, amp: bool, ctx: DistContext = SINGLE) -> float:
    """Mean loss over the validation slices in eval mode, with a fixed random stream, so the
    numbers are comparable across epochs. Across processes, each rank takes every
    world-th batch (losses computed locally) and the means are combined."""
    backbone.eval()
    head.eval()
    gen = torch.Generator(device=device).manual_seed(12345)
    bs = cfg.pretrain.batch_size
    losses = []
    for k, i in enumerate(range(0, len(slices) - bs + 1, bs)):
        if k % ctx.world != ctx.rank:
            continue
        x = slices.images[i : i + bs].to(device, non_blocking=True)
        losses.append(float(pretrain_loss(backbone, head, x, cfg, gen, amp)))
    if not ctx.enabled:
        return float(np.mean(losses)) if losses else float("nan")
    total = mean_over_ranks(float(np.sum(losses)), ctx) * ctx.world
    count = mean_over_ranks(float(len(losses)), ctx) * ctx.world
    return total / count if count else float("nan")


def pretrain(
    cfg: RunConfig,
    patients: Sequence[PreparedPatient],
    out_dir: Path,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    ctx: DistContext = SINGLE,
) -> dict:
    """Train backbone + projection head on every slice of ``patients``; write the run folder.

    Writes ``config.yaml`` (with ``bf16`` as it ran), ``best.pt`` (lowest validation loss),
    ``last.pt`` (every epoch, for ``--resume``), ``metrics.csv`` and ``loss.png``. Both
    checkpoints record the ids of all ``patients`` (training and validation) as
    ``pretraining_patients``. Returns a summary dict. An interruption (KeyboardInterrupt)
    leaves ``last.pt`` of the last finished epoch.

    With ``ctx`` from :func:`~pix2rep.training.distributed.init_from_env` (torchrun), each of
    the ``world`` processes trains on every world-th slice of the epoch's order with its own
    batch of ``batch_size`` (the global batch is world x batch_size), DDP averages gradients,
    and only rank 0 writes files or logs.
    """
    if not ctx.is_main:
        log = _silent  # only rank 0 speaks
    device = resolve_device(cfg.device)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    keep_freed_memory()
    amp = use_bf16(cfg.bf16, device)
    torch.manual_seed(cfg.pretrain.seed)
    train_patients, val_patients = split_validation_patients(patients, cfg.pretrain.val_fraction, cfg.pretrain.seed)
    train = stack_slices(train_patients, labeled=False, include_unlabeled=True)
    val = stack_slices(val_patients, labeled=False) if val_patients else None
    if len(train) < cfg.pretrain.batch_size:
        raise Pix2RepError(f"only {len(train)} training slices, fewer than one batch of {cfg.pretrain.batch_size}")
    log(
        f"pretraining on {len(train)} slices of {len(train_patients)} patients, validation on "
        f"{0 if val is None else len(val)} slices of {len(val_patients)} patients; device {device}, "
        f"{precision_note(cfg.bf16, amp)}"
    )

    backbone, head = build_pretraining_modules(cfg)
    backbone.to(device, memory_format=memory_format(cfg.channels_last))
    head.to(device)
    net = wrap_ddp(PretrainNet(backbone, head, cfg, amp, ctx), ctx, cfg.pretrain.sync_batchnorm)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.pretrain.lr)
    # Each rank draws its own augmentations; the epoch order is shared and sharded by rank.
    generator = torch.Generator(device=device).manual_seed(cfg.pretrain.seed + ctx.rank)
    shuffle_gen = torch.Generator().manual_seed(cfg.pretrain.seed)

    metrics = MetricsLog(out_dir / "metrics.csv", METRIC_COLUMNS)
    start_epoch, best_val, elapsed_before = 0, float("inf"), 0.0
    if resume and (out_dir / "last.pt").exists():
        start_epoch, best_val, elapsed_before = _resume_from(out_dir / "last.pt", backbone, head, optimizer, generator, shuffle_gen, ctx)
        log(f"resuming after epoch {start_epoch} (best validation loss {best_val:.4f})")
    # A fresh start in a folder that kept only its metrics (a study whose .pt files were not kept)
    # starts a fresh table instead of appending a second epoch 1.
    metrics.truncate(start_epoch)
    ran = dataclasses.replace(cfg, bf16=amp)  # the configuration as it ran: bf16 only where native
    if ctx.is_main:
        ran.save(out_dir / "config.yaml")
    last_epoch = cfg.pretrain.epochs
    if cfg.pretrain.max_minutes is not None and elapsed_before / 60 >= cfg.pretrain.max_minutes:
        log(f"nothing to resume: the time budget of {cfg.pretrain.max_minutes} minutes was spent after epoch {start_epoch}")
        last_epoch = start_epoch

    t_run = time.time()
    for epoch in range(start_epoch + 1, last_epoch + 1):
        t0 = time.time()
        local_loss, seen = _train_epoch(net, optimizer, params, train, generator, shuffle_gen, cfg, ctx, device, epoch,
                                        progress, out_dir)
        train_seconds = time.time() - t0
        val_loss = validation_loss(backbone, head, val, cfg, device, amp, ctx) if val is not None else float("nan")
        train_loss = mean_over_ranks(local_loss, ctx)
        seconds = time.time() - t0
        row = {
            "epoch": epoch,
            "train_loss": f"{train_loss:.6f}",
            "val_loss": f"{val_loss:.6f}",
            "samples_per_s": f"{seen / train_seconds:.2f}",
            "seconds": f"{seconds:.1f}",
        }
        monitored = val_loss if np.isfinite(val_loss) else train_loss
        improved = monitored < best_val
        best_val = min(best_val, monitored)
        elapsed = elapsed_before + time.time() - t_run
        if ctx.is_main:
            payload = {
                "kind": "pix2rep-pretrain",
                "config": ran.to_dict(),
                "versions": versions(),
                "backbone": backbone.state_dict(),
                "projection_head": head.state_dict(),
                "epoch": epoch,
                "val_loss": float(val_loss),
                "best_val": best_val,
                "pretrained_prefixes": pretrained_prefixes(cfg),
                "pretraining_patients": sorted(p.id for p in patients),
            }
            _save_epoch(out_dir, payload, improved, optimizer, generator, shuffle_gen, elapsed)
            metrics.append(row)
            plot_curves(metrics.rows, out_dir / "loss.png", ("train_loss", "val_loss"), f"pretraining ({cfg.pretrain.loss})")
        log(
            f"epoch {epoch}: train loss {row['train_loss']}, val loss {row['val_loss']}, "
            f"{row['samples_per_s']} slices/s, {row['seconds']} s"
        )
        if epoch == start_epoch + 1 and cfg.pretrain.max_minutes is not None:
            # say at once, not 28 minutes later, when the time cap will cut the schedule short
            left = max(cfg.pretrain.max_minutes * 60 - elapsed, 0.0)
            reachable = min(epoch + math.ceil(left / max(seconds, 1e-9)), last_epoch)
            if reachable < last_epoch:
                log(f"at {seconds:.0f} s per epoch, the time budget of {cfg.pretrain.max_minutes} minutes covers about "
                    f"{reachable} of the {last_epoch} epochs ({precision_note(cfg.bf16, amp)}; --max-minutes changes it)")
        if any_rank(cfg.pretrain.max_minutes is not None and elapsed / 60 >= cfg.pretrain.max_minutes, ctx):
            log(f"stopping after epoch {epoch}: the time budget of {cfg.pretrain.max_minutes} minutes is spent")
            break
    barrier(ctx)  # rank 0's last files are written before anyone returns
    return {"best_val_loss": best_val, "epochs": len(metrics.rows), "out_dir": str(out_dir)}


def _resume_from(path: Path, backbone, head, optimizer, generator, shuffle_gen, ctx: DistContext) -> tuple[int, float, float]:
    """Restore what ``last.pt`` saved; returns (its epoch, the best monitored loss, the seconds spent)."""
    state, path = load_checkpoint(path)
    load_state(backbone, state["backbone"], "backbone", path)
    load_state(head, state["projection_head"], "projection head", path)
    optimizer.load_state_dict(state["optimizer"])
    if not ctx.enabled:  # the saved stream is rank 0's; under torchrun every rank reseeds each epoch
        generator.set_state(state["rng"]["augment"])
    shuffle_gen.set_state(state["rng"]["shuffle"])
    return int(state["epoch"]), float(state["best_val"]), float(state.get("elapsed", 0.0))


def _train_epoch(net, optimizer, params, train: SliceSet, generator, shuffle_gen, cfg: RunConfig, ctx: DistContext,
                 device, epoch: int, progress: bool, out_dir: Path) -> tuple[float, int]:
    """One pass over this rank's share of the epoch's shuffled order, a :func:`pretrain_step`
    per batch; returns (the mean loss of this rank's steps, the slices all ranks saw)."""
    from tqdm.auto import tqdm

    net.train()
    t0 = time.time()
    bs = cfg.pretrain.batch_size
    steps = len(train) // (bs * ctx.world)
    order = torch.randperm(len(train), generator=shuffle_gen)[ctx.rank :: ctx.world]
    if ctx.enabled:
        generator.manual_seed(cfg.pretrain.seed + 7919 * epoch + ctx.rank)  # resumable per rank
    running, seen = 0.0, 0
    bar = tqdm(range(steps), desc=f"epoch {epoch}/{cfg.pretrain.epochs}", disable=not (progress and ctx.is_main), leave=False)
    for step in bar:
        x = train.images[order[step * bs : (step + 1) * bs]].to(device, non_blocking=True)
        try:
            loss = pretrain_step(net, optimizer, x, generator, params, cfg.pretrain.grad_clip, ctx)
        except NonFiniteLoss as exc:
            raise Pix2RepError(f"{exc} at epoch {epoch}, step {step + 1}; the last good checkpoint is {out_dir / 'last.pt'}") from None
        running += float(loss)
        seen += bs * ctx.world
        bar.set_postfix(loss=f"{running / (step + 1):.4f}", slices_s=f"{seen / (time.time() - t0):.1f}")
    return running / max(steps, 1), seen


def _save_epoch(out_dir: Path, payload: dict, improved: bool, optimizer, generator, shuffle_gen, elapsed: float) -> None:
    """``best.pt`` when the monitored loss improved; ``last.pt`` always, with what resuming needs.
    Each file is replaced atomically: an interruption leaves the previous epoch's."""
    if improved:
        save_checkpoint(out_dir / "best.pt", payload)
    save_checkpoint(
        out_dir / "last.pt",
        {
            **payload,
            "optimizer": optimizer.state_dict(),
            "rng": {"augment": generator.get_state().cpu(), "shuffle": shuffle_gen.get_state()},
            "elapsed": elapsed,
        },
    )


def _silent(*args, **kwargs) -> None:
    pass
