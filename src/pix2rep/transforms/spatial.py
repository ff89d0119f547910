"""Random affine transforms for the equivariance constraint, in PyTorch's ``affine_grid`` convention.

Conventions (METHOD.md, section 2):

- Coordinates are normalised with ``align_corners=False``: the image spans [-1, 1] on each axis
  and pixel ``j`` of a row of ``W`` pixels has its centre at ``(2 j + 1) / W - 1``. ``x`` runs
  along the width (last axis), ``y`` along the height.
- ``theta`` is a ``(B, 2, 3)`` matrix mapping each OUTPUT point ``p = (x, y)`` to the INPUT
  point it samples, ``T(p) = A p + t``. A scale ``s < 1`` therefore zooms in.
- Rotation acts on normalised coordinates, so it is a true rotation for square images (the
  pipeline works on 128 x 128 slices) and a rotation plus an anisotropic stretch otherwise.

The sampled transform is ``T(p) = t + s R(angle) F p``: the output shows a window of half-size
``s`` centred on ``t``, rotated about its own centre and possibly flipped. Before rotation the
window lies inside the image because ``|t| <= 1 - s`` on each axis; once rotated its corners may
leave the image, which is why :func:`warp` also returns a validity mask.

Validity: an output pixel is valid when its source point lies within the span of the input
pixel centres, ``|u| <= 1 - 1/W`` and ``|v| <= 1 - 1/H``. Bilinear interpolation there reads
only real pixels, never the zero padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

Positions = tuple[Tensor, Tensor, Tensor]
"""Integer pixel positions ``(b, y, x)``: three 1-D long tensors of equal length."""

# Order of the flip categories in ``flip_probs`` and in ``AffineParams.flip``.
FLIP_NONE, FLIP_X, FLIP_Y = 0, 1, 2


@dataclass
class SpatialAugmentConfig:
    """The random affine between the two views (METHOD section 2): rotation angle uniform in
    +-rotation_deg, zoom uniform in ``scale``, and a flip none / along x / along y with
    probabilities ``flip_probs``."""

    rotation_deg: float = 90.0
    scale: tuple[float, float] = (0.33, 0.95)
    # METHOD and the reference code: x about 45 %, y 32 %, none 23 %. Earlier versions had
    # (0.45, 0.32, 0.23) here, the wrong way round; each study's config.yaml records its own.
    flip_probs: tuple[float, float, float] = (0.23, 0.45, 0.32)  # none, x, y
    enabled: bool = True  # False: the invariance ablation (intensity changes only)

    def __post_init__(self):
        self.scale = tuple(float(s) for s in self.scale)
        self.flip_probs = tuple(float(p) for p in self.flip_probs)


@dataclass
class AffineParams:
    """Per-sample parameters of a batch of random affine transforms (1-D tensors of length B).

    angle: rotation in degrees; scale: zoom factor s (< 1 zooms in); tx, ty: translation of
    the window centre in normalised coordinates; flip: 0 none, 1 along x, 2 along y.
    """

    angle: Tensor
    scale: Tensor
    tx: Tensor
    ty: Tensor
    flip: Tensor

    def to_theta(self) -> Tensor:
        """The ``(B, 2, 3)`` matrices ``[s R F | t]`` of ``T(p) = t + s R F p``."""
        radians = torch.deg2rad(self.angle)
        cos, sin = torch.cos(radians), torch.sin(radians)
        # F negates the x (or y) coordinate, i.e. the first (or second) column of R.
        sign_x = torch.where(self.flip == FLIP_X, -1.0, 1.0).to(cos.dtype)
        sign_y = torch.where(self.flip == FLIP_Y, -1.0, 1.0).to(cos.dtype)
        row_x = torch.stack([cos * sign_x, -sin * sign_y, torch.zeros_like(cos)], dim=-1)
        row_y = torch.stack([sin * sign_x, cos * sign_y, torch.zeros_like(cos)], dim=-1)
        theta = torch.stack([row_x, row_y], dim=1) * self.scale[:, None, None]
        theta[:, 0, 2] = self.tx
        theta[:, 1, 2] = self.ty
        return theta


def sample_affine_params(
    batch_size: int,
    generator: Optional[torch.Generator],
    cfg: SpatialAugmentConfig,
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
) -> AffineParams:
    """Draw per-sample affine parameters (METHOD.md section 2, step 2).

    angle ~ U[-rotation_deg, rotation_deg]; s ~ U[scale]; tx, ty ~ U[-(1 - s), 1 - s];
    flip is none / along x / along y with probabilities ``flip_probs`` (all from ``cfg``).
    ``device`` defaults to the generator's device.
    """
    rotation_deg, scale, flip_probs = cfg.rotation_deg, cfg.scale, cfg.flip_probs
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(flip_probs) != 3 or min(flip_probs) < 0 or not math.isclose(sum(flip_probs), 1.0, abs_tol=1e-6):
        raise ValueError(f"flip_probs must be 3 non-negative numbers summing to 1, got {flip_probs}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")

    def uniform(low, high):
        u = torch.rand(batch_size, generator=generator, device=device, dtype=dtype)
        return low + (high - low) * u

    angle = uniform(-rotation_deg, rotation_deg)
    s = uniform(scale[0], scale[1])
    tx = (1 - s) * uniform(-1.0, 1.0)
    ty = (1 - s) * uniform(-1.0, 1.0)
    # Categorical draw by inverse CDF: u < p0 -> none, u < p0 + p1 -> x, else y.
    thresholds = torch.tensor([flip_probs[0], flip_probs[0] + flip_probs[1]], device=device, dtype=dtype)
    flip = torch.bucketize(uniform(0.0, 1.0), thresholds, right=True)
    return AffineParams(angle=angle, scale=s, tx=tx, ty=ty, flip=flip)


def sample_affine(
    batch_size: int,
    generator: Optional[torch.Generator],
    cfg: SpatialAugmentConfig,
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw a batch of random affine matrices ``(B, 2, 3)``; see :func:`sample_affine_params`."""
    return sample_affine_params(batch_size, generator, cfg, device, dtype).to_theta()


