"""Hand-computed checks of pix2rep.evaluation: Dice, HD95, clinical indices, slice thirds."""

import math
from pathlib import Path

import numpy as np
import pytest

from pix2rep.evaluation.clinical import (
    clinical_indices,
    compare_indices,
    ejection_fraction,
    structure_volume_ml,
)
from pix2rep.evaluation.metrics import (
    CLASS_NAMES,
    count_missing,
    dice_per_class,
    hd95_per_class,
    segmentation_metrics,
)
from pix2rep.evaluation.regions import basal_is_first, dice_by_region, slice_position_thirds

SPACING = (10.0, 1.5, 1.5)  # (dz, dy, dx) in mm, as for ACDC-like (Z, H, W) arrays


def square(z, y0, x0, size=4, shape=(3, 10, 10), label=1):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[z, y0 : y0 + size, x0 : x0 + size] = label
    return mask


def three_class_heart():
    """(6, 12, 12) mask: RV, MYO and LV blocks on slices 1-4."""
    mask = np.zeros((6, 12, 12), dtype=np.uint8)
    mask[1:5, 2:6, 1:4] = 1
    mask[1:5, 2:10, 5:11] = 2
    mask[1:5, 4:8, 7:9] = 3
    return mask


# ---------------------------------------------------------------- Dice


@pytest.mark.parametrize(
    "pred, gt, expected",
    [
        (square(1, 2, 2), square(1, 2, 2), 1.0),  # identical
        (square(1, 2, 3), square(1, 2, 2), 2 * 12 / (16 + 16)),  # 4x4 shifted by 1 column: 0.75
        (square(1, 2, 2, size=2), square(1, 2, 2), 2 * 4 / (4 + 16)),  # 2x2 inside 4x4
        (square(1, 0, 0), square(1, 5, 5), 0.0),  # disjoint
        (np.zeros((3, 10, 10), np.uint8), square(1, 2, 2), 0.0),  # empty prediction
        (square(1, 2, 2), np.zeros((3, 10, 10), np.uint8), 0.0),  # structure not in ground truth
        (np.zeros((3, 10, 10), np.uint8), np.zeros((3, 10, 10), np.uint8), 1.0),  # absent in both
    ],
    ids=["identical", "shift1", "inside", "disjoint", "empty-pred", "empty-gt", "absent-both"],
)
def test_dice_hand_cases(pred, gt, expected):
    assert dice_per_class(pred, gt, labels=(1,))[1] == pytest.approx(expected)


def test_dice_3d_cubes_shifted_along_z():
    gt = np.zeros((8, 8, 8), np.uint8)
    pred = np.zeros_like(gt)
    gt[1:5, 1:5, 1:5] = 3
    pred[2:6, 1:5, 1:5] = 3
    assert dice_per_class(pred, gt) == pytest.approx({1: 1.0, 2: 1.0, 3: 2 * 48 / (64 + 64)})


def test_dice_per_class_multilabel():
    gt = three_class_heart()
    pred = gt.copy()
    pred[pred == 3] = 2  # LV swallowed by the myocardium
    lv = int((gt == 3).sum())
    myo = int((gt == 2).sum())
    assert dice_per_class(pred, gt) == pytest.approx({1: 1.0, 2: 2 * myo / (myo + myo + lv), 3: 0.0})


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 10, 10\).*\(3, 10, 9\)"):
        dice_per_class(np.zeros((3, 10, 9), np.uint8), np.zeros((3, 10, 10), np.uint8))
    with pytest.raises(ValueError, match="expected 3"):
        hd95_per_class(np.zeros((3, 4, 4), np.uint8), np.zeros((3, 4, 4), np.uint8), spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="integer"):
        dice_per_class(np.full((2, 2), 0.5), np.zeros((2, 2)))


# ---------------------------------------------------------------- HD95


def test_hd95_identical_is_zero():
    gt = three_class_heart()
    assert hd95_per_class(gt, gt, SPACING) == {1: 0.0, 2: 0.0, 3: 0.0}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hd95_parallel_planes_offset_along_z(k):
    """Full planes k slices apart: every surface point is k * dz from the other plane."""
    pred = np.zeros((6, 5, 5), np.uint8)
    gt = np.zeros_like(pred)
    pred[1] = 1
    gt[1 + k] = 1
    assert hd95_per_class(pred, gt, SPACING, labels=(1,))[1] == pytest.approx(k * 10.0)


