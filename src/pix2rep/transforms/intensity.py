"""Batched random intensity augmentation for images in [0, 1] (METHOD.md, section 2).

Every sample of the batch gets its own parameters and its own coin flips, drawn with a
``torch.Generator``; everything is vectorised over the batch (no Python loop over samples).

Order: bias field, gamma, blur, noise, clamp to [0, 1], inversion.

- The bias field and gamma model the acquisition's intensity response, so they act on the
  clean image first; blur then models the point-spread function, and noise is added last, as
  in a scanner (noise is not blurred).
- Noise, and a bias field above 1, can push values out of [0, 1]; the result is clamped to
  [0, 1] after the noise so that inversion (``1 - x``) maps [0, 1] onto itself.

Parameters drawn for a sample whose coin flip says "not applied" are replaced by the identity
(zero noise, sigma 0, gamma 1, flat field), so every sample goes through the same tensor
operations and the random stream is the same whatever the outcome of the coin flips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class IntensityAugmentConfig:
    """Probabilities and ranges of the intensity augmentations (reference values of METHOD.md).

    noise_std_max: the noise std is uniform in [0, noise_std_max], in units of the [0, 1] image
        range. The reference's std of 0.5 acted on raw intensities whose 99th percentile is about
        200, i.e. about 0.2 % of the range: invisible, hence useless as an augmentation. 0.05
        (5 %) is the order of the noise of clinical cine MRI (SNR of about 20-50 in the blood
        pool and myocardium) while staying well below the blood-pool / myocardium contrast
        (about 30 % of the range), so anatomy remains recognisable under the strongest noise.
    blur_sigma_max: Gaussian blur sigma uniform in [0, blur_sigma_max] pixels.
    log_gamma_max: log(gamma) uniform in [-log_gamma_max, log_gamma_max]; ``x ** gamma``.
    bias_coefficient_max: coefficients of the log bias field uniform in +-bias_coefficient_max.
    bias_order: degree of the polynomial log bias field.
    """

    noise_p: float = 0.3
    noise_std_max: float = 0.05
    blur_p: float = 0.5
    blur_sigma_max: float = 1.3
    gamma_p: float = 0.9
    log_gamma_max: float = 0.05
    bias_p: float = 0.75
    bias_coefficient_max: float = 0.9
    bias_order: int = 3
    invert_p: float = 0.35


def _uniform(batch_size: int, low: float, high: float, generator, device) -> Tensor:
    return low + (high - low) * torch.rand(batch_size, generator=generator, device=device, dtype=torch.float32)


def _coin(batch_size: int, p: float, generator, device) -> Tensor:
    return torch.rand(batch_size, generator=generator, device=device) < p


def _normalised_axis(size: int, device) -> Tensor:
    """Pixel-centre coordinates in (-1, 1), as ``affine_grid`` with ``align_corners=False``."""
    return (2 * torch.arange(size, device=device, dtype=torch.float32) + 1) / size - 1


def bias_field(
    batch_size: int,
    height: int,
    width: int,
    coefficient_max: float,
    order: int,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> Tensor:
    """Random smooth multiplicative fields ``(B, 1, H, W)``, TorchIO-style.

    ``field = exp(P(x, y) - mean_image P)`` with ``P(x, y) = sum_{i + j <= order} c_ij x^i y^j``,
    ``c_ij ~ U[-coefficient_max, coefficient_max]`` and x, y normalised to (-1, 1).

    Unlike TorchIO the log field is centred (its spatial mean is removed), which drops the global
    gain exp(c_00 + ...). That gain, up to e^0.9 = 2.5 with the reference coefficient, was harmless
    on the reference's unbounded raw intensities, but on [0, 1] images clamped after augmentation it
    would saturate most of the heart. The centred field only redistributes brightness. Measured
    over 2000 draws at 128 x 128 with coefficient 0.9 and order 3: the log field has a spatial
    std of 0.58 on average; its 5th-95th percentiles over pixels are about -1 and +1 (factors
    0.4 to 2.6), and the extremes, at the image corners, typically reach factors of 0.2 and 5.
    The strongest changes thus sit in the corners, away from the heart at the centre of the
    crop; where the field pushes values above 1 they saturate at the final clamp.
    """
    powers = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
    coefficients = _uniform(batch_size * len(powers), -coefficient_max, coefficient_max, generator, device)
    coefficients = coefficients.view(batch_size, len(powers))
    y = _normalised_axis(height, device)[:, None]
    x = _normalised_axis(width, device)[None, :]
    monomials = torch.stack([x**i * y**j for i, j in powers])  # (terms, H, W)
    log_field = torch.einsum("bt,thw->bhw", coefficients, monomials)
    log_field = log_field - log_field.mean(dim=(1, 2), keepdim=True)
    return torch.exp(log_field)[:, None]


def gaussian_blur(x: Tensor, sigma: Tensor, sigma_max: float) -> Tensor:
    """Blur each sample of ``x`` (B, C, H, W, float) with its own Gaussian ``sigma`` (B,), in pixels.

    Separable per-sample kernels applied with one grouped convolution per axis; the kernel
    radius ``ceil(3 sigma_max)`` is shared. sigma near 0 gives a unit impulse, i.e. the identity.
    Reflect padding, so that a constant image stays constant (and its mean is kept).
    """
    batch, channels, height, width = x.shape
    radius = max(1, math.ceil(3 * sigma_max))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    sigma = sigma.to(torch.float32).clamp_min(1e-3)  # 1e-3 px: exp(-1 / 2e-6) == 0 off-centre
    kernels = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    kernels = kernels.repeat_interleave(channels, dim=0).to(x.dtype)  # one per (sample, channel) group
    # Reflect padding needs radius < size; replicate is the fallback for tiny images.
    pad_mode = "reflect" if radius < min(height, width) else "replicate"
    flat = x.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode=pad_mode)
    groups = batch * channels
    flat = F.conv2d(flat, kernels[:, None, :, None], groups=groups)  # along H
    flat = F.conv2d(flat, kernels[:, None, None, :], groups=groups)  # along W
    return flat.reshape(batch, channels, height, width)


def augment_intensity(
    x: Tensor, cfg: Optional[IntensityAugmentConfig] = None, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Randomly augment a batch of images ``x`` (B, C, H, W) with values in [0, 1].

    Each augmentation is applied to each sample independently with its probability in ``cfg``;
    see the module docstring for the order. Parameters are shared by the channels of a sample.
    The computation runs in float32 with autocast disabled and the result has ``x``'s dtype,
    shape and device, with values in [0, 1]. ``generator``, if given, must be on ``x.device``.
    """
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    cfg = cfg or IntensityAugmentConfig()
    batch, _, height, width = x.shape
    device = x.device

    # All random numbers are drawn up front, in a fixed order, whatever the coin flips.
    apply_bias = _coin(batch, cfg.bias_p, generator, device)
    field = bias_field(batch, height, width, cfg.bias_coefficient_max, cfg.bias_order, generator, device)
    apply_gamma = _coin(batch, cfg.gamma_p, generator, device)
    log_gamma = _uniform(batch, -cfg.log_gamma_max, cfg.log_gamma_max, generator, device)
    apply_blur = _coin(batch, cfg.blur_p, generator, device)
    sigma = _uniform(batch, 0.0, cfg.blur_sigma_max, generator, device)
    apply_noise = _coin(batch, cfg.noise_p, generator, device)
    noise_std = _uniform(batch, 0.0, cfg.noise_std_max, generator, device)
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
    apply_invert = _coin(batch, cfg.invert_p, generator, device)

    def per_sample(values: Tensor) -> Tensor:
        return values.view(batch, 1, 1, 1)

    with torch.autocast(device_type=device.type, enabled=False):
        out = x.to(torch.float32)
        out = torch.where(per_sample(apply_bias), out * field, out)
        gamma = torch.exp(torch.where(apply_gamma, log_gamma, torch.zeros_like(log_gamma)))
        out = out.clamp_min(0) ** per_sample(gamma)
        if cfg.blur_sigma_max > 0:  # no data-dependent skip: it would sync the GPU
            out = gaussian_blur(out, torch.where(apply_blur, sigma, torch.zeros_like(sigma)), cfg.blur_sigma_max)
        out = out + noise * per_sample(torch.where(apply_noise, noise_std, torch.zeros_like(noise_std)))
        out = out.clamp(0, 1)
        out = torch.where(per_sample(apply_invert), 1 - out, out)
    return out.to(x.dtype)
