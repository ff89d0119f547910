"""Pixel-level Barlow Twins, the non-contrastive Pix2Rep-v2 loss (METHOD.md, section 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from .gather import distributed_world, gather_with_grad
from .precision import loss_dtype

STANDARDISE_EPS = 1e-5
"""Added to the variance before the square root, as BatchNorm1d's default eps."""


def standardise(u: Tensor, eps: float = STANDARDISE_EPS) -> Tensor:
    """Standardise each column of ``u`` (M, d) over its M rows with the biased (1/M) variance:

        u~_mk = (u_mk - mean_k) / sqrt(var_k + eps)

    Same as ``BatchNorm1d(d, affine=False)`` in training mode. A constant column becomes 0.
    """
    mean = u.mean(dim=0, keepdim=True)
    variance = u.var(dim=0, unbiased=False, keepdim=True)
    return (u - mean) / torch.sqrt(variance + eps)


def barlow_twins(u: Tensor, v: Tensor, lambda_offdiag: float, gather_distributed: bool = False) -> Tensor:
    """Barlow Twins loss of M paired vectors ``u``, ``v`` (M, d).

    With ``u~``, ``v~`` the column-standardised inputs (:func:`standardise`, biased variance) and
    ``C = u~^T v~ / M`` their (d, d) cross-correlation:

        loss = sum_i (1 - C_ii)^2 + lambda_offdiag * sum_{i != j} C_ij^2

    Identical, perfectly decorrelated inputs give C = I up to the eps, hence a loss of 0 (about
    d * eps^2). Computed in float32 (float64 if given), with autocast disabled.

    With ``gather_distributed`` in an initialised process group of more than one process, the
    vectors of every process are gathered (with gradient) first, so that M, the standardisation
    and C are those of the global batch; every process then computes the same loss.
    """
    if u.ndim != 2 or u.shape != v.shape:
        raise ValueError(f"u and v must both have shape (M, d), got {tuple(u.shape)} and {tuple(v.shape)}")
    if gather_distributed and distributed_world() > 1:
        u, v = gather_with_grad(u), gather_with_grad(v)
    if u.shape[0] < 2:
        raise ValueError(f"need at least 2 vectors to standardise over, got M = {u.shape[0]}")
    dtype = loss_dtype(u.dtype)
    with torch.autocast(device_type=u.device.type, enabled=False):
        u_std, v_std = standardise(u.to(dtype)), standardise(v.to(dtype))
        cross_correlation = u_std.T @ v_std / u.shape[0]
        diagonal = torch.diagonal(cross_correlation)
        on_diagonal = ((1 - diagonal) ** 2).sum()
        # Masking rather than subtracting the diagonal's squares avoids cancellation in float32.
        is_diagonal = torch.eye(u.shape[1], dtype=torch.bool, device=u.device)
        off_diagonal = (cross_correlation**2).masked_fill(is_diagonal, 0).sum()
        return on_diagonal + lambda_offdiag * off_diagonal
