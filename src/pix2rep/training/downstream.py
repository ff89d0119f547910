"""Few-shot segmentation on top of a backbone (METHOD section 5).

Modes, all training a 1x1-conv head (D -> 4 classes) on the backbone output:

- ``probe``: linear probing; the pretrained backbone is frozen and kept in eval mode.
- ``finetune``: the whole pretrained network, with separate learning rates for backbone
  and head.
- ``scratch``: the supervised baseline, the same U-Net and head from random initialisation.
- ``random-probe``: a linear probe on a randomly initialised, frozen backbone (the floor
  that shows what pretraining adds to probing).
- ``mean-teacher``: Mean Teacher on top of fine-tuning (pretrained backbone) or training
  from scratch, with the unlabeled slices of a pool.

One loop, :func:`train_segmentation`, trains every mode: it draws the annotated batches,
takes the steps, logs, validates and saves. What a step computes is a :class:`Supervised`
object, or a :class:`MeanTeacher` one that adds the teacher, the unlabeled batch, the
consistency term and the teacher's update.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoints import load_checkpoint, load_state, save_checkpoint
from ..config import RunConfig
from ..data.dataset import PreparedPatient, SliceSet, stack_slices
from ..errors import Pix2RepError
from ..losses import mean_teacher_consistency, segmentation_loss
from ..models import SegmentationModel, UNet, memory_format, stack_segmentation_models, unstack_segmentation_model
from ..provenance import versions
from ..runs import MetricsLog, plot_curves
from ..runtime import autocast, keep_freed_memory, resolve_device, use_bf16
from ..transforms import augment_intensity, augment_spatial
from .distributed import SINGLE, DistContext, barrier, mean_over_ranks, wrap_ddp
from .step import NonFiniteLoss, optimizer_step

METRIC_COLUMNS = ("epoch", "step", "train_loss", "val_loss", "samples_per_s", "seconds")
MT_METRIC_COLUMNS = ("epoch", "step", "train_loss", "consistency", "weight", "val_loss", "samples_per_s", "seconds")
FROZEN_MODES = ("probe", "random-probe")
CELLS_AT_ONCE_MODES = ("scratch", "finetune", "probe", "random-probe")  # what train_segmentation_cells trains


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


def build_optimizer(
    model: SegmentationModel, cfg: RunConfig, mode: str, pretrained_prefixes: Optional[Sequence[str]] = None
) -> torch.optim.Optimizer:
    """Adam with METHOD's rates for ``mode`` (a probe trains the head alone); in fine-tuning,
    backbone parameters that pretraining did not train (``pretrained_prefixes``, e.g. a SimCLR
    decoder) get the from-scratch rate."""
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


class _TrainingForward(nn.Module):
    """The training forward (frozen backbone or not; on cached features, the head alone) as a
    module, the unit DDP wraps."""

    def __init__(self, model: SegmentationModel, frozen: bool, on_features: bool = False):
        super().__init__()
        self.model, self.frozen, self.on_features = model, frozen, on_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_features:
            return self.model.head(x)
        if self.frozen:
            with torch.no_grad():
                feats = self.model.backbone(x)
            return self.model.head(feats)
        return self.model(x)


class Supervised:
    """Probe, finetune, scratch and random-probe: the segmentation loss of the annotated batch.

    ``model`` is trained, validated, returned and saved. With ``frozen``, its backbone is not
    trained and stays in eval mode (BatchNorm keeps the statistics it has).
    """

    columns = METRIC_COLUMNS
    curves = ("train_loss", "val_loss")

    def __init__(self, model: SegmentationModel, loss_fn: nn.Module, frozen: bool, cfg: RunConfig, device: torch.device,
                 amp: bool, ctx: DistContext = SINGLE, on_features: bool = False):
        if frozen:
            model.backbone.requires_grad_(False)  # before DDP, which registers what requires grad
        self.model, self.loss_fn, self.frozen, self.cfg = model, loss_fn, frozen, cfg
        self.device, self.amp, self.memory_format = device, amp, memory_format(cfg.channels_last)
        self.net = wrap_ddp(_TrainingForward(model, frozen, on_features), ctx)
        self.params = [p for p in model.parameters() if p.requires_grad]

    @property
    def evaluated(self) -> SegmentationModel:
        """The model that is validated, returned and saved."""
        return self.model

    def train(self) -> None:
        self.model.train()
        if self.frozen:
            self.model.backbone.eval()

    def loss(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of step ``step`` on the annotated batch ``x`` (B, 1, H, W), ``y`` (B, 1, H, W),
        and its terms by metrics column."""
        with autocast(self.device, self.amp):
            logits = self.net(x.contiguous(memory_format=self.memory_format))
        loss = self.loss_fn(logits.float(), y)
        return loss, {"train_loss": loss}

    def after_step(self, step: int) -> None:
        pass

    def extra_columns(self, step: int) -> dict:
        """Columns of the metrics row beyond the loss terms."""
        return {}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict, path: Path) -> None:
        load_state(self.model, state["model"], "segmentation model", path)


