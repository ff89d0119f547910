"""One optimiser step, as pretraining and downstream training both take it."""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..errors import Pix2RepError
from .distributed import SINGLE, DistContext, any_rank


class NonFiniteLoss(Pix2RepError):
    """The loss is NaN or infinite (on at least one process); no step was taken. The training
    loops add where it happened and what was saved."""

    def __init__(self, loss: float):
        self.loss = loss
        super().__init__(f"non-finite loss ({loss})")


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.nn.Parameter],
    grad_clip: Optional[float],
    ctx: DistContext = SINGLE,
) -> torch.Tensor:
    """Check ``loss`` (every process stops together), backpropagate it, clip the global
    gradient norm of ``params`` to ``grad_clip`` (None: no clipping) and step; returns the
    loss, detached."""
    if any_rank(not bool(torch.isfinite(loss)), ctx):
        raise NonFiniteLoss(float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.detach()
