import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pix2rep.data.preprocess import (
    PreprocessConfig,
    box_contains_mask,
    class_argmax,
    crop_with_padding,
    gt_box,
    label_free_box,
    labels_to_canonical,
    locate_heart,
    normalise_intensity,
    prepare_volume,
    probabilities_to_canonical,
    resize_labels,
    resize_probabilities,
)
from pix2rep.data.volume import Volume
from pix2rep.errors import DataError

from conftest import ACDC_TRAINING, needs_acdc


def test_normalise_clips_percentiles_to_unit_range():
    x = np.arange(101, dtype=np.float32).reshape(1, 1, 101)
    y = normalise_intensity(x)
    assert y.min() == 0 and y.max() == 1
    assert y[0, 0, 50] == pytest.approx((50 - 1) / 98)  # 1st percentile 1, 99th 99


@pytest.mark.parametrize("bad,message", [(np.full((2, 4, 4), 7.0), "constant"), (np.array([[[np.nan, 1.0]]]), "NaN")])
def test_normalise_refuses_useless_images(bad, message):
    with pytest.raises(DataError, match=message):
        normalise_intensity(bad, source="scan.nii.gz")


def test_crop_with_padding_outside_the_image():
    stack = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    out = crop_with_padding(stack, (-1, 2, 2, 5))
    assert out.shape == (1, 3, 3)
    assert out[0].tolist() == [[0, 0, 0], [2, 3, 0], [6, 7, 0]]


def test_boxes():
    mask = np.zeros((3, 20, 30), np.uint8)
    mask[1, 5:8, 10:14] = 2
    assert gt_box(mask, 2) == (3, 10, 8, 16)
    assert box_contains_mask((5, 8, 10, 14), mask) and not box_contains_mask((6, 8, 10, 14), mask)
    # 100 mm at 2 mm x 1 mm pixels: 50 rows x 100 columns, centred to half a pixel.
    assert label_free_box((50.0, 60.0), (2.0, 1.0), 100.0) == (26, 76, 11, 111)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_class_argmax_takes_the_largest_class_and_the_first_on_a_tie(layout):
    maps = torch.zeros(2, 4, 1, 3)
    maps[0, :, 0, 0] = torch.tensor([0.1, 0.7, 0.1, 0.1])  # class 1
    maps[0, :, 0, 1] = torch.tensor([0.2, 0.1, 0.3, 0.4])  # class 3
    maps[0, :, 0, 2] = torch.tensor([0.1, 0.4, 0.4, 0.1])  # tie of 1 and 2: the first, 1
    maps[1, :, 0, :] = 0.25  # a four-way tie: 0
    labels = class_argmax(maps.contiguous(memory_format=layout))
    assert labels.dtype == np.uint8 and labels.shape == (2, 1, 3)
    np.testing.assert_array_equal(labels, [[[1, 3, 1]], [[0, 0, 0]]])


def test_label_resize_keeps_a_one_pixel_structure():
    labels = np.zeros((1, 64, 64), np.uint8)
    labels[0, 20:44, 31] = 2  # a 1-pixel-thin line
    up = resize_labels(labels, (128, 128))
    assert (up == 2).sum() > 0
    # one-hot linear resizing keeps it centred; nearest-neighbour interpolation would shift it
    cols = np.flatnonzero((up[0] == 2).any(0))
    assert abs(cols.mean() / 2 - 31) < 0.5 + 1e-6


def test_locate_heart_finds_an_off_centre_blob():
    Z, H, W = 6, 160, 160
    yy, xx = np.mgrid[:H, :W]
    blob = np.exp(-(((yy - 100) ** 2 + (xx - 60) ** 2) / (2 * 10.0**2)))
    image = np.repeat(blob[None], Z, 0).astype(np.float32) + 0.02 * np.random.default_rng(0).random((Z, H, W))
    row, col = locate_heart(image, (1.5, 1.5), blob_mm=15.0, prior_mm=40.0)
    assert abs(row - 100) <= 4 and abs(col - 60) <= 4


@pytest.mark.parametrize("protocol", ["gt-crop", "label-free"])
def test_round_trip_of_probabilities_on_a_made_up_volume(protocol):
    rng = np.random.default_rng(0)
    Z, H, W = 5, 150, 170
    yy, xx = np.mgrid[:H, :W]
    r = np.hypot(yy - 70, xx - 90)
    mask = np.where(r < 12, 3, np.where(r < 18, 2, 0)).astype(np.uint8)
    mask = np.repeat(mask[None], Z, 0)
    mask[0] = 0  # an empty slice, dropped by gt-crop
    image = (100 + 200 * (mask == 3) + 20 * rng.random((Z, H, W))).astype(np.float32)
    vol = Volume(image=image, spacing=(10.0, 1.4, 1.4), mask=mask, source="made-up")
    prepared = prepare_volume(vol, PreprocessConfig(protocol=protocol))
    assert prepared.images.shape[1:] == (128, 128)
    assert prepared.images.min() >= 0 and prepared.images.max() <= 1
    assert len(prepared.slice_index) == (4 if protocol == "gt-crop" else 5)
    # soft one-hot maps of the crop, resized to 128 and back: the mask comes back
    crop = crop_with_padding(mask[prepared.slice_index], prepared.box)
    onehot = F.one_hot(torch.from_numpy(crop.astype(np.int64)), 4).permute(0, 3, 1, 2).float()
    back = probabilities_to_canonical(resize_probabilities(onehot, (128, 128)), prepared)
    for label in (2, 3):
        a, b = back == label, mask == label
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.99
    # hard labels too, at the 128 px resolution
    hard = labels_to_canonical(prepared.masks, prepared)
    assert hard.shape == mask.shape and hard[0].max() == (0 if protocol == "gt-crop" else hard[0].max())