def test_hd95_uses_spacing_per_axis():
    # a single voxel pair 3 slices apart along z: 3 * 10 mm
    pred, gt = np.zeros((5, 5, 5), np.uint8), np.zeros((5, 5, 5), np.uint8)
    pred[0, 2, 2] = gt[3, 2, 2] = 1
    assert hd95_per_class(pred, gt, SPACING, labels=(1,))[1] == pytest.approx(30.0)
    # the same pair 3 voxels apart along W (dx = 2 mm): 6 mm
    pred, gt = np.zeros((5, 5, 5), np.uint8), np.zeros((5, 5, 5), np.uint8)
    pred[2, 2, 0] = gt[2, 2, 3] = 1
    assert hd95_per_class(pred, gt, (10.0, 1.5, 2.0), labels=(1,))[1] == pytest.approx(6.0)


def test_hd95_square_shifted_in_plane():
    """4x4 square shifted by one column: 4 of the 16 surface voxels each way are 1 dx away.

    Sorted distances [0]*12 + [1.5]*4; the 95th percentile (index 0.95 * 15 = 14.25) is 1.5.
    """
    assert hd95_per_class(square(1, 2, 3), square(1, 2, 2), SPACING, labels=(1,))[1] == pytest.approx(1.5)


def test_hd95_matches_independent_scipy_computation():
    """Surfaces = mask XOR face-connected erosion, distances by anisotropic EDT, 95th percentiles."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    gt = ndimage.binary_dilation(rng.random((6, 16, 16)) > 0.97, iterations=2).astype(np.uint8)
    pred = np.roll(gt, (1, 2, -1), axis=(0, 1, 2))
    pred[rng.random(pred.shape) < 0.05] = 0
    spacing = (8.0, 1.25, 1.5)

    def surface(m):
        return m & ~ndimage.binary_erosion(m)

    p, g = pred == 1, gt == 1
    to_gt = ndimage.distance_transform_edt(~surface(g), sampling=spacing)[surface(p)]
    to_pred = ndimage.distance_transform_edt(~surface(p), sampling=spacing)[surface(g)]
    expected = max(np.percentile(to_gt, 95), np.percentile(to_pred, 95))
    assert hd95_per_class(pred, gt, spacing, labels=(1,))[1] == pytest.approx(expected, rel=1e-5)


def test_hd95_empty_is_nan_and_counted_missing():
    gt = three_class_heart()
    pred = gt.copy()
    pred[pred == 1] = 0  # no RV predicted
    hd = hd95_per_class(pred, gt, SPACING)
    assert math.isnan(hd[1]) and hd[2] == 0.0 and hd[3] == 0.0
    assert count_missing(hd) == 1
    assert count_missing([1.0, float("nan"), 2.0, float("nan")]) == 2
    assert dice_per_class(pred, gt)[1] == 0.0
    # empty ground truth with a prediction is missing too
    assert math.isnan(hd95_per_class(gt, pred, SPACING)[1])


def test_segmentation_metrics_row():
    gt = three_class_heart()
    row = segmentation_metrics(gt, gt, SPACING)
    assert row == {
        "dice_RV": 1.0, "dice_MYO": 1.0, "dice_LV": 1.0, "dice_mean": 1.0,
        "hd95_RV": 0.0, "hd95_MYO": 0.0, "hd95_LV": 0.0, "hd95_missing": 0,
    }
    assert CLASS_NAMES == {1: "RV", 2: "MYO", 3: "LV"}
    pred = gt.copy()
    pred[pred == 1] = 0
    row = segmentation_metrics(pred, gt, SPACING)
    assert row["dice_RV"] == 0.0 and row["dice_mean"] == pytest.approx(2 / 3)
    assert math.isnan(row["hd95_RV"]) and row["hd95_missing"] == 1


# ---------------------------------------------------------------- clinical indices


def test_structure_volume_ml_block():
    mask = np.zeros((6, 20, 20), np.uint8)
    mask[1:5, 5:15, 5:15] = 3  # 10 x 10 in plane x 4 slices
    assert structure_volume_ml(mask, 3, SPACING) == pytest.approx(10 * 10 * 4 * 22.5 / 1000)  # 9 ml
    assert structure_volume_ml(mask, 1, SPACING) == 0.0


def test_clinical_indices_hand_computed():
    ed = np.zeros((4, 20, 20), np.uint8)
    ed[:, 0:10, 0:10] = 3  # LV 400 voxels x 22.5 mm3 = 9.0 ml
    ed[:, 10:15, 0:10] = 1  # RV 200 voxels = 4.5 ml
    ed[:, 15:20, 0:5] = 2  # MYO 100 voxels = 2.25 ml -> 2.3625 g
    es = np.zeros((8, 20, 20), np.uint8)
    es_spacing = (5.0, 1.5, 1.5)  # 11.25 mm3 per voxel: each phase uses its own spacing
    es[:, 0:8, 0:5] = 3  # LV 320 voxels = 3.6 ml
    es[:, 10:15, 0:5] = 1  # RV 200 voxels = 2.25 ml
    out = clinical_indices(ed, es, SPACING, es_spacing)
    assert out == pytest.approx({
        "LV_EDV": 9.0, "LV_ESV": 3.6, "LV_EF": (9.0 - 3.6) / 9.0 * 100,  # 60 %
        "RV_EDV": 4.5, "RV_ESV": 2.25, "RV_EF": 50.0,
        "MYO_mass": 2.25 * 1.05,
    })
    assert math.isnan(ejection_fraction(0.0, 0.0))


def test_ground_truth_against_itself_gives_zero_errors():
    rows = []
    for n in (3, 4, 5):
        ed = np.zeros((4, 12, 12), np.uint8)
        ed[:, :n, :n] = 3
        ed[:, 10:, : n + 1] = 1
        ed[:, 8:10, :n] = 2
        es = np.zeros_like(ed)
        es[:, : n - 1, : n - 1] = 3
        es[:, 10:, :n] = 1
        rows.append(clinical_indices(ed, es, SPACING, SPACING))
    stats = compare_indices(rows, rows)
    for key in ("LV_EDV", "LV_EF", "RV_ESV", "MYO_mass"):
        assert stats[key]["mae"] == 0.0 and stats[key]["bias"] == 0.0
        assert stats[key]["pearson_r"] == pytest.approx(1.0) and stats[key]["n"] == 3


def test_compare_indices_hand_numbers():
    pred = [{"LV_EF": v} for v in (1.0, 2.0, 3.0, 5.0)]
    gt = [{"LV_EF": v} for v in (1.0, 3.0, 2.0, 4.0)]
    s = compare_indices(pred, gt, indices=("LV_EF",))["LV_EF"]
    # differences 0, -1, 1, 1
    assert s["mae"] == pytest.approx(0.75) and s["bias"] == pytest.approx(0.25)
    # deviations x: -1.75 -0.75 0.25 2.25, y: -1.5 0.5 -0.5 1.5 -> sxy 5.5, sxx 8.75, syy 5
    assert s["pearson_r"] == pytest.approx(5.5 / math.sqrt(8.75 * 5.0))
    assert s["n"] == 4 and s["n_missing"] == 0


def test_compare_indices_nan_cases():
    two = compare_indices([{"a": 1.0}, {"a": 2.0}], [{"a": 1.5}, {"a": 2.5}], indices=("a",))["a"]
    assert math.isnan(two["pearson_r"]) and two["bias"] == pytest.approx(-0.5)
    const = compare_indices([{"a": 1.0}] * 3, [{"a": 1.0}, {"a": 2.0}, {"a": 3.0}], indices=("a",))["a"]
    assert math.isnan(const["pearson_r"])
    with_nan = compare_indices([{"a": float("nan")}, {"a": 1.0}], [{"a": 1.0}, {"a": 2.0}], indices=("a",))["a"]
    assert with_nan["n"] == 1 and with_nan["n_missing"] == 1 and with_nan["mae"] == 1.0
    with pytest.raises(ValueError, match="expected 2, got 1"):
        compare_indices([{"a": 1.0}], [{"a": 1.0}, {"a": 2.0}], indices=("a",))


# ---------------------------------------------------------------- slice position


def tapering_stack(widths, shape=(24, 24)):
    """One slice per width: LV square of that width inside an RV strip; 0 = no heart."""
    mask = np.zeros((len(widths),) + shape, np.uint8)
    for z, w in enumerate(widths):
        mask[z, :w, :w] = 3
        mask[z, w : w + 2, :w] = 1
    return mask


def test_slice_thirds_base_first():
    gt = tapering_stack([0, 12, 11, 9, 7, 5, 3, 0])  # base at low z
    assert basal_is_first(gt)
    assert list(slice_position_thirds(gt)) == [
        "none", "basal", "basal", "mid", "mid", "apical", "apical", "none",
    ]


def test_slice_thirds_base_last_does_not_depend_on_storage_order():
    gt = tapering_stack([0, 12, 11, 9, 7, 5, 3, 0])
    flipped = gt[::-1]
    assert not basal_is_first(flipped)
    assert list(slice_position_thirds(flipped)) == list(slice_position_thirds(gt))[::-1]


def test_slice_thirds_uneven_split_gives_extra_to_base():
    gt = tapering_stack([20, 19, 18, 16, 14, 12, 10, 8, 6, 4])
    assert list(slice_position_thirds(gt)) == ["basal"] * 4 + ["mid"] * 3 + ["apical"] * 3
    assert list(slice_position_thirds(gt[::-1])) == ["apical"] * 3 + ["mid"] * 3 + ["basal"] * 4
    assert list(slice_position_thirds(np.zeros((3, 4, 4), np.uint8))) == ["none"] * 3


def test_dice_by_region():
    gt = tapering_stack([0, 12, 11, 9, 7, 5, 3, 0])
    regions = slice_position_thirds(gt)
    pred = gt.copy()
    pred[5:7] = 0  # apical slices missed
    out = dice_by_region(pred, gt, regions)
    assert out["basal"] == {1: 1.0, 2: 1.0, 3: 1.0}  # MYO absent in both -> 1
    assert out["mid"] == {1: 1.0, 2: 1.0, 3: 1.0}
    assert out["apical"] == {1: 0.0, 2: 1.0, 3: 0.0}
    short = dice_by_region(gt[:2], gt[:2], slice_position_thirds(gt[:2]))  # one heart slice
    assert short["basal"][3] == 1.0 and math.isnan(short["apical"][3])
    with pytest.raises(ValueError, match=r"expected shape \(8,\), got \(7,\)"):
        dice_by_region(pred, gt, regions[:7])


ACDC_PATIENT001 = [
    folder / "shared/data/acdc/training/patient001/patient001_frame01_gt.nii.gz"
    for folder in Path(__file__).resolve().parents[1:3]  # the repository root and the folder above it
]


@pytest.mark.acdc
@pytest.mark.skipif(not any(p.exists() for p in ACDC_PATIENT001), reason="ACDC patient001 not available")
def test_acdc_patient001_base_is_first_slice():
    nib = pytest.importorskip("nibabel")
    path = next(p for p in ACDC_PATIENT001 if p.exists())
    gt = np.asarray(nib.load(str(path)).dataobj).astype(np.uint8).transpose(2, 0, 1)
    regions = slice_position_thirds(gt)
    assert list(regions) == ["none"] + ["basal"] * 3 + ["mid"] * 3 + ["apical"] * 3
    assert list(slice_position_thirds(gt[::-1])) == list(regions)[::-1]


def test_keep_largest_component_per_class():
    from pix2rep.inference import keep_largest_component

    labels = np.zeros((3, 10, 10), np.uint8)
    labels[:, 1:4, 1:4] = 3  # 27 voxels: kept
    labels[1, 7, 7] = 3  # a stray voxel of the same class: removed
    labels[1, 8:10, 0:2] = 2  # the only MYO component: kept
    out = keep_largest_component(labels)
    assert (out == 3).sum() == 27 and out[1, 7, 7] == 0 and (out == 2).sum() == 4


def test_class_names_come_from_the_one_label_table():
    from pix2rep.data.nifti import MASK_LABELS
    from pix2rep.data.volume import CLASS_NAMES as STRUCTURES, LABELS

    assert LABELS == {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
    assert STRUCTURES == ("RV", "MYO", "LV") == tuple(CLASS_NAMES.values())
    assert MASK_LABELS == (0, 1, 2, 3)