def invert_affine(theta: Tensor) -> Tensor:
    """Inverse transforms ``(B, 2, 3)``: ``T^-1(q) = A^-1 (q - t)``, computed in closed form."""
    a, b, tx = theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2]
    c, d, ty = theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2]
    det = a * d - b * c
    inv_a, inv_b, inv_c, inv_d = d / det, -b / det, -c / det, a / det
    row_x = torch.stack([inv_a, inv_b, -(inv_a * tx + inv_b * ty)], dim=-1)
    row_y = torch.stack([inv_c, inv_d, -(inv_c * tx + inv_d * ty)], dim=-1)
    return torch.stack([row_x, row_y], dim=1)


def grid_positions_to_normalised(y: Tensor, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Normalised coordinates ``(yn, xn)`` of pixel centres at integer rows ``y`` and columns ``x``."""
    return (2 * y + 1) / height - 1, (2 * x + 1) / width - 1


def normalised_to_pixel(yn: Tensor, xn: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Fractional pixel coordinates (row, column) of normalised points; inverse of the above."""
    return ((yn + 1) * height - 1) / 2, ((xn + 1) * width - 1) / 2


def source_points(theta: Tensor, positions: Positions, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Normalised source points ``(v, u) = T(p)`` of output pixel centres ``positions = (b, y, x)``."""
    b, y, x = positions
    yn, xn = grid_positions_to_normalised(y.to(theta.dtype), x.to(theta.dtype), height, width)
    t = theta[b]
    u = t[:, 0, 0] * xn + t[:, 0, 1] * yn + t[:, 0, 2]
    v = t[:, 1, 0] * xn + t[:, 1, 1] * yn + t[:, 1, 2]
    return v, u


def _inside_pixel_centre_span(v: Tensor, u: Tensor, height: int, width: int) -> Tensor:
    return (u.abs() <= 1 - 1 / width) & (v.abs() <= 1 - 1 / height)


def valid_mask(theta: Tensor, height: int, width: int) -> Tensor:
    """``(B, 1, H, W)`` bool: output pixels whose source ``T(p)`` lies within the span of input
    pixel centres (``|u| <= 1 - 1/W`` and ``|v| <= 1 - 1/H``).

    Computed in float64 so that the boundary does not depend on the image's dtype.
    """
    grid = F.affine_grid(theta.double(), [theta.shape[0], 1, height, width], align_corners=False)
    inside = _inside_pixel_centre_span(grid[..., 1], grid[..., 0], height, width)
    return inside[:, None]


def warp(x: Tensor, theta: Tensor, mode: str = "bilinear") -> tuple[Tensor, Tensor]:
    """Warp ``x`` (B, C, H, W) by ``theta``: ``out(p) = x(T(p))``, zero padding, ``align_corners=False``.

    Returns ``(warped, valid)`` where ``valid`` is the ``(B, 1, H, W)`` bool mask of
    :func:`valid_mask`. The warp runs in float32 at least (``grid_sample`` wants the grid in the
    input's dtype, and a bf16 grid would misplace samples by up to ~0.5 %) and is cast back to
    ``x.dtype``.
    """
    if x.ndim != 4 or theta.shape != (x.shape[0], 2, 3):
        raise ValueError(f"expected x (B, C, H, W) and theta (B, 2, 3), got {tuple(x.shape)} and {tuple(theta.shape)}")
    height, width = x.shape[-2:]
    return _resample(x, _sampling_grid(theta, x), mode, "zeros"), valid_mask(theta, height, width)


def _sampling_grid(theta: Tensor, x: Tensor) -> Tensor:
    """``affine_grid`` of ``theta`` for ``x``'s shape, in float32 at least (see :func:`warp`)."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.affine_grid(theta.to(compute_dtype), list(x.shape), align_corners=False)


def _resample(x: Tensor, grid: Tensor, mode: str, padding_mode: str) -> Tensor:
    """``x`` read at ``grid`` by ``grid_sample`` in the grid's dtype, cast back to ``x.dtype``."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        out = F.grid_sample(x.to(grid.dtype), grid, mode=mode, padding_mode=padding_mode, align_corners=False)
    return out.to(x.dtype)


def augment_spatial(
    images: Tensor, masks: Tensor, cfg: SpatialAugmentConfig, generator: Optional[torch.Generator] = None
) -> tuple[Tensor, Tensor]:
    """Warp a labeled batch by one random affine per sample (downstream augmentation).

    ``images`` (B, C, H, W) are resampled bilinearly and ``masks`` (B, 1, H, W) of integer
    labels by nearest neighbour, with the same transform, so every label stays on its pixels.
    Reflection padding: a rotated crop has no empty corners, whose zeros would be an intensity
    that never occurs in a scan. Returns new tensors of the inputs' dtypes.
    """
    if images.ndim != 4 or masks.ndim != 4 or masks.shape[1] != 1 or images.shape[0] != masks.shape[0] \
            or images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"expected images (B, C, H, W) and masks (B, 1, H, W) of the same B, H, W, "
                         f"got {tuple(images.shape)} and {tuple(masks.shape)}")
    theta = sample_affine(images.shape[0], generator, cfg, device=images.device)
    grid = _sampling_grid(theta, images)  # one grid for both, and no validity mask: nothing is padded with zeros
    warped = _resample(images, grid, "bilinear", "reflection")
    # Nearest-neighbour warping of small integers is exact in float32.
    labels = _resample(masks.float(), grid, "nearest", "reflection")
    return warped, labels.to(masks.dtype)


def sample_at(features: Tensor, theta: Tensor, positions: Positions, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Bilinear lookup of ``features`` (B, C, H, W) at the sources ``T(p)`` of output pixels ``p``.

    ``positions = (b, y, x)`` are integer output positions; row ``b`` of ``features`` is read
    with ``theta[b]`` (``features`` may hold more rows than ``theta``). Returns ``(N, C)``, equal to
    ``warp(features, theta)[0][b, :, y, x]`` (same zero padding) while reading only 4 N pixel
    vectors instead of warping whole feature maps. Differentiable with respect to ``features``.
    The result has ``dtype`` (default: the features' own); the interpolation itself always runs
    in at least float32, so bf16 features need no full-map cast beforehand.
    """
    b, y, x = positions
    height, width = features.shape[-2:]
    compute_dtype = torch.promote_types(features.dtype, torch.float32)
    v, u = source_points(theta.to(compute_dtype), (b, y, x), height, width)
    row, col = normalised_to_pixel(v, u, height, width)
    row0, col0 = torch.floor(row), torch.floor(col)
    weight_row1, weight_col1 = row - row0, col - col0
    row0, col0 = row0.long(), col0.long()
    # Index the (B, H, W, C) view: for channels_last features it is the memory order, so the
    # gradient of these lookups comes back channels_last too (see losses.gather_positions).
    pixels = features.permute(0, 2, 3, 1)

    result = 0
    for d_row, weight_row in ((0, 1 - weight_row1), (1, weight_row1)):
        for d_col, weight_col in ((0, 1 - weight_col1), (1, weight_col1)):
            r, c = row0 + d_row, col0 + d_col
            # Neighbours outside the image contribute zero, as grid_sample's zero padding.
            inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
            values = pixels[b, r.clamp(0, height - 1), c.clamp(0, width - 1)].to(compute_dtype)
            result = result + values * (weight_row * weight_col * inside)[:, None]
    return result.to(dtype or features.dtype)
