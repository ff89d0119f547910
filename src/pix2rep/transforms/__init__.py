"""Augmentations: random intensity changes (invariance) and random affine warps (equivariance)."""

from .intensity import IntensityAugmentConfig, augment_intensity, bias_field, gaussian_blur
from .spatial import (
    FLIP_NONE,
    FLIP_X,
    FLIP_Y,
    AffineParams,
    SpatialAugmentConfig,
    augment_spatial,
    grid_positions_to_normalised,
    invert_affine,
    normalised_to_pixel,
    sample_affine,
    sample_affine_params,
    sample_at,
    source_points,
    valid_mask,
    warp,
)

__all__ = [
    "FLIP_NONE",
    "FLIP_X",
    "FLIP_Y",
    "AffineParams",
    "IntensityAugmentConfig",
    "SpatialAugmentConfig",
    "augment_intensity",
    "augment_spatial",
    "bias_field",
    "gaussian_blur",
    "grid_positions_to_normalised",
    "invert_affine",
    "normalised_to_pixel",
    "sample_affine",
    "sample_affine_params",
    "sample_at",
    "source_points",
    "valid_mask",
    "warp",
]
