"""Tests of the spatial (affine warp) and intensity augmentations."""

from __future__ import annotations

import math

import pytest
import torch

from pix2rep.transforms import (
    FLIP_NONE,
    FLIP_X,
    FLIP_Y,
    IntensityAugmentConfig,
    SpatialAugmentConfig,
    augment_intensity,
    augment_spatial,
    bias_field,
    gaussian_blur,
    invert_affine,
    sample_affine,
    sample_affine_params,
    sample_at,
    valid_mask,
    warp,
)

SIZE = 64


def rotation_theta(angle_deg: float, scale: float = 1.0, tx: float = 0.0, ty: float = 0.0) -> torch.Tensor:
    """A (1, 2, 3) float64 matrix T(p) = t + s R p."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[[scale * c, -scale * s, tx], [scale * s, scale * c, ty]]], dtype=torch.float64)


def pixel_centres(size: int) -> torch.Tensor:
    """Normalised pixel-centre coordinates (align_corners=False), float64."""
    return (2 * torch.arange(size, dtype=torch.float64) + 1) / size - 1


# Plane waves (amplitude, wavevector in radians per pixel, phase) of the smooth test image.
WAVES = [(0.2, (2 * math.pi / 24, 2 * math.pi / 40), 0.3), (0.15, (-2 * math.pi / 32, 2 * math.pi / 28), 1.1)]


def smooth_image(size: int = SIZE) -> torch.Tensor:
    row = torch.arange(size, dtype=torch.float64)[:, None]
    col = torch.arange(size, dtype=torch.float64)[None, :]
    image = torch.full((size, size), 0.5, dtype=torch.float64)
    for amplitude, (k_col, k_row), phase in WAVES:
        image = image + amplitude * torch.sin(k_col * col + k_row * row + phase)
    return image[None, None].float()


# ---------------------------------------------------------------- spatial


def test_warp_round_trip_recovers_smooth_image():
    scale = 0.8
    theta = rotation_theta(30.0, scale=scale, tx=0.1, ty=-0.05).float()
    image = smooth_image()
    warped, valid_first = warp(image, theta)
    back, valid_second = warp(warped, invert_affine(theta))
    # Valid in the round trip: the second source lies inside, and every pixel it reads from the
    # first warp was itself valid (the bilinear-warped mask is exactly 1 only then).
    first_valid_read, _ = warp(valid_first.float(), invert_affine(theta))
    round_trip_valid = valid_second & (first_valid_read >= 1 - 1e-6)
    assert round_trip_valid.float().mean() > 0.3

    # Bilinear interpolation error is at most (|f_xx| + |f_yy|) / 8 per pass (1-pixel spacing);
    # for a plane wave of amplitude a and wavevector k that is a |k|^2 / 8. The first warp samples
    # the image itself, the second the zoomed image whose wavevectors are scaled by s.
    per_pass = sum(a * (kx**2 + ky**2) / 8 for a, (kx, ky), _ in WAVES)
    bound = per_pass * (1 + scale**2) + 1e-5
    assert bound < 0.01
    error = (back - image).abs()[round_trip_valid]
    assert error.max().item() < bound


def test_valid_mask_equals_analytic_region_for_45_degree_rotation():
    theta = rotation_theta(45.0)
    x = pixel_centres(SIZE)[None, :]
    y = pixel_centres(SIZE)[:, None]
    c = s = math.sqrt(0.5)
    u, v = c * x - s * y, s * x + c * y
    limit = 1 - 1 / SIZE
    expected = (u.abs() <= limit) & (v.abs() <= limit)
    # theta stays float64: the mask is computed in float64, like the expectation above.
    _, valid = warp(torch.rand(1, 1, SIZE, SIZE), theta)
    assert valid.shape == (1, 1, SIZE, SIZE) and valid.dtype == torch.bool
    mismatches = (valid[0, 0] != expected).sum().item()
    assert mismatches == 0
    # Geometry: the image [-1, 1]^2 minus the 4 corner triangles where |x| + |y| > sqrt(2) L,
    # of legs 2 - sqrt(2) L, gives a valid fraction of 1 - (2 - sqrt(2) L)^2 / 2 = 0.815.
    fraction = 1 - (2 - math.sqrt(2) * limit) ** 2 / 2
    assert abs(valid.double().mean().item() - fraction) < 0.01


def test_valid_mask_for_zoom_out_is_centred_square():
    scale = 1.5
    _, valid = warp(torch.rand(1, 1, SIZE, SIZE), rotation_theta(0.0, scale=scale).float())
    invalid_fraction = 1 - valid.float().mean().item()
    assert abs(invalid_fraction - (1 - (1 / scale) ** 2)) < 0.02
    # Columns j are valid iff |1.5 x_j| <= 1 - 1/64, i.e. j in 11..52: a centred 42 x 42 square.
    expected = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    expected[11:53, 11:53] = True
    assert torch.equal(valid[0, 0], expected)


def test_valid_region_reads_no_padding():
    """Inside the valid mask, warping a constant image gives the constant exactly."""
    theta = sample_affine(4, torch.Generator().manual_seed(3), SpatialAugmentConfig())
    warped, valid = warp(torch.ones(4, 1, SIZE, SIZE), theta)
    assert torch.allclose(warped[valid], torch.ones(()), atol=1e-5)


def test_sampled_parameters_stay_in_range_and_flip_frequencies():
    n = 20000
    params = sample_affine_params(n, torch.Generator().manual_seed(0), SpatialAugmentConfig())
    assert params.angle.abs().max() <= 90 and params.angle.abs().max() > 89
    assert params.scale.min() >= 0.33 and params.scale.max() <= 0.95
    assert (params.tx.abs() <= 1 - params.scale + 1e-6).all()
    assert (params.ty.abs() <= 1 - params.scale + 1e-6).all()
    frequencies = torch.bincount(params.flip, minlength=3).double() / n
    for flip, expected in ((FLIP_NONE, 0.23), (FLIP_X, 0.45), (FLIP_Y, 0.32)):
        assert abs(frequencies[flip].item() - expected) < 0.015


def test_theta_matches_parameters():
    params = sample_affine_params(256, torch.Generator().manual_seed(1), SpatialAugmentConfig())
    theta = params.to_theta()
    linear = theta[:, :, :2]
    # |det A| = s^2, sign -1 exactly when flipped; translation is (tx, ty).
    det = torch.linalg.det(linear.double())
    flipped = params.flip != FLIP_NONE
    assert torch.allclose(det.abs(), params.scale.double() ** 2, atol=1e-6)
    assert torch.equal(det < 0, flipped)
    assert torch.equal(theta[:, 0, 2], params.tx) and torch.equal(theta[:, 1, 2], params.ty)
    assert torch.allclose(invert_affine(invert_affine(theta)), theta, atol=1e-5)


def test_sampling_follows_the_spatial_configuration():
    from pix2rep import config

    assert config.SpatialAugmentConfig is SpatialAugmentConfig  # one definition, read by RunConfig
    narrow = SpatialAugmentConfig(rotation_deg=10.0, scale=(0.5, 0.6), flip_probs=(1.0, 0.0, 0.0))
    params = sample_affine_params(500, torch.Generator().manual_seed(0), narrow)
    assert params.angle.abs().max() <= 10 and params.scale.min() >= 0.5 and params.scale.max() <= 0.6
    assert (params.flip == FLIP_NONE).all()


def test_invert_affine_composes_to_identity():
    theta = sample_affine(16, torch.Generator().manual_seed(2), SpatialAugmentConfig()).double()
    inverse = invert_affine(theta)
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(16, 1, 3)
    product = torch.cat([theta, bottom], 1) @ torch.cat([inverse, bottom], 1)
    assert torch.allclose(product, torch.eye(3, dtype=torch.float64).expand(16, 3, 3), atol=1e-12)


def test_sampling_is_deterministic_per_seed():
    a = sample_affine(8, torch.Generator().manual_seed(5), SpatialAugmentConfig())
    b = sample_affine(8, torch.Generator().manual_seed(5), SpatialAugmentConfig())
    c = sample_affine(8, torch.Generator().manual_seed(6), SpatialAugmentConfig())
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("channels_last", [False, True])
def test_sample_at_equals_warp(channels_last):
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(3, 5, 20, 24, generator=generator)
    if channels_last:
        features = features.to(memory_format=torch.channels_last)
    # Include zoom-outs so that some sources fall in the padding, where both must give zeros.
    theta = sample_affine(3, generator, SpatialAugmentConfig(scale=(0.5, 1.6)))
    warped, _ = warp(features, theta)
    b = torch.randint(0, 3, (500,), generator=generator)
    y = torch.randint(0, 20, (500,), generator=generator)
    x = torch.randint(0, 24, (500,), generator=generator)
    looked_up = sample_at(features, theta, (b, y, x))
    assert looked_up.shape == (500, 5)
    assert torch.allclose(looked_up, warped[b, :, y, x], atol=1e-5)


def test_sample_at_is_differentiable():
    features = torch.randn(2, 3, 8, 8, requires_grad=True)
    theta = sample_affine(2, torch.Generator().manual_seed(0), SpatialAugmentConfig())
    positions = tuple(torch.tensor(v) for v in ([0, 1], [3, 4], [4, 3]))
    sample_at(features, theta, positions).sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_warp_under_bf16_autocast_keeps_dtype():
    x = torch.rand(2, 4, 16, 16).to(torch.bfloat16)
    theta = sample_affine(2, torch.Generator().manual_seed(0), SpatialAugmentConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        warped, valid = warp(x, theta)
    assert warped.dtype == torch.bfloat16 and valid.shape == (2, 1, 16, 16)


def test_valid_mask_matches_warp_mask():
    theta = sample_affine(2, torch.Generator().manual_seed(0), SpatialAugmentConfig())
    assert torch.equal(valid_mask(theta, 16, 12), warp(torch.rand(2, 1, 16, 12), theta)[1])


def labeled_batch(batch: int = 3, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and integer label maps 0..3 (B, 1, size, size)."""
    gen = torch.Generator().manual_seed(1)
    return torch.rand(batch, 1, size, size, generator=gen), torch.randint(0, 4, (batch, 1, size, size), generator=gen)


