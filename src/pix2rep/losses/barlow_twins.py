"""Pixel-level Barlow Twins, the non-contrastive Pix2Rep-v2 loss (METHOD.md, section 3)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .infonce import _loss_dtype, check_feature_pair, gather_positions, sample_valid_positions

DEFAULT_LAMBDA_OFFDIAG = 1.0 / 256
"""Weight of the off-diagonal term: 1/d for the d = 256 projection head. Barlow Twins' 5e-3 was
tuned for an 8192-wide projector; 1/d is a common choice for narrower ones. To be tuned by
measurement and recorded."""

STANDARDISE_EPS = 1e-5
"""Added to the variance before the square root, as BatchNorm1d's default eps."""


def standardise(u: Tensor, eps: float = STANDARDISE_EPS) -> Tensor:
    """Standardise each column of ``u`` (M, d) over its M rows with the biased (1/M) variance.

    Same as ``BatchNorm1d(d, affine=False)`` in training mode. A constant column becomes 0.
    """
    mean = u.mean(dim=0, keepdim=True)
    variance = u.var(dim=0, unbiased=False, keepdim=True)
    return (u - mean) / torch.sqrt(variance + eps)


def barlow_twins(u: Tensor, v: Tensor, lambda_offdiag: float = DEFAULT_LAMBDA_OFFDIAG) -> Tensor:
    """Barlow Twins loss of M paired vectors ``u``, ``v`` (M, d).

    With ``u~``, ``v~`` the column-standardised inputs (:func:`standardise`, biased variance) and
    ``C = u~^T v~ / M`` their (d, d) cross-correlation:

        loss = sum_i (1 - C_ii)^2 + lambda_offdiag * sum_{i != j} C_ij^2

    Identical, perfectly decorrelated inputs give C = I up to the eps, hence a loss of 0 (about
    d * eps^2). Computed in float32 (float64 if given), with autocast disabled.
    """
    if u.ndim != 2 or u.shape != v.shape:
        raise ValueError(f"u and v must both have shape (M, d), got {tuple(u.shape)} and {tuple(v.shape)}")
    if u.shape[0] < 2:
        raise ValueError(f"need at least 2 vectors to standardise over, got M = {u.shape[0]}")
    dtype = _loss_dtype(u.dtype)
    with torch.autocast(device_type=u.device.type, enabled=False):
        u_std, v_std = standardise(u.to(dtype)), standardise(v.to(dtype))
        cross_correlation = u_std.T @ v_std / u.shape[0]
        diagonal = torch.diagonal(cross_correlation)
        on_diagonal = ((1 - diagonal) ** 2).sum()
        # Masking rather than subtracting the diagonal's squares avoids cancellation in float32.
        is_diagonal = torch.eye(u.shape[1], dtype=torch.bool, device=u.device)
        off_diagonal = (cross_correlation**2).masked_fill(is_diagonal, 0).sum()
        return on_diagonal + lambda_offdiag * off_diagonal


def pixel_barlow_twins_loss(
    z1: Tensor,
    z2: Tensor,
    valid: Tensor,
    lambda_offdiag: float = DEFAULT_LAMBDA_OFFDIAG,
    max_pixels: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Pix2Rep-v2's loss on two pixel-aligned feature maps z1, z2 (B, d, H, W).

    Takes every position where ``valid`` (B, 1, H, W) or (B, H, W) is True over the whole batch,
    or a uniform sample of ``max_pixels`` of them without replacement, and returns
    :func:`barlow_twins` of the M x d vectors of both maps there:

        loss = sum_i (1 - C_ii)^2 + lambda_offdiag * sum_{i != j} C_ij^2,  C = z1~^T z2~ / M
    """
    valid = check_feature_pair(z1, z2, valid)
    positions = sample_valid_positions(valid, max_pixels, generator)
    return barlow_twins(gather_positions(z1, positions), gather_positions(z2, positions), lambda_offdiag)
