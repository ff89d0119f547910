"""Pix2Rep self-supervised pretraining (METHOD sections 2 and 3).

One step, for a batch x of B slices:

1. two intensity views v1 = I1(x), v2 = I2(x), and one random affine T per slice;
2. v2' = warp(v2, T) and the mask of positions whose source lies inside the image;
3. one backbone pass on [v1, v2'] gives f1 = f(v1) and f2 = f(v2');
4. N positions p valid in both views are sampled over the batch;
5. u = f1 at T(p) (bilinear lookup), v = f2 at p; z = g(u), z' = g(v) (projection head);
6. loss = NT-Xent(z, z') (Pix2Rep) or Barlow Twins(z, z') (Pix2Rep-v2).

Step 5 differs from the reference, which warps the whole head output g(f(v1)) and then
samples it: here the backbone features are interpolated at T(p) and the head is applied to
those N vectors only. At pixel-aligned sources the two agree exactly; elsewhere this one
interpolates before the (non-linear) head instead of after. It skips running the head and
the warp on every pixel of every slice, the largest avoidable cost of a step.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..config import RunConfig
from ..data.dataset import PreparedPatient, SliceSet, stack_slices
from ..errors import Pix2RepError
from ..losses import barlow_twins, gather_positions, nt_xent, sample_valid_positions
from ..models import ProjectionHead, UNet
from ..transforms import augment_intensity, sample_affine, sample_at, warp
from .common import (
    MetricsLog,
    autocast,
    load_checkpoint,
    load_state,
    plot_curves,
    resolve_device,
    save_checkpoint,
    versions,
)

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
    head = ProjectionHead(cfg.model.out_channels, cfg.model.projection_hidden, cfg.model.projection_out)
    return backbone, head


def pretrain_loss(
    backbone: nn.Module,
    head: nn.Module,
    x: torch.Tensor,
    cfg: RunConfig,
    generator: torch.Generator,
    amp: bool,
) -> torch.Tensor:
    """The self-supervised loss of one batch ``x`` (B, 1, H, W) in [0, 1] (module docstring)."""
    B = x.shape[0]
    v1 = augment_intensity(x, cfg.intensity, generator)
    v2 = augment_intensity(x, cfg.intensity, generator)
    if cfg.spatial.enabled:
        theta = sample_affine(
            B, generator, cfg.spatial.rotation_deg, cfg.spatial.scale, cfg.spatial.flip_probs, device=x.device
        )
    else:  # invariance ablation: same geometry in both views
        theta = torch.eye(2, 3, device=x.device).expand(B, 2, 3).contiguous()
    v2, valid = warp(v2, theta)
    views = torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    with autocast(x.device, amp):
        feats = backbone(views)
    f1, f2 = feats[:B], feats[B:]
    n = cfg.pretrain.n_samples if cfg.pretrain.loss == "infonce" else BARLOW_PIXELS
    positions = sample_valid_positions(valid, n, generator)
    # Read the N sampled vectors first, then cast: no float32 copy of whole feature maps.
    u = sample_at(f1, theta, positions, dtype=torch.float32)
    v = gather_positions(f2, positions).float()
    with autocast(x.device, amp):
        z = head(torch.cat([u, v]))
    zu, zv = z[: len(u)].float(), z[len(u) :].float()
    if cfg.pretrain.loss == "infonce":
        return nt_xent(zu, zv, cfg.pretrain.temperature)
    return barlow_twins(zu, zv, cfg.pretrain.barlow_lambda)


@torch.no_grad()
def validation_loss(backbone, head, slices: SliceSet, cfg: RunConfig, device, amp: bool) -> float:
    """Mean loss over the validation slices in eval mode, with a fixed random stream, so the
    numbers are comparable across epochs."""
    backbone.eval()
    head.eval()
    gen = torch.Generator(device=device).manual_seed(12345)
    bs = cfg.pretrain.batch_size
    losses = []
    for i in range(0, len(slices) - bs + 1, bs):
        x = slices.images[i : i + bs].to(device, non_blocking=True)
        losses.append(float(pretrain_loss(backbone, head, x, cfg, gen, amp)))
    return float(np.mean(losses)) if losses else float("nan")


def pretrain(
    cfg: RunConfig,
    patients: Sequence[PreparedPatient],
    out_dir: Path,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train backbone + projection head on every slice of ``patients``; write the run folder.

    Writes ``config.yaml``, ``best.pt`` (lowest validation loss), ``last.pt`` (every epoch,
    for ``--resume``), ``metrics.csv`` and ``loss.png``. Returns a summary dict.
    """
    from tqdm.auto import tqdm

    device = resolve_device(cfg.device)
    amp = bool(cfg.bf16)
    torch.manual_seed(cfg.pretrain.seed)
    train_patients, val_patients = split_validation_patients(patients, cfg.pretrain.val_fraction, cfg.pretrain.seed)
    train = stack_slices(train_patients, labeled=False, include_unlabeled=True)
    val = stack_slices(val_patients, labeled=False) if val_patients else None
    if len(train) < cfg.pretrain.batch_size:
        raise Pix2RepError(f"only {len(train)} training slices, fewer than one batch of {cfg.pretrain.batch_size}")
    log(
        f"pretraining on {len(train)} slices of {len(train_patients)} patients, validation on "
        f"{0 if val is None else len(val)} slices of {len(val_patients)} patients; device {device}, bf16 {amp}"
    )

    backbone, head = build_pretraining_modules(cfg)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    backbone.to(device, memory_format=memory_format)
    head.to(device)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.pretrain.lr)
    generator = torch.Generator(device=device).manual_seed(cfg.pretrain.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.pretrain.seed)

    metrics = MetricsLog(out_dir / "metrics.csv", METRIC_COLUMNS)
    start_epoch, best_val, elapsed_before = 0, float("inf"), 0.0
    if resume and (out_dir / "last.pt").exists():
        state, path = load_checkpoint(out_dir / "last.pt")
        load_state(backbone, state["backbone"], "backbone", path)
        load_state(head, state["projection_head"], "projection head", path)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["rng"]["augment"])
        shuffle_gen.set_state(state["rng"]["shuffle"])
        start_epoch, best_val = int(state["epoch"]), float(state["best_val"])
        elapsed_before = float(state.get("elapsed", 0.0))
        metrics.truncate(start_epoch)
        log(f"resuming after epoch {start_epoch} (best validation loss {best_val:.4f})")
    cfg.save(out_dir / "config.yaml")
    last_epoch = cfg.pretrain.epochs
    if cfg.pretrain.max_minutes is not None and elapsed_before / 60 >= cfg.pretrain.max_minutes:
        log(f"nothing to resume: the time budget of {cfg.pretrain.max_minutes} minutes was spent after epoch {start_epoch}")
        last_epoch = start_epoch

    bs = cfg.pretrain.batch_size
    steps = len(train) // bs
    t_run = time.time()
    for epoch in range(start_epoch + 1, last_epoch + 1):
        backbone.train()
        head.train()
        t0 = time.time()
        order = torch.randperm(len(train), generator=shuffle_gen)
        running, seen = 0.0, 0
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{cfg.pretrain.epochs}", disable=not progress, leave=False)
        for step in bar:
            x = train.images[order[step * bs : (step + 1) * bs]].to(device, non_blocking=True)
            loss = pretrain_loss(backbone, head, x, cfg, generator, amp)
            if not torch.isfinite(loss):
                raise Pix2RepError(
                    f"non-finite loss ({float(loss)}) at epoch {epoch}, step {step + 1}; "
                    f"the last good checkpoint is {out_dir / 'last.pt'}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += float(loss.detach())
            seen += bs
            bar.set_postfix(loss=f"{running / (step + 1):.4f}", slices_s=f"{seen / (time.time() - t0):.1f}")
        train_seconds = time.time() - t0
        val_loss = validation_loss(backbone, head, val, cfg, device, amp) if val is not None else float("nan")
        seconds = time.time() - t0
        row = {
            "epoch": epoch,
            "train_loss": f"{running / max(steps, 1):.6f}",
            "val_loss": f"{val_loss:.6f}",
            "samples_per_s": f"{seen / train_seconds:.2f}",
            "seconds": f"{seconds:.1f}",
        }
        monitored = val_loss if np.isfinite(val_loss) else running / max(steps, 1)
        payload = {
            "kind": "pix2rep-pretrain",
            "config": cfg.to_dict(),
            "versions": versions(),
            "backbone": backbone.state_dict(),
            "projection_head": head.state_dict(),
            "epoch": epoch,
            "val_loss": float(val_loss),
        }
        if monitored < best_val:
            best_val = monitored
            save_checkpoint(out_dir / "best.pt", {**payload, "best_val": best_val})
        elapsed = elapsed_before + time.time() - t_run
        save_checkpoint(
            out_dir / "last.pt",
            {
                **payload,
                "best_val": best_val,
                "optimizer": optimizer.state_dict(),
                "rng": {"augment": generator.get_state().cpu(), "shuffle": shuffle_gen.get_state()},
                "elapsed": elapsed,
            },
        )
        metrics.append(row)
        plot_curves(metrics.rows, out_dir / "loss.png", ("train_loss", "val_loss"), f"Pix2Rep pretraining ({cfg.pretrain.loss})")
        log(
            f"epoch {epoch}: train loss {row['train_loss']}, val loss {row['val_loss']}, "
            f"{row['samples_per_s']} slices/s, {row['seconds']} s"
        )
        if cfg.pretrain.max_minutes is not None and elapsed / 60 >= cfg.pretrain.max_minutes:
            log(f"stopping after epoch {epoch}: the time budget of {cfg.pretrain.max_minutes} minutes is spent")
            break
    return {"best_val_loss": best_val, "epochs": len(metrics.rows), "out_dir": str(out_dir)}


def load_pretrained_backbone(model: str | Path, map_location="cpu") -> tuple[UNet, RunConfig, Path]:
    """A backbone from a run folder or checkpoint file (pretraining or downstream)."""
    from .common import config_from_checkpoint

    payload, path = load_checkpoint(model, map_location)
    cfg = config_from_checkpoint(payload)
    backbone = UNet(cfg.model)
    if "backbone" not in payload:
        raise Pix2RepError(f"{path}: this checkpoint holds no backbone weights")
    load_state(backbone, payload["backbone"], "backbone", path)
    return backbone, cfg, path
