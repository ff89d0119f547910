"""Synthetic short-axis cine cardiac MRI: the embedded default dataset.

The real ACDC data cannot be shipped with the library, so pix2rep can generate a small look-alike
data set instead, with the same file layout, so that every reader, script and test runs without
downloading anything. The data is SYNTHETIC: it is meant for smoke tests, demos and tutorials,
never for reporting results.

Each patient is a stack of short-axis slices at end-diastole (ED) and end-systole (ES), drawn
the way a balanced SSFP cine image looks: bright blood, grey myocardium, dark lungs, bright fat,
textured soft tissue, a smooth coil-sensitivity bias field, partial-volume blur and Rician noise.
The heart is a truncated ellipsoid shell (the LV) with a crescent-shaped RV wrapped around its
septal side; five groups mimic ACDC's pathologies:

- ``NOR``  normal;
- ``DCM``  dilated LV, thin myocardium, low ejection fraction;
- ``HCM``  thick (mostly septal) myocardium, small cavity, high ejection fraction;
- ``MINF`` a thinned, akinetic segment of myocardium and a reduced ejection fraction;
- ``RV``   dilated, poorly contracting RV.

Arrays are ``(H, W, Z)``, the axis order of the NIfTI files, with Z running from base to apex
like ACDC's. Masks use ACDC's labels: 0 background, 1 RV cavity, 2 myocardium, 3 LV cavity.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import ConfigError, OutputExistsError

GROUPS = ("NOR", "DCM", "HCM", "MINF", "RV")
LABEL_RV, LABEL_MYO, LABEL_LV = 1, 2, 3

# Bumped whenever the generator's output changes, so that cached data sets are regenerated.
GENERATOR_VERSION = 1
MARKER_FILE = ".pix2rep_synthetic.json"

# Tissue signal levels, in the units of ACDC's int16 images (blood ~ 300, myocardium ~ 90).
_BLOOD, _MYO, _FAT, _LUNG, _MUSCLE, _SOFT, _LIVER = 290.0, 88.0, 265.0, 14.0, 62.0, 88.0, 82.0


@dataclass(frozen=True)
class HeartShape:
    """One patient's heart, in mm, at end-diastole (ES is derived from the ejection fractions)."""

    lv_radius: float  # endocardial radius at the base
    myo_thickness: float
    lv_length: float  # base-to-apex length of the epicardium
    ejection_fraction: float  # drives the contraction; the masks' EF comes out ~0.08 lower
    rv_width: float  # how far the RV cavity reaches beyond the LV epicardium, along the septal axis
    rv_spread: float  # how far the RV wraps around the LV (x the epicardial radius)
    rv_ejection_fraction: float
    septal_hypertrophy: float = 0.0  # extra relative thickness facing the RV (HCM)
    infarct_depth: float = 0.0  # relative thinning of the infarcted segment (MINF), 0 = none
    infarct_angle: float = 0.0  # centre of the infarct, radians from the septal axis
    infarct_width: float = 1.0  # angular half-width of the infarct, radians


