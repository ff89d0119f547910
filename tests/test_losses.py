"""Tests of the losses against slow, obvious references: pixel-level InfoNCE and Barlow Twins,
the segmentation loss and the Mean Teacher consistency."""

from __future__ import annotations

import math

import pytest
import torch

from pix2rep.losses import (
    barlow_twins,
    check_feature_pair,
    gather_positions,
    mean_teacher_consistency,
    nt_xent,
    sample_valid_positions,
    segmentation_loss,
)

TEMPERATURE, LAMBDA_OFFDIAG = 0.53, 1 / 256  # the configuration's defaults


def pixel_loss(loss_name, z1, z2, valid, n_samples, generator=None, lambda_offdiag=LAMBDA_OFFDIAG):
    """A pixel-level loss of two aligned feature maps (B, C, H, W), composed as pretraining
    composes it: up to ``n_samples`` positions valid in both views (all of them for None), the
    vectors of both maps there, and NT-Xent or Barlow Twins of those vectors."""
    valid = check_feature_pair(z1, z2, valid)
    positions = sample_valid_positions(valid, n_samples, generator)
    u, v = gather_positions(z1, positions), gather_positions(z2, positions)
    return nt_xent(u, v, TEMPERATURE) if loss_name == "infonce" else barlow_twins(u, v, lambda_offdiag)


def slow_nt_xent(u: torch.Tensor, v: torch.Tensor, temperature: float) -> float:
    """NT-Xent with Python loops and a hand-written log-softmax, in float64."""
    vectors = [row.double() / row.double().norm() for row in torch.cat([u, v])]
    n = len(vectors) // 2
    total = 0.0
    for i in range(2 * n):
        positive = i + n if i < n else i - n
        logits = {j: float(vectors[i] @ vectors[j]) / temperature for j in range(2 * n) if j != i}
        largest = max(logits.values())
        log_normaliser = largest + math.log(sum(math.exp(s - largest) for s in logits.values()))
        total += log_normaliser - logits[positive]
    return total / (2 * n)


def slow_barlow_twins(u: torch.Tensor, v: torch.Tensor, lambda_offdiag: float, eps: float = 1e-5) -> float:
    """Barlow Twins with Python loops over channels and rows, in float64."""
    m, d = u.shape
    u, v = u.double().tolist(), v.double().tolist()

    def standardised_column(rows, k):
        column = [row[k] for row in rows]
        mean = sum(column) / m
        variance = sum((c - mean) ** 2 for c in column) / m
        return [(c - mean) / math.sqrt(variance + eps) for c in column]

    u_columns = [standardised_column(u, k) for k in range(d)]
    v_columns = [standardised_column(v, k) for k in range(d)]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a * b for a, b in zip(u_columns[i], v_columns[j])) / m
            loss += (1 - c_ij) ** 2 if i == j else lambda_offdiag * c_ij**2
    return loss


# ---------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("n, channels, temperature", [(1, 3, 0.53), (5, 8, 0.53), (12, 16, 0.1), (7, 4, 2.0)])
def test_nt_xent_equals_slow_reference(n, channels, temperature):
    generator = torch.Generator().manual_seed(n * 100 + channels)
    u = torch.randn(n, channels, generator=generator, dtype=torch.float64)
    v = u + 0.5 * torch.randn(n, channels, generator=generator, dtype=torch.float64)
    assert nt_xent(u, v, temperature).item() == pytest.approx(slow_nt_xent(u, v, temperature), abs=1e-5)


@pytest.mark.parametrize("batch, height, width", [(1, 3, 4), (2, 4, 3), (3, 2, 2)])
def test_pixel_infonce_with_all_positions_equals_slow_reference(batch, height, width):
    generator = torch.Generator().manual_seed(batch)
    z1 = torch.randn(batch, 6, height, width, generator=generator)
    z2 = z1 + 0.3 * torch.randn(batch, 6, height, width, generator=generator)
    valid = torch.ones(batch, 1, height, width, dtype=torch.bool)
    # n_samples covers every position: the sample is all of them, in a random joint order, to
    # which the loss is invariant.
    loss = pixel_loss("infonce", z1, z2, valid, 1000, generator)
    u = z1.permute(0, 2, 3, 1).reshape(-1, 6)
    v = z2.permute(0, 2, 3, 1).reshape(-1, 6)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(slow_nt_xent(u, v, 0.53), abs=1e-5)


def test_infonce_of_independent_vectors_is_log_2n_minus_1():
    n, channels = 64, 4096
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(n, channels, generator=generator)
    v = torch.randn(n, channels, generator=generator)
    # Cosines of independent vectors are ~1/sqrt(4096) = 0.016: all logits are nearly equal.
    assert abs(nt_xent(u, v, 0.53).item() - math.log(2 * n - 1)) < 0.05


def test_infonce_is_lower_with_identical_positives():
    generator = torch.Generator().manual_seed(1)
    u = torch.randn(32, 16, generator=generator)
    v = torch.randn(32, 16, generator=generator)
    assert nt_xent(u, u.clone(), 0.53) < nt_xent(u, v, 0.53)


