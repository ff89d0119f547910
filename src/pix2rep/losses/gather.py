"""All-gather with gradient, for losses over the vectors of every process (torchrun)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed_world() -> int:
    """The number of processes of an initialised process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        pieces = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, t.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), t.shape[0]
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's piece: sum their gradients
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (same shape on every rank) along dim 0, in rank order, keeping the graph.

    Backward sums, for this rank's piece, the gradients that all ranks' losses sent it; with
    DDP's gradient averaging the step is the gradient of the mean of the ranks' losses
    (tested against a single-process computation in tests/test_distributed.py).
    """
    return _GatherWithGrad.apply(t)