class MeanTeacher(Supervised):
    """Mean Teacher (Tarvainen and Valpola, 2017): the student ``model`` learns the supervised
    loss plus ``w(step)`` x :func:`~pix2rep.losses.mean_teacher_consistency` between its
    softmax on one intensity view of a batch of ``pool`` slices and the teacher's softmax on
    another view. The teacher's weights are the exponential moving average of the student's
    (decay ``min(1 - 1/(step + 1), mt_ema)``); the teacher is validated, returned and saved.

    The teacher keeps BatchNorm statistics of its own (:func:`update_teacher` says why); copying
    the student's made a from-scratch teacher predict almost nothing (baseline-mt Dice 0.02-0.10
    in the first GPU study, commit 6e3da19). Draws the unlabeled batch from ``pick_gen`` and
    its views from ``augment_gen``, after the loop's draws of the annotated batch.
    """

    columns = MT_METRIC_COLUMNS
    curves = ("train_loss", "consistency")

    def __init__(self, model: SegmentationModel, loss_fn: nn.Module, pool: SliceSet, cfg: RunConfig, device: torch.device,
                 amp: bool, pick_gen: torch.Generator, augment_gen: torch.Generator):
        super().__init__(model, loss_fn, False, cfg, device, amp)
        self.teacher = copy.deepcopy(model).requires_grad_(False).train()  # train mode: BatchNorm statistics of its own
        self.pool, self.pick_gen, self.augment_gen = pool, pick_gen, augment_gen

    @property
    def evaluated(self) -> SegmentationModel:
        return self.teacher

    def train(self) -> None:
        self.model.train()
        self.teacher.train()

    def loss(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = self.cfg.downstream
        u = self.pool.images[torch.randint(len(self.pool), (d.mt_unlabeled_batch,), generator=self.pick_gen)].to(self.device)
        u_student = augment_intensity(u, self.cfg.intensity, self.augment_gen)
        u_teacher = augment_intensity(u, self.cfg.intensity, self.augment_gen)
        with autocast(self.device, self.amp):
            logits = self.model(torch.cat([x, u_student]).contiguous(memory_format=self.memory_format))
            with torch.no_grad():
                teacher_logits = self.teacher(u_teacher.contiguous(memory_format=self.memory_format))
        supervised = self.loss_fn(logits[: len(x)].float(), y)
        consistency = mean_teacher_consistency(logits[len(x) :], teacher_logits)
        loss = supervised + consistency_weight(step, self.cfg) * consistency
        return loss, {"train_loss": supervised, "consistency": consistency}

    def after_step(self, step: int) -> None:
        update_teacher(self.teacher, self.model, min(1.0 - 1.0 / (step + 1), self.cfg.downstream.mt_ema))

    def extra_columns(self, step: int) -> dict:
        return {"weight": f"{consistency_weight(step, self.cfg):.4f}"}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict, path: Path) -> None:
        super().load_state_dict(state, path)
        load_state(self.teacher, state["teacher"], "teacher", path)


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


