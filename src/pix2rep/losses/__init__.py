"""Losses: pixel-level InfoNCE (Pix2Rep) and Barlow Twins (Pix2Rep-v2) for pretraining; the
segmentation loss and the Mean Teacher consistency for the downstream tasks."""

from .barlow_twins import barlow_twins, standardise
from .consistency import mean_teacher_consistency
from .gather import gather_with_grad
from .infonce import nt_xent, nt_xent_gathered
from .positions import Positions, check_feature_pair, gather_positions, sample_valid_positions
from .precision import loss_dtype
from .segmentation import segmentation_loss

__all__ = [
    "Positions",
    "barlow_twins",
    "check_feature_pair",
    "gather_positions",
    "gather_with_grad",
    "loss_dtype",
    "mean_teacher_consistency",
    "nt_xent",
    "nt_xent_gathered",
    "sample_valid_positions",
    "segmentation_loss",
    "standardise",
]
