"""Pixel-level self-supervised losses: InfoNCE (Pix2Rep) and Barlow Twins (Pix2Rep-v2)."""

from .barlow_twins import DEFAULT_LAMBDA_OFFDIAG, barlow_twins, pixel_barlow_twins_loss, standardise
from .infonce import gather_positions, nt_xent, nt_xent_gathered, pixel_infonce_loss, sample_valid_positions

__all__ = [
    "DEFAULT_LAMBDA_OFFDIAG",
    "barlow_twins",
    "gather_positions",
    "nt_xent",
    "nt_xent_gathered",
    "pixel_barlow_twins_loss",
    "pixel_infonce_loss",
    "sample_valid_positions",
    "standardise",
]
