"""Pixel positions where a pixel-level loss reads its vectors: sampling them, reading them."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..transforms.spatial import Positions


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