@pytest.mark.parametrize("flip_probs, flip", [((1.0, 0.0, 0.0), lambda t: t),
                                              ((0.0, 1.0, 0.0), lambda t: t.flip(-1)),
                                              ((0.0, 0.0, 1.0), lambda t: t.flip(-2))])
def test_augment_spatial_without_rotation_or_zoom_moves_pixels_exactly(flip_probs, flip):
    # Scale 1 and angle 0 leave only the flip: every output pixel centre samples an input pixel
    # centre, so images and labels come back exactly, flipped by hand here.
    x, y = labeled_batch()
    cfg = SpatialAugmentConfig(rotation_deg=0.0, scale=(1.0, 1.0), flip_probs=flip_probs)
    warped, labels = augment_spatial(x, y, cfg, torch.Generator().manual_seed(0))
    assert labels.dtype == y.dtype and warped.dtype == x.dtype
    assert torch.allclose(warped, flip(x), atol=1e-6)
    assert torch.equal(labels, flip(y))


def test_augment_spatial_keeps_labels_on_their_pixels():
    # An image that is its own label map (label / 3), warped bilinearly, must round to the
    # labels warped by nearest neighbour, except on the edges between regions.
    y = torch.zeros(4, 1, 48, 48, dtype=torch.long)
    y[:, :, 10:30, 12:36] = 1
    y[:, :, 16:24, 18:28] = 2
    y[:, :, 18:22, 21:25] = 3
    cfg = SpatialAugmentConfig(rotation_deg=30.0, scale=(0.85, 1.15), flip_probs=(1.0, 0.0, 0.0))
    warped, labels = augment_spatial(y.float() / 3, y, cfg, torch.Generator().manual_seed(3))
    assert not torch.equal(labels, y)  # it did move them
    assert set(labels.unique().tolist()) == {0, 1, 2, 3}
    agree = (torch.round(warped * 3).long() == labels).float().mean().item()
    assert agree > 0.97, agree