def test_gt_crop_needs_labels():
    vol = Volume(image=np.random.default_rng(0).random((2, 32, 32)).astype(np.float32), spacing=(8, 1, 1), source="x.nii.gz")
    with pytest.raises(DataError, match="x.nii.gz: the gt-crop protocol reads the labels"):
        prepare_volume(vol, PreprocessConfig(protocol="gt-crop"))


@pytest.fixture(scope="module")
def acdc_patients():
    from pix2rep.data.discover import load_dataset

    return load_dataset(ACDC_TRAINING).patients


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@needs_acdc
@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["gt-crop", "label-free"])
def test_acdc_round_trip_and_label_free_containment(acdc_patients, protocol):
    """Every ACDC training volume: slices -> native geometry gives the mask back (Dice >= 0.99
    per class) under gt-crop, and under label-free wherever the ROI contains the heart; the
    single-volume label-free ROI contains the whole heart in at least 98 % of the 200 volumes."""
    cfg = PreprocessConfig(protocol=protocol)
    contained, worst = 0, 1.0
    n = 0
    for p in acdc_patients:
        for v in p.volumes.values():
            prepared = prepare_volume(v, cfg)  # single volume: no other phase
            n += 1
            if not box_contains_mask(prepared.box, v.mask):
                continue
            contained += 1
            crop = crop_with_padding(v.mask[prepared.slice_index], prepared.box)
            onehot = F.one_hot(torch.from_numpy(crop.astype(np.int64)), 4).permute(0, 3, 1, 2).float()
            back = probabilities_to_canonical(resize_probabilities(onehot, (cfg.size, cfg.size)), prepared)
            worst = min(worst, *(_dice(back == c, v.mask == c) for c in (1, 2, 3)))
    assert n == 200
    assert worst >= 0.99
    if protocol == "gt-crop":
        assert contained == 200
    else:
        assert contained / n >= 0.98, f"label-free ROI contains the heart in only {contained}/{n} volumes"


def test_extra_cine_frames_become_unlabeled_pretraining_slices():
    from pix2rep.data.dataset import prepare_patients, stack_slices
    from pix2rep.data.volume import Patient

    rng = np.random.default_rng(0)

    def vol(phase, mask=True):
        m = np.zeros((4, 64, 64), np.uint8)
        m[:, 20:40, 20:40] = 3
        return Volume(image=rng.random((4, 64, 64)).astype(np.float32), spacing=(8.0, 1.5, 1.5),
                      mask=m if mask else None, phase=phase)

    patient = Patient("p1", {"ED": vol("ED"), "ES": vol("ES")}, group="NOR", unlabeled=[vol("frame03", False), vol("frame04", False)])
    (prepared,) = prepare_patients([patient], PreprocessConfig())
    assert len(prepared.unlabeled) == 2
    assert len(stack_slices([prepared], labeled=False)) == 8  # ED + ES
    assert len(stack_slices([prepared], labeled=False, include_unlabeled=True)) == 16
    assert len(stack_slices([prepared], labeled=True)) == 8  # masks only where there are labels


def test_the_locator_scales_come_from_the_config_only():
    image = np.random.default_rng(0).random((2, 40, 40)).astype(np.float32)
    with pytest.raises(TypeError, match="blob_mm"):
        locate_heart(image, (1.5, 1.5))  # no second set of defaults beside PreprocessConfig's
    Z, H, W = 4, 160, 160
    yy, xx = np.mgrid[:H, :W]
    # a small bright blob near the centre and a large one off centre: the blob scale picks one
    small = np.exp(-(((yy - 80) ** 2 + (xx - 80) ** 2) / (2 * 3.0**2)))
    large = np.exp(-(((yy - 60) ** 2 + (xx - 110) ** 2) / (2 * 14.0**2)))
    volume = Volume(image=np.repeat((small + large)[None], Z, 0).astype(np.float32) * 500, spacing=(8.0, 1.5, 1.5))
    centres = {}
    for blob in (3.0, 30.0):
        y0, y1, x0, x1 = prepare_volume(volume, PreprocessConfig(locator_blob_mm=blob, locator_prior_mm=200.0)).box
        centres[blob] = ((y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2)
    assert np.allclose(centres[3.0], (80, 80), atol=2) and np.allclose(centres[30.0], (60, 110), atol=3)