def augment_labeled_batch(x: torch.Tensor, y: torch.Tensor, cfg: RunConfig, gen: torch.Generator):
    """An annotated batch as training sees it: warped with its labels (``downstream.spatial``,
    when enabled), then its images' intensities changed (``downstream.augment``)."""
    if cfg.downstream.spatial.enabled:
        x, y = augment_spatial(x, y, cfg.downstream.spatial, gen)
    if cfg.downstream.augment:
        x = augment_intensity(x, cfg.intensity, gen)
    return x, y


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The factor on every base learning rate at optimiser step ``step`` (1-based) of ``steps``:
    1 (``constant``) or (1 + cos(pi (step - 1) / steps)) / 2 (``cosine``: 1 at the first step,
    falling towards 0 at the last). A function of the step alone, so a resumed run follows it."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - 1) / max(1, steps)))


def train_step(training: Supervised, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, step: int,
               grad_clip: Optional[float], ctx: DistContext = SINGLE) -> dict[str, float]:
    """One optimiser step of downstream training on the annotated batch ``x``, ``y``, as the
    loop takes it: ``training``'s loss, :func:`~pix2rep.training.step.optimizer_step`, then its
    update (Mean Teacher's EMA). Returns the loss terms by metrics column."""
    loss, terms = training.loss(x, y, step)
    optimizer_step(loss, optimizer, training.params, grad_clip, ctx)
    training.after_step(step)
    return {name: float(term.detach()) for name, term in terms.items()}


@torch.no_grad()
def frozen_features(backbone: nn.Module, slices: SliceSet, device, amp: bool, channels_last: bool,
                    batch: int = 32) -> SliceSet:
    """The frozen backbone's features (eval mode) of every slice, once: (N, D, H, W) on
    ``device`` in the autocast dtype (bf16 where native, else float32), with the same masks."""
    backbone.eval()
    fmt = memory_format(channels_last)
    parts = []
    for i in range(0, len(slices), batch):
        x = slices.images[i : i + batch].to(device).contiguous(memory_format=fmt)
        with autocast(device, amp):
            parts.append(backbone(x))
    return SliceSet(torch.cat(parts), slices.masks, slices.patient_ids)


