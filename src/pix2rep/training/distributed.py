"""Multi-process training with PyTorch's DistributedDataParallel, launched by ``torchrun``.

``torchrun --nproc_per_node=K -m pix2rep pretrain ...`` starts K processes; each reads RANK,
WORLD_SIZE and LOCAL_RANK from the environment, takes every K-th slice of the epoch's
shuffled order, and DDP averages the gradients. Only rank 0 writes files. Without those
variables (a plain ``pix2rep pretrain``) nothing here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import Pix2RepError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def init_from_env(device: str | None = None) -> DistContext:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if not dist.is_available():
        raise Pix2RepError("torch.distributed is not available in this PyTorch build")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or "auto") != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, world=world, local_rank=local_rank)


def leave_process_group() -> None:
    """Leave torchrun's process group at the end of a command that succeeded (a no-op without one).

    Exiting without it leaves gloo's worker threads to the interpreter's teardown, which can abort
    a rank ("terminate called without an active exception", SIGABRT) after its work is done.
    Not after a failure: destroying the group while other ranks are inside a collective can hang.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> DistContext:
    """The context of an already-initialised process group (or the single-process one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return SINGLE


def mean_over_ranks(value: float, ctx: DistContext) -> float:
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / ctx.world


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is true on at least one (for collective decisions)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def rank0_first(ctx: DistContext, fn):
    """Run ``fn`` on rank 0 first, then on the other ranks (e.g. rank 0 fills a cache they read)."""
    if not ctx.is_main:
        barrier(ctx)
    result = fn()
    if ctx.is_main:
        barrier(ctx)
    return result


def wrap_ddp(module: torch.nn.Module, ctx: DistContext, sync_batchnorm: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around ``module`` (returned unchanged in a single process)."""
    if not ctx.enabled:
        return module
    if sync_batchnorm:
        if dist.get_backend() != "nccl":
            raise Pix2RepError("sync_batchnorm needs the nccl backend (CUDA); with gloo on CPU, turn it off")
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    device_ids = [ctx.local_rank] if dist.get_backend() == "nccl" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