@pytest.mark.parametrize("loss_name", ["infonce", "barlow"])
def test_gradients_flow_to_both_views(loss_name):
    generator = torch.Generator().manual_seed(2)
    z1 = torch.randn(2, 8, 6, 6, generator=generator, requires_grad=True)
    z2 = torch.randn(2, 8, 6, 6, generator=generator, requires_grad=True)
    valid = torch.ones(2, 6, 6, dtype=torch.bool)
    loss = pixel_loss(loss_name, z1, z2, valid, 20 if loss_name == "infonce" else None, generator)
    loss.backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


@pytest.mark.parametrize("loss_name", ["infonce", "barlow"])
@pytest.mark.parametrize("poison", [float("nan"), 1e30])
def test_only_valid_positions_are_used(loss_name, poison):
    generator = torch.Generator().manual_seed(3)
    z1 = torch.randn(2, 8, 10, 10, generator=generator)
    z2 = z1 + 0.2 * torch.randn(2, 8, 10, 10, generator=generator)
    valid = torch.rand(2, 1, 10, 10, generator=generator) < 0.5
    poisoned1 = z1.masked_fill(~valid, poison)
    poisoned2 = z2.masked_fill(~valid, poison)

    def loss(a, b, seed):
        return pixel_loss(loss_name, a, b, valid, 30, torch.Generator().manual_seed(seed))

    clean, dirty = loss(z1, z2, 4), loss(poisoned1, poisoned2, 4)
    assert torch.isfinite(dirty) and dirty.item() == clean.item()


def test_sample_valid_positions():
    valid = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    valid[0, 0, 2:5, 1:7] = True
    valid[2, 0, 7, :] = True
    b, y, x = sample_valid_positions(valid, 10, torch.Generator().manual_seed(0))
    assert len(b) == 10 and valid[b, 0, y, x].all()
    flat = (b * 64 + y * 8 + x).tolist()
    assert len(set(flat)) == 10  # without replacement
    # Fewer valid than requested: all of them, each once.
    b, y, x = sample_valid_positions(valid, 1000)
    assert len(b) == int(valid.sum()) and valid[b, 0, y, x].all()
    # Uniform over the batch: each of the 26 valid positions drawn with probability 10/26.
    counts = torch.zeros(3, 8, 8)
    generator = torch.Generator().manual_seed(1)
    for _ in range(400):
        b, y, x = sample_valid_positions(valid, 10, generator)
        counts[b, y, x] += 1
    frequencies = counts[valid[:, 0]] / 400
    assert (frequencies - 10 / 26).abs().max() < 0.1


@pytest.mark.parametrize(
    "z1_shape, z2_shape, valid_shape, message",
    [
        ((2, 4, 8, 8), (2, 4, 8, 7), (2, 8, 8), "same shape"),
        ((2, 4, 8, 8), (2, 4, 8, 8), (2, 8, 7), r"\(2, 1, 8, 8\) or \(2, 8, 8\), got \(2, 8, 7\)"),
        ((4, 8, 8), (4, 8, 8), (8, 8), r"\(B, C, H, W\)"),
    ],
)
@pytest.mark.parametrize("loss_name", ["infonce", "barlow"])
def test_shape_errors_state_expected_and_actual(z1_shape, z2_shape, valid_shape, message, loss_name):
    with pytest.raises(ValueError, match=message):
        pixel_loss(loss_name, torch.zeros(z1_shape), torch.zeros(z2_shape), torch.ones(valid_shape, dtype=torch.bool), 1000)


@pytest.mark.parametrize("loss_name", ["infonce", "barlow"])
def test_no_valid_position_is_an_error(loss_name):
    z = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="no valid position"):
        pixel_loss(loss_name, z, z, torch.zeros(2, 1, 8, 8, dtype=torch.bool), 1000)


def test_infonce_under_bf16_autocast_is_float32():
    generator = torch.Generator().manual_seed(5)
    z1 = torch.randn(2, 16, 8, 8, generator=generator)
    z2 = torch.randn(2, 16, 8, 8, generator=generator)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pixel_loss("infonce", z1.bfloat16(), z2.bfloat16(), valid, 64, torch.Generator().manual_seed(0))
        bt = pixel_loss("barlow", z1.bfloat16(), z2.bfloat16(), valid, None)
    reference = pixel_loss("infonce", z1, z2, valid, 64, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and bt.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), abs=0.02)


# ---------------------------------------------------------------- Barlow Twins


@pytest.mark.parametrize("m, d, lambda_offdiag", [(10, 4, 1 / 256), (50, 8, 5e-3), (33, 6, 1.0)])
def test_barlow_twins_equals_slow_reference(m, d, lambda_offdiag):
    generator = torch.Generator().manual_seed(m + d)
    u = torch.randn(m, d, generator=generator) * 3 + 1
    v = u @ torch.randn(d, d, generator=generator) + 0.5 * torch.randn(m, d, generator=generator)
    loss = barlow_twins(u, v, lambda_offdiag)
    assert loss.item() == pytest.approx(slow_barlow_twins(u, v, lambda_offdiag), abs=1e-5, rel=1e-5)