@torch.no_grad()
def _mean_loss(model, slices, loss_fn, device, amp: bool) -> float:
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
    resume: bool = False,
) -> tuple[SegmentationModel, dict]:
    """Train on the annotated slices of ``patients``; returns (model, summary).

    ``backbone_state`` is the pretrained backbone (probe, finetune, and Mean Teacher on top of
    fine-tuning); it must be None for ``scratch`` and ``random-probe``. Mean Teacher also needs
    ``unlabeled_patients``. With ``out_dir``, writes config.yaml (with ``bf16`` as it ran),
    metrics.csv, ``last.pt`` at every logging block (what ``resume`` continues from, bit for
    bit; removed once the run is done), then model.pt and loss.png. Model selection only ever
    looks at ``val_patients``. Under torchrun (``ctx``), each rank draws its own batches of
    ``batch_size``, DDP averages the gradients (and broadcasts rank 0's BatchNorm buffers), and
    only rank 0 writes files.
    """
    from tqdm.auto import tqdm

    d = cfg.downstream
    keep_freed_memory()
    mean_teacher = d.mode == "mean-teacher"
    if mean_teacher and ctx.enabled:
        raise Pix2RepError("Mean Teacher runs in one process (no torchrun support yet)")
    if mean_teacher and not unlabeled_patients:
        raise Pix2RepError("Mean Teacher needs unlabeled patients (the pretraining pool)")
    if d.mode in ("probe", "finetune") and backbone_state is None:
        raise Pix2RepError(f"mode {d.mode!r} needs a pretrained model (-m)")
    if d.mode in ("scratch", "random-probe") and backbone_state is not None:
        raise Pix2RepError(f"mode {d.mode!r} starts from a random backbone; do not pass a pretrained model")
    if d.stopping == "validation" and not val_patients:
        raise Pix2RepError("stopping='validation' needs validation patients (downstream.val_patients > 0)")
    if resume and ctx.enabled:
        raise Pix2RepError("resuming downstream training needs a single process (not torchrun)")
    device = resolve_device(cfg.device)
    amp = use_bf16(cfg.bf16, device)
    torch.manual_seed(d.seed)
    train = stack_slices(patients, labeled=True)
    val = stack_slices(val_patients, labeled=True) if val_patients else None
    model = build_segmentation_model(cfg, backbone_state).to(device, memory_format=memory_format(cfg.channels_last))
    if d.mode == "random-probe":
        calibrate_batchnorm(model.backbone, train.images, device, amp, memory_format(cfg.channels_last))
    optimizer_mode = ("finetune" if backbone_state is not None else "scratch") if mean_teacher else d.mode
    optimizer = build_optimizer(model, cfg, optimizer_mode, pretrained_prefixes)
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # before a resume loads decayed ones
    loss_fn = segmentation_loss(d.loss)
    gen = torch.Generator(device=device).manual_seed(d.seed + ctx.rank)
    pick_gen = torch.Generator().manual_seed(d.seed + ctx.rank)
    cached = d.mode in FROZEN_MODES and d.probe_features == "cached"
    if mean_teacher:
        pool = stack_slices(unlabeled_patients, labeled=False, include_unlabeled=True)
        training = MeanTeacher(model, loss_fn, pool, cfg, device, amp, pick_gen, gen)
    else:
        training = Supervised(model, loss_fn, d.mode in FROZEN_MODES, cfg, device, amp, ctx, on_features=cached)
    if cached:
        train = frozen_features(model.backbone, train, device, amp, cfg.channels_last)
    if not ctx.is_main:
        out_dir, log = None, _silent
    if cached:
        log(f"probe on cached features {tuple(train.images.shape)}, computed once without augmentation")
    metrics = MetricsLog(out_dir / "metrics.csv", training.columns) if out_dir else None
    ran = dataclasses.replace(cfg, bf16=amp)  # the configuration as it ran: bf16 only where native

    log_every = max(1, min(d.eval_every, d.steps))
    start, best, bad_evals, elapsed_before = 0, (float("inf"), None), 0, 0.0
    if resume and out_dir and (out_dir / "last.pt").exists():
        start, best, bad_evals, elapsed_before = _resume_from(out_dir / "last.pt", training, optimizer, gen, pick_gen)
        log(f"resuming after step {start}")
    if out_dir:
        metrics.rows = [r for r in metrics.rows if int(r["step"]) <= start]  # none written after last.pt
        ran.save(out_dir / "config.yaml")
    stopped_early = d.stopping == "validation" and bad_evals >= d.patience  # a resumed run that had stopped
    last_step = start if stopped_early else d.steps
    step = block_start = start
    sums: dict[str, float] = {}
    t0 = t_block = time.time()
    bar = tqdm(range(start + 1, last_step + 1), desc=d.mode, disable=not (progress and ctx.is_main), leave=False)
    for step in bar:
        training.train()
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * lr_factor(d.lr_schedule, step, d.steps)
        idx = torch.randint(len(train), (d.batch_size,), generator=pick_gen)
        x, y = train.images[idx].to(device), train.masks[idx, None].to(device)
        if not cached:
            x, y = augment_labeled_batch(x, y, cfg, gen)
        try:
            terms = train_step(training, optimizer, x, y, step, d.grad_clip, ctx)
        except NonFiniteLoss as exc:
            saved = (f"the last good checkpoint is {out_dir / 'last.pt'}" if out_dir and (out_dir / "last.pt").exists()
                     else "nothing was saved from this run")
            raise Pix2RepError(f"{exc} at step {step} of {d.steps}; {saved}") from None
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
        bar.set_postfix({name: f"{value:.4f}" for name, value in terms.items()})
        if step % log_every == 0 or step == d.steps:
            n_block = step - block_start
            val_loss = _mean_loss(training.evaluated, val, loss_fn, device, amp) if val is not None else float("nan")
            row = {
                "epoch": step // log_every,
                "step": step,
                **{name: f"{mean_over_ranks(total / n_block, ctx):.6f}" for name, total in sums.items()},
                **training.extra_columns(step),
                "val_loss": f"{val_loss:.6f}",
                "samples_per_s": f"{n_block * d.batch_size * ctx.world / (time.time() - t_block):.2f}",
                "seconds": f"{elapsed_before + time.time() - t0:.1f}",
            }
            sums, block_start, t_block = {}, step, time.time()
            if d.stopping == "validation":
                if val_loss < best[0]:
                    best = (val_loss, {k: v.detach().clone() for k, v in training.evaluated.state_dict().items()})
                    bad_evals = 0
                else:
                    bad_evals += 1
            if out_dir:
                metrics.append(row)
                _save_progress(out_dir / "last.pt", ran, step, training, optimizer, gen, pick_gen, best, bad_evals,
                               elapsed_before + time.time() - t0)
            if d.stopping == "validation" and bad_evals >= d.patience:
                log(f"early stop at step {step}: no validation improvement in {d.patience} evaluations")
                break
    model = training.evaluated
    if d.stopping == "validation" and best[1] is not None:
        model.load_state_dict(best[1])
    model.eval()
    summary = {"steps": step, "seconds": elapsed_before + time.time() - t0, "best_val_loss": best[0], "train_slices": len(train)}
    if out_dir:
        save_segmentation_checkpoint(out_dir / "model.pt", model, ran, summary)
        plot_curves(metrics.rows, out_dir / "loss.png", training.curves, f"{d.mode} ({len(patients)} patients)")
        (out_dir / "last.pt").unlink(missing_ok=True)  # the run is done: model.pt is what it leaves
    barrier(ctx)
    return model, summary


