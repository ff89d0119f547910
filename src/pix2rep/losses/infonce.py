"""Pixel-level InfoNCE (NT-Xent), the contrastive Pix2Rep loss (METHOD.md, section 2, steps 5-7)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .gather import distributed_world, gather_with_grad
from .precision import loss_dtype


def nt_xent(u: Tensor, v: Tensor, temperature: float, gather_distributed: bool = False) -> Tensor:
    """NT-Xent loss of N positive pairs ``(u_k, v_k)``, both (N, C).

    With ``w = [u; v]`` the 2N L2-normalised vectors, ``s_ij = w_i . w_j / tau`` and ``k(i)`` the
    index of i's counterpart in the other view (``i + N`` or ``i - N``):

        loss = 1/(2N) sum_i [ -s_{i,k(i)} + log sum_{j != i} exp(s_ij) ]

    i.e. the cross-entropy of each row of the similarity matrix (diagonal removed) with its
    positive as target; the negatives of a vector are the other 2N - 2 vectors, from both views.
    Computed in float32 (float64 if given), with autocast disabled.

    With ``gather_distributed`` in an initialised process group of more than one process, the
    pairs of every process are gathered (with gradient) and this process's 2N vectors are
    scored against all of them: :func:`nt_xent_gathered`. Otherwise the flag changes nothing.
    """
    if u.ndim != 2 or u.shape != v.shape:
        raise ValueError(f"u and v must both have shape (N, C), got {tuple(u.shape)} and {tuple(v.shape)}")
    if u.shape[0] < 1:
        raise ValueError("u and v are empty: need at least one pair")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if gather_distributed and distributed_world() > 1:
        return nt_xent_gathered(u, v, gather_with_grad(u), gather_with_grad(v), dist.get_rank() * len(u), temperature)
    n = u.shape[0]
    dtype = loss_dtype(u.dtype)
    with torch.autocast(device_type=u.device.type, enabled=False):
        w = F.normalize(torch.cat([u, v]).to(dtype), dim=1)
        logits = w @ w.T / temperature
        self_similarity = torch.eye(2 * n, dtype=torch.bool, device=w.device)
        logits = logits.masked_fill(self_similarity, float("-inf"))
        targets = torch.arange(2 * n, device=w.device).roll(n)  # i's positive is i + N mod 2N
        return F.cross_entropy(logits, targets)


def nt_xent_gathered(u: Tensor, v: Tensor, u_all: Tensor, v_all: Tensor, offset: int, temperature: float) -> Tensor:
    """NT-Xent of this process's N pairs against the negatives of every process.

    ``u_all``, ``v_all`` (M, C) hold the pairs of all processes, this one's at rows
    ``offset .. offset + N``. Each of the 2N local vectors is an anchor; its candidates are the
    2M gathered vectors except itself, its positive the counterpart in the other view:

        loss = 1/(2N) sum_{i local} [ -s_{i,k(i)} + log sum_{j in all, j != i} exp(s_ij) ]

    With one process (M = N, offset 0) this is :func:`nt_xent` exactly; the mean of the
    processes' losses is NT-Xent over the whole gathered batch.
    """
    if u.ndim != 2 or u.shape != v.shape or u_all.shape != v_all.shape or u_all.shape[1:] != u.shape[1:]:
        raise ValueError(
            f"expected u, v (N, C) and u_all, v_all (M, C); got {tuple(u.shape)}, {tuple(v.shape)}, "
            f"{tuple(u_all.shape)}, {tuple(v_all.shape)}"
        )
    n, m = u.shape[0], u_all.shape[0]
    if not 0 <= offset <= m - n:
        raise ValueError(f"offset {offset} does not place {n} local rows inside {m} gathered rows")
    dtype = loss_dtype(u.dtype)
    with torch.autocast(device_type=u.device.type, enabled=False):
        anchors = F.normalize(torch.cat([u, v]).to(dtype), dim=1)
        candidates = F.normalize(torch.cat([u_all, v_all]).to(dtype), dim=1)
        logits = anchors @ candidates.T / temperature
        local = torch.arange(n, device=u.device) + offset
        own = torch.cat([local, local + m])  # column of each anchor itself
        positive = torch.cat([local + m, local])
        logits = logits.masked_fill(F.one_hot(own, 2 * m).bool(), float("-inf"))
        return F.cross_entropy(logits, positive)