def decorrelated_standardised(m: int, d: int, seed: int) -> torch.Tensor:
    """(m, d) with columns of mean 0, biased variance 1 and mutually orthogonal."""
    generator = torch.Generator().manual_seed(seed)
    # QR of [1 | random]: the other columns of Q are orthonormal and orthogonal to the ones vector.
    basis = torch.cat([torch.ones(m, 1, dtype=torch.float64), torch.randn(m, d, generator=generator, dtype=torch.float64)], 1)
    q, _ = torch.linalg.qr(basis)
    return q[:, 1:] * math.sqrt(m)


@pytest.mark.parametrize("m, d, dtype", [(64, 16, torch.float64), (256, 32, torch.float32), (64 * 8, 64, torch.float32)])
def test_barlow_twins_is_zero_for_identical_decorrelated_inputs(m, d, dtype):
    u = decorrelated_standardised(m, d, seed=d).to(dtype)
    assert barlow_twins(u, u.clone(), 1 / 256).item() == pytest.approx(0.0, abs=1e-6)


def test_barlow_twins_is_positive_otherwise():
    u = decorrelated_standardised(128, 8, seed=0)
    generator = torch.Generator().manual_seed(99)
    # Noisy copy: C_ii ~ 1 / sqrt(1 + 0.3^2) = 0.96, so the diagonal term alone is ~ 8 * 0.04^2.
    noisy = u + 0.3 * torch.randn(128, 8, generator=generator, dtype=torch.float64)
    assert barlow_twins(u, noisy, 1 / 256) > 5e-3
    # Correlated channels: identical views, but channel 1 copies channel 0.
    correlated = u.clone()
    correlated[:, 1] = correlated[:, 0]
    assert barlow_twins(correlated, correlated, 1 / 256) == pytest.approx(2 / 256, rel=1e-4)
    # Independent views: the diagonal term is about d.
    assert barlow_twins(u, decorrelated_standardised(128, 8, seed=1), 1 / 256) > 1


def test_pixel_barlow_twins_uses_all_valid_pixels():
    generator = torch.Generator().manual_seed(6)
    z1 = torch.randn(2, 5, 6, 7, generator=generator)
    z2 = z1 + 0.4 * torch.randn(2, 5, 6, 7, generator=generator)
    valid = torch.rand(2, 6, 7, generator=generator) < 0.7
    u = z1.permute(0, 2, 3, 1)[valid]
    v = z2.permute(0, 2, 3, 1)[valid]
    loss = pixel_loss("barlow", z1, z2, valid, None, lambda_offdiag=0.01)
    assert loss.item() == pytest.approx(slow_barlow_twins(u, v, 0.01), abs=1e-5, rel=1e-5)


# ---------------------------------------------------------------- across processes


def test_gathering_without_a_process_group_changes_nothing():
    """gather_distributed=True in a single process (no process group): the plain losses, bit for bit."""
    generator = torch.Generator().manual_seed(7)
    u = torch.randn(40, 16, generator=generator)
    v = u + 0.3 * torch.randn(40, 16, generator=generator)
    assert not torch.distributed.is_initialized()
    assert torch.equal(nt_xent(u, v, 0.2, gather_distributed=True), nt_xent(u, v, 0.2))
    assert torch.equal(barlow_twins(u, v, 0.01, gather_distributed=True), barlow_twins(u, v, 0.01))


# ---------------------------------------------------------------- downstream


def test_mean_teacher_consistency_equals_a_hand_computed_value():
    # One pixel, three classes: the student's softmax is (1/3, 1/3, 1/3), the teacher's
    # (1/2, 1/4, 1/4). Squared differences 1/36, 1/144, 1/144 sum to 1/24; the mean over
    # the B K H W = 3 entries is 1/72.
    student = torch.zeros(1, 3, 1, 1, requires_grad=True)
    teacher = torch.tensor([math.log(2.0), 0.0, 0.0]).view(1, 3, 1, 1).requires_grad_()
    loss = mean_teacher_consistency(student, teacher)
    assert loss.item() == pytest.approx(1 / 72, rel=1e-6)
    loss.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None  # the teacher is a target
    # bf16 logits (autocast) are compared in float32
    assert mean_teacher_consistency(student.bfloat16(), teacher.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("name", ["dice", "dice-ce"])
def test_segmentation_loss_is_the_documented_soft_dice(name):
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 4, 6, 5, generator=generator)
    labels = torch.randint(0, 4, (2, 1, 6, 5), generator=generator)
    p = torch.softmax(logits.double(), dim=1)
    y = torch.nn.functional.one_hot(labels[:, 0], 4).permute(0, 3, 1, 2).double()
    eps = 1e-5
    dice_per_slice_and_class = (2 * (p * y).sum((2, 3)) + eps) / (p.sum((2, 3)) + y.sum((2, 3)) + eps)
    expected = 1 - dice_per_slice_and_class.mean()
    if name == "dice-ce":
        expected = expected - torch.log(p.gather(1, labels)).mean()
    assert segmentation_loss(name)(logits, labels).item() == pytest.approx(expected.item(), abs=1e-5)