class _SumOverCells(nn.Module):
    """The sum over G cells of ``loss_fn`` on each cell's logits, from logits (B, G x K, H, W) and
    labels (B, G, H, W). Cell g's parameters receive the gradient of its own loss alone."""

    def __init__(self, loss_fn: nn.Module, cells: int):
        super().__init__()
        self.loss_fn, self.cells = loss_fn, cells

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, _, h, w = logits.shape
        per_cell = logits.reshape(b, self.cells, -1, h, w)
        return sum(self.loss_fn(per_cell[:, g], y[:, g : g + 1]) for g in range(self.cells))


def cells_at_once_refusal(cfg: RunConfig) -> Optional[str]:
    """Why :func:`train_segmentation_cells` cannot train ``cfg``'s cells together, or None."""
    d = cfg.downstream
    if d.mode not in CELLS_AT_ONCE_MODES:
        return f"mode {d.mode!r} trains one cell at a time (cells at once: {', '.join(CELLS_AT_ONCE_MODES)})"
    if d.stopping != "fixed-steps" or d.grad_clip is not None:
        return ("cells trained at once need stopping='fixed-steps' and no grad_clip "
                f"(got stopping={d.stopping!r}, grad_clip={d.grad_clip})")
    if d.mode in FROZEN_MODES and d.probe_features == "cached":
        return "a probe on cached features trains one cell at a time (it is fast alone)"
    return None