def _sample_heart(rng: np.random.Generator, group: str) -> HeartShape:
    """Draw a heart for ``group``; sizes follow the usual ACDC ranges for each pathology."""
    u = rng.uniform
    if group == "NOR":
        return HeartShape(u(22, 26), u(7.5, 10), u(78, 92), u(0.66, 0.78), u(10, 15), u(1.05, 1.25), u(0.45, 0.6))
    if group == "DCM":
        return HeartShape(u(31, 37), u(5.5, 7), u(95, 110), u(0.15, 0.35), u(10, 15), u(1.0, 1.2), u(0.3, 0.5))
    if group == "HCM":
        return HeartShape(
            u(17, 21), u(13, 17), u(80, 92), u(0.75, 0.85), u(8, 12), u(1.0, 1.2), u(0.5, 0.65),
            septal_hypertrophy=u(0.2, 0.45),
        )
    if group == "MINF":
        return HeartShape(
            u(26, 31), u(8, 10), u(88, 100), u(0.35, 0.50), u(10, 14), u(1.0, 1.2), u(0.35, 0.5),
            # Infarcts sit on the free (lateral / inferior) wall, away from the septum.
            infarct_depth=u(0.45, 0.6), infarct_angle=u(1.8, 4.5), infarct_width=u(0.5, 0.9),
        )
    if group == "RV":
        return HeartShape(u(21, 25), u(7.5, 10), u(80, 92), u(0.6, 0.72), u(24, 32), u(1.3, 1.5), u(0.15, 0.3))
    raise ValueError(f"unknown group {group!r}; expected one of {GROUPS}")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float) -> np.ndarray:
    """White noise smoothed in-plane, normalised to unit standard deviation (tissue texture).

    Large kernels are applied on a coarser grid and upsampled, which is far cheaper and looks the
    same for such smooth fields.
    """
    step = max(1, int(sigma_px // 2))
    coarse_shape = (shape[0],) + tuple(-(-n // step) for n in shape[1:])
    field = rng.standard_normal(coarse_shape, dtype=np.float32)
    field = ndimage.gaussian_filter(field, (0, sigma_px / step, sigma_px / step), mode="wrap")
    if step > 1:
        field = ndimage.zoom(field, (1, step, step), order=1)[:, : shape[1], : shape[2]]
    return field / (field.std() + 1e-6)


def _coverage(signed_distance_mm: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Fraction of a pixel inside a shape, from the signed distance to its edge (anti-aliasing)."""
    return np.clip(0.5 - signed_distance_mm / pixel_mm, 0.0, 1.0)


def _ellipse_distance(x: np.ndarray, y: np.ndarray, a, b, power: float = 2.0) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to the ellipse |x/a|^p + |y/b|^p = 1.

    First-order estimate (level-set value over its gradient), exact on the outline; ``power``
    above 2 gives a squarer superellipse.
    """
    u, v = np.abs(x / a), np.abs(y / b)
    if power == 2.0:
        rho = np.sqrt(u**2 + v**2)
        grad = np.sqrt((u / a) ** 2 + (v / b) ** 2) / np.maximum(rho, 1e-6)
    else:
        rho = (u**power + v**power) ** (1 / power)
        grad = np.sqrt((u ** (power - 1) / a) ** 2 + (v ** (power - 1) / b) ** 2) * np.maximum(rho, 1e-6) ** (1 - power)
    return (rho - 1.0) / np.maximum(grad, 1e-6)


def _paint(image: np.ndarray, coverage: np.ndarray, value) -> None:
    """Alpha-blend ``value`` (a number or a texture array) into ``image`` where ``coverage`` > 0."""
    image += coverage * (value - image)


def _angular_profile(rng: np.random.Generator, n_terms: int, amplitude: float):
    """A smooth random periodic function of an angle: a few Fourier terms of decreasing size."""
    orders = list(range(2, 2 + n_terms))
    amps = (amplitude * rng.uniform(0.3, 1.0, n_terms) / orders).tolist()
    phases = rng.uniform(0, 2 * np.pi, n_terms).tolist()

    def profile(angle: np.ndarray) -> np.ndarray:
        return sum(a * np.cos(k * angle + p) for a, k, p in zip(amps, orders, phases))

    return profile


def _ink(image: np.ndarray, signed_distance_mm: np.ndarray, pixel_mm: float, depth: float = 0.6) -> None:
    """Darken a thin line along an edge: bSSFP's dark "India ink" outline at fat-water borders."""
    image *= 1 - depth * np.exp(-((signed_distance_mm / pixel_mm) ** 2))


def _render_background(rng, x, y, depth, pixel_mm, heart_centre, textures):
    """Body, chest wall, lungs, liver, stomach, spine and aorta: a ``(Z, H, W)`` image.

    Drawn once per patient and shared by ED and ES. ``x`` (right) and ``y`` (down, posterior) are
    in-plane coordinates in mm; ``depth`` is 0 at the base slice and 1 at the apex. The body is
    an ellipse, usually wider than the field of view, anterior side up, lungs on the left.
    """
    fine, mid, coarse = textures
    depth = depth[:, None, None]
    tilt = rng.uniform(-0.25, 0.25)  # the body is seldom square to the oblique short-axis plane
    bx = math.cos(tilt) * x + math.sin(tilt) * y
    by = -math.sin(tilt) * x + math.cos(tilt) * y
    body_a, body_b = rng.uniform(180, 225), rng.uniform(120, 150)
    fat, wall = rng.uniform(7, 18), rng.uniform(8, 15)

    image = np.zeros(np.broadcast_shapes(fine.shape, x.shape), np.float32)
    squareness = rng.uniform(2.3, 3.0)  # chests are flatter than ellipses at the front and back
    body_d = _ellipse_distance(bx, by, body_a, body_b, squareness) + 2 * coarse
    _paint(image, _coverage(body_d, pixel_mm), _FAT * (1 + 0.08 * mid + 0.05 * fine))
    # Chest wall muscles, with a layer of intermuscular fat; the subcutaneous fat is thicker at
    # the back, hence the offset towards the front.
    muscle_d = _ellipse_distance(bx, by + 4, body_a - fat, body_b - fat, squareness) + 3 * coarse
    _paint(image, _coverage(muscle_d, pixel_mm), _MUSCLE * (1 + 0.15 * fine + 0.1 * mid))
    _ink(image, muscle_d, pixel_mm)
    split = wall * rng.uniform(0.35, 0.6)
    intermuscular = _coverage(np.abs(muscle_d + split + 2 * mid) - 1.2, pixel_mm) * (coarse > -0.3)
    _paint(image, intermuscular, _FAT * 0.8 * (1 + 0.2 * mid))
    inner_a, inner_b = body_a - fat - wall, body_b - fat - wall
    inner_d = _ellipse_distance(bx, by + 4, inner_a, inner_b, squareness) + 2 * coarse
    # Inside the ribcage: soft tissue split into patches of different brightness (bowel loops,
    # stomach, mediastinal fat, vessels) with dark borders, like abdominal organs in bSSFP.
    organs = coarse + 0.3 * mid
    soft = _SOFT * (1 + 0.25 * np.tanh(2 * organs) + 0.1 * mid + 0.06 * fine)
    soft *= 1 - 0.6 * np.exp(-((organs / 0.1) ** 2))
    soft += 250 * np.clip(mid - 1.7, 0, 0.6) - 150 * np.clip(-1.9 - mid, 0, 0.4)  # vessels, gas
    _paint(image, _coverage(inner_d, pixel_mm), soft)
    _ink(image, inner_d, pixel_mm)

    hx, hy = heart_centre
    ribs = inner_d + 3
    # Left lung: a large dark region lateral to the heart, shrinking towards the apex where the
    # diaphragm and abdomen take its place. Lung vessels are sparse small bright dots.
    lung_scale = 1.05 - 0.4 * depth
    lung_d = _ellipse_distance(bx - (hx - rng.uniform(60, 80) - 20 * depth), by - hy - rng.uniform(10, 35),
                               rng.uniform(85, 110) * lung_scale, rng.uniform(70, 95) * lung_scale)
    lung_d = np.maximum(lung_d, ribs) + 5 * coarse  # inside the ribs, irregular outline
    impulses = (rng.random(image.shape, dtype=np.float32) < 0.0015).astype(np.float32)
    dots = ndimage.gaussian_filter(impulses, (0, 0.8, 0.8)) * 8.0
    lung = _LUNG * (1 + 0.4 * mid) + 80 * dots
    _paint(image, _coverage(lung_d, pixel_mm), lung)
    # A sliver of right lung beyond the RV, mostly at the base.
    right_lung_d = _ellipse_distance(bx - hx - rng.uniform(60, 80), by - hy + rng.uniform(10, 30),
                                     rng.uniform(30, 45) * (1.1 - depth), rng.uniform(18, 28))
    _paint(image, _coverage(np.maximum(right_lung_d, ribs) + 4 * coarse, pixel_mm), lung)

    # Liver (right, below the heart), growing towards the apex, with bright vessels; the stomach
    # beside it, its content anywhere from grey to bright.
    liver_scale = 0.5 + 0.7 * depth
    liver_d = _ellipse_distance(bx - hx - rng.uniform(60, 90), by - hy - rng.uniform(55, 80),
                                rng.uniform(70, 95) * liver_scale, rng.uniform(45, 60) * liver_scale)
    liver_d = np.maximum(liver_d, ribs) + 6 * coarse
    _paint(image, _coverage(liver_d, pixel_mm), _LIVER * (1 + 0.06 * mid + 0.04 * fine) + 120 * dots)
    _ink(image, liver_d, pixel_mm, 0.4)
    stomach_d = _ellipse_distance(bx - hx - rng.uniform(95, 125), by - hy + rng.uniform(-10, 15),
                                  rng.uniform(20, 35), rng.uniform(15, 25))
    stomach_d = np.maximum(stomach_d, ribs) + 5 * coarse + 2 * mid
    _paint(image, _coverage(stomach_d, pixel_mm), rng.uniform(120, 220) * (1 + 0.15 * mid))
    _ink(image, stomach_d, pixel_mm)

    # Spine: vertebral body (grey marrow) with the bright CSF of the canal behind it, and the
    # descending aorta (bright flowing blood) in front of it on the left.
    spine_x, spine_y = rng.uniform(-20, 10), inner_b - rng.uniform(18, 26)
    for side in (-1, 1):  # paraspinal muscles
        back_d = _ellipse_distance(bx - spine_x - side * rng.uniform(30, 40), by - spine_y - 12, rng.uniform(22, 30), 18)
        _paint(image, _coverage(np.maximum(back_d, muscle_d + 3), pixel_mm), _MUSCLE * (1 + 0.15 * fine))
        _ink(image, back_d, pixel_mm, 0.4)
    vertebra_d = np.hypot(bx - spine_x, by - spine_y) - 15
    _paint(image, _coverage(vertebra_d, pixel_mm), 135 * (1 + 0.12 * fine))
    _ink(image, vertebra_d, pixel_mm)
    _paint(image, _coverage(np.hypot(bx - spine_x, by - spine_y - 24) - 6, pixel_mm), 300.0)
    aorta_d = np.hypot(bx - spine_x + rng.uniform(20, 30), by - spine_y + rng.uniform(20, 28)) - rng.uniform(9, 13)
    _paint(image, _coverage(aorta_d, pixel_mm), _BLOOD * (1 + 0.04 * fine))
    return image


@dataclass
class _HeartFrame:
    """Polar coordinates around the LV axis, and what depends only on the angle (shared by ED
    and ES). Angle 0 points from the LV centre towards the RV (the septal side)."""

    hx: np.ndarray  # mm along the LV -> RV axis
    hy: np.ndarray  # mm across it
    radius: np.ndarray
    cos: np.ndarray  # cosine of the angle
    outline: np.ndarray  # relative bumps of the LV outline, not quite a circle
    infarct: np.ndarray  # 1 inside the infarcted sector, 0 elsewhere
    fat: np.ndarray  # epicardial fat thickness, mm (patchy, zero in places)


def _heart_frame(heart: HeartShape, x, y, centre_x, centre_y, axis_angle, outline_profile, fat_profile):
    """Compute the :class:`_HeartFrame` of the grid ``x, y`` for a heart centred per slice."""
    dx, dy = x - centre_x, y - centre_y
    hx = math.cos(axis_angle) * dx + math.sin(axis_angle) * dy
    hy = -math.sin(axis_angle) * dx + math.cos(axis_angle) * dy
    radius = np.hypot(hx, hy)
    angle = np.arctan2(hy, hx)
    if heart.infarct_depth > 0:
        offset = np.angle(np.exp(1j * (angle - heart.infarct_angle)))  # wrapped to [-pi, pi]
        infarct = np.exp(-0.5 * (offset / heart.infarct_width) ** 4).astype(np.float32)
    else:
        infarct = np.zeros_like(radius)
    return _HeartFrame(hx, hy, radius, hx / np.maximum(radius, 1e-6), outline_profile(angle), infarct,
                       np.clip(fat_profile(angle), 0, None))


def _lv_radii(heart: HeartShape, phase: str, from_apex, cos, outline, infarct):
    """Endocardial and epicardial LV radii (mm) for slices ``from_apex`` mm above the apex, at the
    angles whose cosine, outline bump and infarct weight are given."""
    # Per-angle wall thickness: septal hypertrophy (HCM), thinned infarct (MINF).
    thickness = heart.myo_thickness * (1 + heart.septal_hypertrophy * np.clip(cos, 0, None) ** 2)
    thickness = thickness * (1 - heart.infarct_depth * infarct)
    # Truncated ellipsoid: the radius grows from the apex to the base (the equator); slices above
    # the base keep the base radius. At ES the apex stays put and the base descends.
    shortening = 0.0 if phase == "ED" else 0.15 * min(1.0, heart.ejection_fraction / 0.6)
    length = heart.lv_length * (1 - shortening)
    cap = heart.myo_thickness  # the apical cap: myocardium below the end of the cavity
    cavity_u = np.clip(1 - (from_apex - cap) / (length - cap), 0, 1)
    endo = heart.lv_radius * np.sqrt(1 - cavity_u**2) * (from_apex > cap) * (1 + outline)
    epi = endo + thickness * np.sqrt(np.clip(from_apex / cap, 0, 1))
    if phase == "ES":
        # Radial contraction from the ejection fraction (volume ~ r² L), almost none in the
        # infarct; the myocardium is incompressible, so each sector keeps its area and thickens.
        contraction = 1 - math.sqrt((1 - heart.ejection_fraction) / (1 - shortening))
        endo_es = endo * (1 - contraction * (1 - 0.9 * infarct))
        epi = np.sqrt(endo_es**2 + epi**2 - endo**2)
        endo = endo_es
    return endo, epi


def _render_heart(image, frame: _HeartFrame, from_apex, pixel_mm, heart: HeartShape, phase: str, anatomy, textures):
    """Draw the heart at ``phase`` ("ED" or "ES") over ``image`` in place; return the label mask.

    ``from_apex`` is each slice's distance above the apex (mm, ``(Z, 1, 1)``); ``anatomy`` holds
    the RV's sideways shift and the papillary muscles' (angle, size).
    """
    fine, mid, coarse = textures
    rv_shift, papillary = anatomy
    hx, hy, radius = frame.hx, frame.hy, frame.radius
    endo, epi = _lv_radii(heart, phase, from_apex, frame.cos, frame.outline, frame.infarct)
    # Trabeculae make the endocardial border ragged by up to a millimetre (the wall stays
    # thicker than a pixel, so the MYO ring stays closed).
    endo_d, epi_d = radius - endo + np.clip(0.6 * mid, -1, 1) * (endo > 0), radius - epi

    # RV: an ellipse on the septal side minus the LV, i.e. a crescent hugging the septum, anchored
    # to this slice's septal epicardium; it narrows towards the apex and ends before it.
    septum = _lv_radii(heart, phase, from_apex, *np.float32([1, 0, 0]))[1]
    rv_profile = np.sqrt(np.clip(1 - np.clip(1 - from_apex / (0.8 * heart.lv_length), 0, 1) ** 2, 0, 1))
    rv_squeeze = 1.0 if phase == "ED" else 1 - heart.rv_ejection_fraction
    rv_a = 0.6 * septum + heart.rv_width * rv_profile * rv_squeeze**0.75
    rv_b = heart.rv_spread * septum * rv_squeeze**0.15 + 0.3 * heart.rv_width * rv_profile
    rv_d = _ellipse_distance(hx - 0.4 * septum, hy - rv_shift * septum, np.maximum(rv_a, 1e-3), np.maximum(rv_b, 1e-3))
    rv_d = np.where(rv_profile > 0.15, rv_d + 1.5 * coarse, np.float32(1e3))
    rv_wall = 2.5  # the thin RV free wall, unlabelled like in ACDC

    # Epicardial fat: a patchy bright rim around the whole heart, with a dark ink line against
    # the myocardium.
    heart_d = np.minimum(epi_d, rv_d - rv_wall)
    _paint(image, _coverage(heart_d - frame.fat, pixel_mm), _FAT * (1 + 0.15 * mid))
    _paint(image, _coverage(rv_d - rv_wall, pixel_mm), _MYO * (1 + 0.1 * fine))
    blood = _BLOOD * (1 + 0.05 * mid + 0.03 * fine)
    rv_trabeculae = np.clip(fine + 0.5 * mid - 0.8, 0, 1) * np.clip(1 + rv_d / 5.0, 0, 1)
    _paint(image, _coverage(np.maximum(rv_d, -epi_d), pixel_mm), blood * (0.95 - 0.5 * rv_trabeculae))
    _paint(image, _coverage(epi_d, pixel_mm), _MYO * (1 + 0.08 * fine + 0.05 * mid))
    _ink(image, heart_d, pixel_mm, 0.5)
    # LV blood with trabeculae and two papillary muscles: dark spots near the lateral wall that
    # belong to the LV cavity label, as in ACDC's annotations.
    near_wall = np.clip(1 - (endo - radius) / 4.0, 0, 1)
    lv_blood = blood * (1 - 0.6 * np.clip(fine + 0.5 * mid - 0.6, 0, 1) * near_wall)
    papillary_r = 0.09 * endo + 1.0
    for pm_angle, pm_size in papillary:
        pm_x, pm_y = math.cos(pm_angle) * (endo - 2 * papillary_r), math.sin(pm_angle) * (endo - 2 * papillary_r)
        pm_d = np.hypot(hx - pm_x, hy - pm_y) - pm_size * papillary_r + 0.8 * fine
        _paint(lv_blood, _coverage(pm_d, pixel_mm) * (endo > 8), _MYO * 1.2)
    _paint(image, _coverage(endo_d, pixel_mm), lv_blood)

    mask = np.zeros(image.shape, np.uint8)
    mask[(rv_d < 0) & (epi_d >= 0)] = LABEL_RV
    mask[epi_d < 0] = LABEL_MYO
    mask[endo_d < 0] = LABEL_LV
    return mask


def _acquire(image, rng, bias, noise_sigma):
    """Imaging chain: partial-volume blur, coil bias field, then Rician (magnitude) noise."""
    image = ndimage.gaussian_filter(image, (0, 0.55, 0.55))
    image *= bias
    real = image + noise_sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imag = noise_sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real**2 + imag**2)


def make_synthetic_patient(seed: int, group: str) -> dict:
    """Generate one synthetic patient: ED and ES short-axis stacks with ACDC-style masks.

    Returns a dict with
      ``images``: {"ED", "ES"} -> float32 ``(H, W, Z)`` arrays, intensities ~0..400 (int16-like);
      ``masks``: {"ED", "ES"} -> uint8 ``(H, W, Z)``, 0 background, 1 RV, 2 MYO, 3 LV;
      ``spacing``: (in-plane, in-plane, slice) voxel size in mm, the NIfTI zooms;
      ``group`` and ``seed``.
    Z runs from base to apex. The same ``seed`` and ``group`` always give the same arrays.
    """
    group = group.upper()
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; expected one of {GROUPS}")
    rng = np.random.default_rng(seed)
    heart = _sample_heart(rng, group)

    # Acquisition geometry: the stack covers the heart from about the base to the apex.
    pixel_mm = round(float(rng.uniform(1.3, 1.8)), 4)
    slice_gap = float(rng.choice([8.0, 9.0, 10.0]))
    height, width = (int(v) for v in rng.integers(96, 113, 2) * 2)
    base_offset = rng.uniform(-0.4, 0.3) * slice_gap  # where the base lies relative to slice 0
    n_slices = int(np.clip(np.ceil((heart.lv_length + base_offset) / slice_gap) + rng.integers(0, 2), 8, 12))
    slice_pos = np.arange(n_slices, dtype=np.float32) * slice_gap
    from_apex = (base_offset + heart.lv_length - slice_pos)[:, None, None]

    # In-plane grid in mm, x to the right (columns), y down (rows); the whole scene is rotated and
    # shifted, so the heart is rarely at the image centre.
    rows = (np.arange(height, dtype=np.float32) - height / 2) * pixel_mm
    cols = (np.arange(width, dtype=np.float32) - width / 2) * pixel_mm
    y, x = rows[None, :, None], cols[None, None, :]
    scene_angle = rng.uniform(-0.5, 0.5)
    shift_x, shift_y = rng.uniform(-25, 25, 2).tolist()
    sx = math.cos(scene_angle) * (x - shift_x) + math.sin(scene_angle) * (y - shift_y)
    sy = -math.sin(scene_angle) * (x - shift_x) + math.cos(scene_angle) * (y - shift_y)

    shape = (n_slices, height, width)
    textures = (_smooth_noise(rng, shape, 0.8), _smooth_noise(rng, shape, 2.5), _smooth_noise(rng, shape, 7.0))
    heart_centre = (rng.uniform(-20, 15), rng.uniform(-45, -20))
    depth = slice_pos / max(float(slice_pos[-1]), 1.0)
    background = _render_background(rng, sx, sy, depth, pixel_mm, heart_centre, textures)

    # The LV axis is not exactly normal to the slices, and breath-holds differ between slices:
    # the heart centre drifts slowly and jitters by a millimetre or two from slice to slice.
    drift = rng.uniform(-0.08, 0.08, 2)
    jitter = rng.normal(0, 1.0, (2, n_slices))
    centre_x = (heart_centre[0] + drift[0] * slice_pos + jitter[0]).astype(np.float32)[:, None, None]
    centre_y = (heart_centre[1] + drift[1] * slice_pos + jitter[1]).astype(np.float32)[:, None, None]
    # The RV points up and to the right (anterior, towards the patient's right), as in ACDC's
    # file order.
    axis_angle = rng.uniform(-np.pi / 4 - 0.4, -np.pi / 4 + 0.3)
    outline_profile = _angular_profile(rng, 3, 0.08)  # the LV is not quite a circle
    fat_base, fat_wiggle = rng.uniform(-1.0, 1.5), _angular_profile(rng, 4, 12.0)
    anatomy = (
        rng.uniform(-0.35, 0.1),  # the RV reaches further round the anterior side
        # Two papillary muscles on the lateral wall: (angle, relative size).
        [(np.pi + side * rng.uniform(0.6, 1.1), rng.uniform(0.8, 1.3)) for side in (-1, 1)],
    )
    # Only the pixels around the heart are drawn again per phase: a box that holds the ED heart.
    reach = 2 * (heart.lv_radius + heart.myo_thickness) + heart.rv_width + 30
    near = np.hypot(sx[0] - heart_centre[0], sy[0] - heart_centre[1]) < reach
    rows_in, cols_in = np.flatnonzero(near.any(axis=1)), np.flatnonzero(near.any(axis=0))
    box = (slice(None), slice(rows_in[0], rows_in[-1] + 1), slice(cols_in[0], cols_in[-1] + 1))
    frame = _heart_frame(heart, sx[box], sy[box], centre_x, centre_y, axis_angle, outline_profile,
                         lambda a: fat_base + fat_wiggle(a))
    box_textures = tuple(t[box] for t in textures)

    bias = _bias_field(rng, sx[0], sy[0], shape)
    gain = rng.uniform(0.8, 1.2)
    noise_sigma = rng.uniform(3.0, 7.0)
    images, masks = {}, {}
    for phase in ("ED", "ES"):
        image = background.copy()
        mask = np.zeros(shape, np.uint8)
        mask[box] = _render_heart(image[box], frame, from_apex, pixel_mm, heart, phase, anatomy, box_textures)
        image = _acquire(image * gain, rng, bias, noise_sigma)
        # (Z, H, W) -> (H, W, Z), the NIfTI file order.
        images[phase] = np.ascontiguousarray(np.clip(image, 0, 32767).transpose(1, 2, 0), dtype=np.float32)
        masks[phase] = np.ascontiguousarray(mask.transpose(1, 2, 0))
    return {"images": images, "masks": masks, "spacing": (pixel_mm, pixel_mm, slice_gap), "group": group, "seed": seed}


def _bias_field(rng, x, y, shape):
    """Smooth multiplicative coil sensitivity: brighter near the anterior and posterior coils."""
    span = max(float(np.ptp(x)), float(np.ptp(y)))
    xn, yn = x / span, y / span
    coeffs = rng.uniform(-0.4, 0.4, 5).tolist()
    log_bias = coeffs[0] * xn + coeffs[1] * yn + coeffs[2] * xn * yn + coeffs[3] * xn**2 + (0.6 + coeffs[4]) * yn**2
    bias = np.exp(log_bias - log_bias.mean()).astype(np.float32)
    return np.broadcast_to(bias, shape)


def _patient_seed(dataset_seed: int, index: int) -> int:
    """The seed of the ``index``-th patient of a data set: independent streams for every pair."""
    return int(np.random.SeedSequence([dataset_seed, index]).generate_state(1)[0])


def _save_nifti(array: np.ndarray, spacing, path: Path, dtype) -> None:
    """Write ``array`` like ACDC's files: voxel axes along -x, -y, +z, zooms = voxel size."""
    import nibabel as nib

    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    image.header.set_data_dtype(dtype)
    image.header.set_zooms(tuple(float(s) for s in spacing))
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))


def _write_patient(folder: Path, patient_id: str, seed: int, group: str) -> None:
    """One ACDC-style patient folder: Info.cfg plus image and ground truth at ED and ES."""
    patient = make_synthetic_patient(seed, group)
    info_rng = np.random.default_rng([seed, 1])  # apart from the images' own random stream
    es_frame = int(info_rng.integers(9, 15))
    folder.mkdir(parents=True)
    (folder / "Info.cfg").write_text(
        f"ED: 1\nES: {es_frame}\nGroup: {group}\n"
        f"Height: {round(float(info_rng.uniform(150, 195)))}.0\nNbFrame: 30\n"
        f"Weight: {round(float(info_rng.uniform(50, 110)))}.0\n"
    )
    for phase, frame in (("ED", 1), ("ES", es_frame)):
        stem = folder / f"{patient_id}_frame{frame:02d}"
        image = np.clip(np.round(patient["images"][phase]), 0, np.iinfo(np.int16).max)
        _save_nifti(image, patient["spacing"], stem.with_name(stem.name + ".nii.gz"), np.int16)
        _save_nifti(patient["masks"][phase], patient["spacing"], stem.with_name(stem.name + "_gt.nii.gz"), np.uint8)


def _read_marker(folder: Path):
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_synthetic_dataset(out_dir, n_patients: int = 25, seed: int = 0, overwrite: bool = False,
                            replace_other_synthetic: bool = True) -> Path:
    """Write a synthetic data set in ACDC's layout and return its folder.

    ``out_dir/patientXXX/`` holds ``Info.cfg`` (ED, ES, Group, Height, NbFrame, Weight) and
    ``patientXXX_frameNN.nii.gz`` / ``patientXXX_frameNN_gt.nii.gz`` for the ED and ES frames
    (int16 images, uint8 masks), so ACDC's readers load it unchanged. Groups cycle through
    NOR, DCM, HCM, MINF, RV. A ``README.txt`` says the data is synthetic.

    What is already in ``out_dir``:

    - nothing (or an empty folder): the data set is written;
    - a synthetic data set made with the same parameters (and generator version): it is
      returned as is, which makes this a cache (the demo and the tests rely on it); with
      ``overwrite`` it is written again;
    - a synthetic data set made with other parameters: replaced when ``replace_other_synthetic``
      (the default, for caches) or ``overwrite``; else an OutputExistsError, so that
      ``pix2rep data synthetic --out`` (which passes ``replace_other_synthetic=False``) never
      replaces a data set without ``--overwrite``;
    - anything else: an OutputExistsError, whatever the flags: a folder that is not a pix2rep
      synthetic data set is never deleted.

    The data set is written to a temporary sibling folder and moved into place at the end, so an
    interrupted run never leaves a half-written folder behind.
    """
    out_dir = Path(out_dir)
    if n_patients < 1:
        raise ConfigError(f"--patients {n_patients}: a synthetic data set needs at least 1 patient")
    params = {"generator": "pix2rep.data.synthetic", "version": GENERATOR_VERSION,
              "n_patients": int(n_patients), "seed": int(seed)}
    existing = _read_marker(out_dir)
    if existing == params and not overwrite:
        return out_dir
    if existing is None and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputExistsError(f"{out_dir}: already exists and is not a pix2rep synthetic data set; "
                                "refusing to replace it, even with --overwrite: choose another folder")
    if existing is not None and existing != params and not (overwrite or replace_other_synthetic):
        made_with = ", ".join(f"{key} {existing.get(key)}" for key in ("n_patients", "seed"))
        raise OutputExistsError(f"{out_dir}: already holds a synthetic data set made with other parameters "
                                f"({made_with}); pass --overwrite to replace it")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the data set is not
    try:
        for index in range(n_patients):
            patient_id = f"patient{index + 1:03d}"
            _write_patient(staging / patient_id, patient_id, _patient_seed(seed, index), GROUPS[index % len(GROUPS)])
        (staging / "README.txt").write_text(
            "SYNTHETIC DATA - NOT REAL PATIENTS.\n\n"
            "Short-axis cine MRI look-alikes generated by pix2rep "
            f"(pix2rep.data.synthetic.write_synthetic_dataset, n_patients={n_patients}, seed={seed}, "
            f"generator version {GENERATOR_VERSION}).\n"
            "Same layout as the ACDC challenge data (patientXXX/Info.cfg, patientXXX_frameNN.nii.gz, "
            "patientXXX_frameNN_gt.nii.gz; labels 0 background, 1 RV, 2 MYO, 3 LV), so that pix2rep "
            "runs end to end without downloading anything.\n"
            "Use it for tests, demos and tutorials only: results on it say nothing about real data.\n"
        )
        (staging / MARKER_FILE).write_text(json.dumps(params, indent=1) + "\n")  # written last: complete
        if _read_marker(out_dir) == params and not overwrite:  # another process finished it meanwhile
            return out_dir
        if out_dir.exists():
            shutil.rmtree(out_dir)  # empty, or a synthetic data set (checked above)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def is_synthetic_dataset(path) -> bool:
    """True when ``path`` is a data set written by :func:`write_synthetic_dataset` (its marker file)."""
    return (Path(path) / MARKER_FILE).is_file()


def default_synthetic_dataset() -> Path:
    """The embedded default data set (25 patients, seed 0), kept in the pix2rep cache."""
    from .dataset import default_cache_dir

    return write_synthetic_dataset(default_cache_dir() / "synthetic-25-seed0", n_patients=25, seed=0)


def write_demo_datasets() -> tuple[Path, Path]:
    """``(pool, evaluation)`` of ``pix2rep demo``: 20 synthetic patients to train on and 8 others
    (another seed) to evaluate on, kept in the pix2rep cache."""
    from .dataset import default_cache_dir

    root = default_cache_dir() / "demo"
    return (write_synthetic_dataset(root / "synthetic-pool-20-seed0", n_patients=20, seed=0),
            write_synthetic_dataset(root / "synthetic-eval-8-seed1", n_patients=8, seed=1))
