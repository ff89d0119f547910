"""Pixel-level InfoNCE (NT-Xent), the contrastive Pix2Rep loss (METHOD.md, section 2, steps 5-7)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

Positions = tuple[Tensor, Tensor, Tensor]
"""Integer pixel positions ``(b, y, x)``: three 1-D long tensors of equal length."""


def _mask_3d(valid: Tensor, batch: int, height: int, width: int) -> Tensor:
    """``valid`` as a (B, H, W) bool tensor; accepts (B, 1, H, W) or (B, H, W)."""
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got dtype {valid.dtype}")
    if valid.ndim == 4 and valid.shape[1] == 1:
        valid = valid[:, 0]
    if tuple(valid.shape) != (batch, height, width):
        raise ValueError(
            f"valid must have shape ({batch}, 1, {height}, {width}) or ({batch}, {height}, {width}), "
            f"got {tuple(valid.shape)}"
        )
    return valid


def check_feature_pair(z1: Tensor, z2: Tensor, valid: Tensor) -> Tensor:
    """Validate two aligned feature maps (B, C, H, W) and their mask; return the mask as (B, H, W)."""
    if z1.ndim != 4:
        raise ValueError(f"z1 must have shape (B, C, H, W), got {tuple(z1.shape)}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    batch, _, height, width = z1.shape
    return _mask_3d(valid, batch, height, width)


def sample_valid_positions(
    valid: Tensor, n_samples: Optional[int], generator: Optional[torch.Generator] = None
) -> Positions:
    """Draw up to ``n_samples`` distinct positions uniformly among the True entries of ``valid``.

    ``valid`` is (B, H, W) or (B, 1, H, W) bool; the draw is over the whole batch, without
    replacement. If there are fewer valid positions than ``n_samples`` (or ``n_samples`` is
    None), all of them are returned. Returns ``(b, y, x)`` long tensors. ``generator``, if given,
    must be on ``valid.device``. Raises ValueError if no position is valid.
    """
    if valid.ndim == 4 and valid.shape[1] == 1:
        valid = valid[:, 0]
    if valid.ndim != 3 or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a (B, H, W) or (B, 1, H, W) bool tensor, got {tuple(valid.shape)} {valid.dtype}")
    if n_samples is not None and n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    flat_indices = torch.nonzero(valid.reshape(-1)).squeeze(1)
    n_valid = flat_indices.numel()
    if n_valid == 0:
        raise ValueError(f"no valid position in a mask of shape {tuple(valid.shape)}")
    if n_samples is not None and n_samples < n_valid:
        chosen = torch.randperm(n_valid, generator=generator, device=valid.device)[:n_samples]
        flat_indices = flat_indices[chosen]
    height, width = valid.shape[1:]
    return flat_indices // (height * width), (flat_indices // width) % height, flat_indices % width


def gather_positions(z: Tensor, positions: Positions) -> Tensor:
    """Feature vectors of ``z`` (B, C, H, W) at ``positions = (b, y, x)``, as an (N, C) tensor.

    Reads through the (B, H, W, C) view, the memory order of channels_last maps, so that the
    gradient comes back channels_last (see ``pretrain_projections`` for why that matters).
    """
    b, y, x = positions
    return z.permute(0, 2, 3, 1)[b, y, x]


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the inputs already are."""
    return torch.promote_types(dtype, torch.float32)


def nt_xent(u: Tensor, v: Tensor, temperature: float = 0.53) -> Tensor:
    """NT-Xent loss of N positive pairs ``(u_k, v_k)``, both (N, C), already gathered.

    With ``w = [u; v]`` the 2N L2-normalised vectors, ``s_ij = w_i . w_j / tau`` and ``k(i)`` the
    index of i's counterpart in the other view (``i + N`` or ``i - N``):

        loss = 1/(2N) sum_i [ -s_{i,k(i)} + log sum_{j != i} exp(s_ij) ]

    i.e. the cross-entropy of each row of the similarity matrix (diagonal removed) with its
    positive as target; the negatives of a vector are the other 2N - 2 vectors, from both views.
    Computed in float32 (float64 if given), with autocast disabled.
    """
    if u.ndim != 2 or u.shape != v.shape:
        raise ValueError(f"u and v must both have shape (N, C), got {tuple(u.shape)} and {tuple(v.shape)}")
    if u.shape[0] < 1:
        raise ValueError("u and v are empty: need at least one pair")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = u.shape[0]
    dtype = _loss_dtype(u.dtype)
    with torch.autocast(device_type=u.device.type, enabled=False):
        w = F.normalize(torch.cat([u, v]).to(dtype), dim=1)
        logits = w @ w.T / temperature
        self_similarity = torch.eye(2 * n, dtype=torch.bool, device=w.device)
        logits = logits.masked_fill(self_similarity, float("-inf"))
        targets = torch.arange(2 * n, device=w.device).roll(n)  # i's positive is i + N mod 2N
        return F.cross_entropy(logits, targets)


def nt_xent_gathered(u: Tensor, v: Tensor, u_all: Tensor, v_all: Tensor, offset: int, temperature: float = 0.53) -> Tensor:
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
    dtype = _loss_dtype(u.dtype)
    with torch.autocast(device_type=u.device.type, enabled=False):
        anchors = F.normalize(torch.cat([u, v]).to(dtype), dim=1)
        candidates = F.normalize(torch.cat([u_all, v_all]).to(dtype), dim=1)
        logits = anchors @ candidates.T / temperature
        local = torch.arange(n, device=u.device) + offset
        own = torch.cat([local, local + m])  # column of each anchor itself
        positive = torch.cat([local + m, local])
        logits = logits.masked_fill(F.one_hot(own, 2 * m).bool(), float("-inf"))
        return F.cross_entropy(logits, positive)


def pixel_infonce_loss(
    z1: Tensor,
    z2: Tensor,
    valid: Tensor,
    n_samples: int = 1000,
    temperature: float = 0.53,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Pix2Rep's contrastive loss on two pixel-aligned feature maps z1, z2 (B, C, H, W).

    Draws ``n_samples`` positions uniformly among those where ``valid`` (B, 1, H, W) or (B, H, W)
    is True over the whole batch (all of them if fewer), gathers the vectors of both maps there
    and returns :func:`nt_xent` of them:

        loss = 1/(2N) sum_i [ -w_i . w_k(i) / tau + log sum_{j != i} exp(w_i . w_j / tau) ]

    over the 2N L2-normalised vectors ``w``. ``valid`` must hold the positions valid in BOTH views
    (METHOD.md step 7: positions whose source lies outside the image are never sampled).
    """
    valid = check_feature_pair(z1, z2, valid)
    positions = sample_valid_positions(valid, n_samples, generator)
    return nt_xent(gather_positions(z1, positions), gather_positions(z2, positions), temperature)