def train_segmentation_cells(
    cfg: RunConfig,
    cells: Sequence[tuple[int, Sequence[PreparedPatient]]],
    backbone_state: Optional[dict] = None,
    progress: bool = True,
    pretrained_prefixes: Optional[Sequence[str]] = None,
) -> list[tuple[SegmentationModel, dict]]:
    """Train several cells of one mode and one budget at once; returns (model, summary) per cell.

    Cell i is (seed, annotated patients). The cells' networks are one grouped model
    (:func:`~pix2rep.models.stack_segmentation_models`), so a step is one pass of larger
    convolutions instead of G small ones, which is what keeps a GPU busy. Each cell starts,
    draws its batches and augments them from its own seed, as :func:`train_segmentation`
    does with ``downstream.seed`` set to it. The loss is the sum of the cells' losses, so each
    cell's parameters get its own gradient, and Adam, elementwise, steps each cell as if alone:
    the models equal separate runs' up to rounding (grouped convolutions sum in another order).
    Fixed steps, no clipping (a global norm would couple the cells), one process, no files:
    what a study cell needs.
    """
    from tqdm.auto import tqdm

    d = cfg.downstream
    refusal = cells_at_once_refusal(cfg)
    if refusal:
        raise Pix2RepError(refusal)
    if (backbone_state is None) != (d.mode in ("scratch", "random-probe")):
        raise Pix2RepError(f"mode {d.mode!r} " + ("needs a pretrained model" if backbone_state is None
                                                  else "starts from a random backbone; do not pass a pretrained model"))
    keep_freed_memory()
    device = resolve_device(cfg.device)
    amp, fmt = use_bf16(cfg.bf16, device), memory_format(cfg.channels_last)
    models, trains, gens, pick_gens = [], [], [], []
    for seed, patients in cells:  # the order of train_segmentation's draws, cell by cell
        torch.manual_seed(seed)
        trains.append(stack_slices(patients, labeled=True))
        models.append(build_segmentation_model(cfg, backbone_state).to(device, memory_format=fmt))
        if d.mode == "random-probe":
            calibrate_batchnorm(models[-1].backbone, trains[-1].images, device, amp, fmt)
        gens.append(torch.Generator(device=device).manual_seed(seed))
        pick_gens.append(torch.Generator().manual_seed(seed))
    model = stack_segmentation_models(models, cfg.model).to(device, memory_format=fmt)
    del models
    optimizer = build_optimizer(model, cfg, d.mode, pretrained_prefixes)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    training = Supervised(model, _SumOverCells(segmentation_loss(d.loss), len(cells)), d.mode in FROZEN_MODES, cfg, device, amp)
    t0 = time.time()
    bar = tqdm(range(1, d.steps + 1), desc=f"{d.mode} x{len(cells)}", disable=not progress, leave=False)
    for step in bar:
        training.train()
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * lr_factor(d.lr_schedule, step, d.steps)
        xs, ys = [], []
        for train, gen, pick_gen in zip(trains, gens, pick_gens):
            idx = torch.randint(len(train), (d.batch_size,), generator=pick_gen)
            x, y = augment_labeled_batch(train.images[idx].to(device), train.masks[idx, None].to(device), cfg, gen)
            xs.append(x)
            ys.append(y)
        try:
            terms = train_step(training, optimizer, torch.cat(xs, 1), torch.cat(ys, 1), step, None)
        except NonFiniteLoss as exc:
            seeds = ", ".join(str(seed) for seed, _ in cells)
            raise Pix2RepError(f"{exc} at step {step} of {d.steps} in the cells of seeds {seeds}, trained together; "
                               "nothing was saved from them") from None
        bar.set_postfix(loss_per_cell=f"{terms['train_loss'] / len(cells):.4f}")
    seconds = time.time() - t0
    return [(m.to(device, memory_format=fmt).eval(),
             {"steps": d.steps, "seconds": seconds, "best_val_loss": float("inf"), "train_slices": len(train)})
            for m, train in zip(unstack_segmentation_model(model, cfg.model), trains)]


def _save_progress(path: Path, cfg: RunConfig, step: int, training: Supervised, optimizer, gen, pick_gen, best: tuple,
                   bad_evals: int, elapsed: float) -> None:
    """Everything that step ``step`` leaves and the next steps read, for :func:`_resume_from`."""
    save_checkpoint(path, {
        "kind": "pix2rep-downstream-progress", "config": cfg.to_dict(), "versions": versions(), "step": step,
        **training.state_dict(), "optimizer": optimizer.state_dict(),
        "rng": {"augment": gen.get_state().cpu(), "pick": pick_gen.get_state()},
        "best_val": best[0], "best_state": best[1], "bad_evals": bad_evals, "elapsed": elapsed,
    })


def _resume_from(path: Path, training: Supervised, optimizer, gen, pick_gen) -> tuple[int, tuple, int, float]:
    """Restore what ``last.pt`` saved; returns (its step, (best validation loss, its state),
    evaluations without improvement, seconds spent)."""
    state, path = load_checkpoint(path)
    training.load_state_dict(state, path)
    optimizer.load_state_dict(state["optimizer"])
    gen.set_state(state["rng"]["augment"])
    pick_gen.set_state(state["rng"]["pick"])
    return int(state["step"]), (float(state["best_val"]), state["best_state"]), int(state["bad_evals"]), float(state["elapsed"])


def _silent(*args, **kwargs) -> None:
    pass


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