def test_augment_spatial_refuses_mismatched_shapes():
    x, y = labeled_batch()
    with pytest.raises(ValueError, match=r"expected images \(B, C, H, W\) and masks \(B, 1, H, W\).*\(3, 24, 24\)"):
        augment_spatial(x, y[:, 0], SpatialAugmentConfig())


# ---------------------------------------------------------------- intensity


def only(**changes) -> IntensityAugmentConfig:
    """A config where every augmentation is off except those given."""
    cfg = IntensityAugmentConfig(noise_p=0.0, blur_p=0.0, gamma_p=0.0, bias_p=0.0, invert_p=0.0)
    for name, value in changes.items():
        setattr(cfg, name, value)
    return cfg


def images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_default_augmentation_keeps_shape_dtype_and_range():
    x = images(8)
    out = augment_intensity(x, IntensityAugmentConfig(), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)


def test_everything_off_is_identity():
    x = images()
    assert torch.equal(augment_intensity(x, only(), torch.Generator().manual_seed(0)), x)


def test_inversion_with_p1_is_one_minus_x():
    x = images()
    out = augment_intensity(x, only(invert_p=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(out, 1 - x)


def test_gamma_zero_range_is_identity_and_gamma_changes_values():
    x = images()
    out = augment_intensity(x, only(gamma_p=1.0, log_gamma_max=0.0), torch.Generator().manual_seed(0))
    assert torch.equal(out, x)
    out = augment_intensity(x, only(gamma_p=1.0, log_gamma_max=0.05), torch.Generator().manual_seed(0))
    # x ** gamma with |log gamma| <= 0.05 moves a value by at most 0.05 / e (at x = 1/e).
    assert 0 < (out - x).abs().max() <= 0.05 / math.e + 1e-6
    # Each sample's change is one monotone power: the order of its pixels is kept.
    assert torch.equal(out.flatten(1).argsort(dim=1), x.flatten(1).argsort(dim=1))


def test_blur_keeps_constant_image_and_mean_and_zero_sigma_is_identity():
    constant = torch.full((4, 1, 32, 32), 0.37)
    out = augment_intensity(constant, only(blur_p=1.0), torch.Generator().manual_seed(0))
    assert torch.allclose(out, constant, atol=1e-6)
    x = images()
    assert torch.allclose(gaussian_blur(x, torch.zeros(4), 1.3), x, atol=0)
    blurred = gaussian_blur(x, torch.full((4,), 1.3), 1.3)
    # Blur removes most of the variance of white noise and roughly keeps the mean.
    assert blurred.var() < 0.2 * x.var()
    assert torch.allclose(blurred.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.01)


def test_blur_matches_scipy_gaussian_filter():
    from scipy.ndimage import gaussian_filter

    x = images(2)
    sigmas = torch.tensor([0.7, 1.2])
    blurred = gaussian_blur(x, sigmas, 1.3)
    for i, sigma in enumerate(sigmas.tolist()):
        # Same radius (ceil(3 * 1.3) = 4) and same reflection as torch's "reflect" ("mirror").
        expected = gaussian_filter(x[i, 0].double().numpy(), sigma, mode="mirror", truncate=4 / sigma)
        assert torch.allclose(blurred[i, 0].double(), torch.from_numpy(expected), atol=1e-5)


def test_noise_std_matches_drawn_level():
    x = torch.full((64, 1, 32, 32), 0.5)
    out = augment_intensity(x, only(noise_p=1.0, noise_std_max=0.05), torch.Generator().manual_seed(0))
    stds = (out - x).std(dim=(1, 2, 3))
    # Stds are uniform in [0, 0.05]: all below the maximum, spread over the range, mean ~0.025.
    assert stds.max() < 0.05 * 1.1 and stds.min() < 0.01
    assert abs(stds.mean().item() - 0.025) < 0.005


def test_bias_field_is_positive_smooth_and_centred():
    field = bias_field(16, 64, 64, 0.9, 3, torch.Generator().manual_seed(0))
    assert field.shape == (16, 1, 64, 64) and (field > 0).all()
    log_field = field.log()
    assert torch.allclose(log_field.mean(dim=(1, 2, 3)), torch.zeros(16), atol=1e-5)
    # Smooth: d/dx sum c_ij x^i y^j is at most 0.9 * sum_ij i = 0.9 * 10 on [-1, 1]^2 for the
    # 10 cubic terms, so the log changes by at most 0.9 * 10 * (2 / 64) from pixel to pixel.
    step = max(log_field.diff(dim=-1).abs().max(), log_field.diff(dim=-2).abs().max())
    assert step <= 0.9 * 10 * 2 / 64
    x = images()
    out = augment_intensity(x, only(bias_p=1.0), torch.Generator().manual_seed(0))
    assert not torch.equal(out, x)


def test_per_sample_parameters_differ_across_batch():
    x = images(1).expand(8, 1, 32, 32).contiguous()
    out = augment_intensity(x, IntensityAugmentConfig(), torch.Generator().manual_seed(0))
    distinct = {tuple(out[i].flatten()[:50].tolist()) for i in range(8)}
    assert len(distinct) == 8
    # And each augmentation alone also varies per sample.
    for cfg in (only(bias_p=1.0), only(gamma_p=1.0), only(blur_p=1.0), only(noise_p=1.0)):
        out = augment_intensity(x, cfg, torch.Generator().manual_seed(1))
        assert not torch.allclose(out[0], out[1])


def test_determinism_by_seed():
    x = images(4)
    cfg = IntensityAugmentConfig()
    a = augment_intensity(x, cfg, torch.Generator().manual_seed(7))
    b = augment_intensity(x, cfg, torch.Generator().manual_seed(7))
    c = augment_intensity(x, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_probabilities_are_per_sample():
    x = torch.full((2000, 1, 4, 4), 0.2)
    out = augment_intensity(x, only(invert_p=0.35), torch.Generator().manual_seed(0))
    inverted = torch.isclose(out[:, 0, 0, 0], torch.tensor(0.8))
    assert abs(inverted.double().mean().item() - 0.35) < 0.035


def test_bf16_autocast_and_channels_last():
    x = images(4).to(torch.bfloat16).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = augment_intensity(x, IntensityAugmentConfig(), torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    reference = augment_intensity(x.float().contiguous(), IntensityAugmentConfig(), torch.Generator().manual_seed(0))
    assert torch.allclose(out.float(), reference, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_intensity_and_warp_on_cuda():
    x = images(4).cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    out = augment_intensity(x, IntensityAugmentConfig(), generator)
    assert out.device.type == "cuda" and out.min() >= 0 and out.max() <= 1
    theta = sample_affine(4, generator, SpatialAugmentConfig())
    assert theta.device.type == "cuda"
    warped, valid = warp(out, theta)
    positions = tuple(torch.tensor(v, device="cuda") for v in ([0, 3], [5, 6], [7, 8]))
    assert torch.allclose(sample_at(out, theta, positions), warped[positions[0], :, positions[1], positions[2]], atol=1e-5)
