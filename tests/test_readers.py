"""NIfTI, ACDC-layout, nnU-Net, folder and discovery readers, on small files written in tmp_path."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest

from pix2rep.data.acdc import parse_info_cfg, read_acdc_patient
from pix2rep.data.check import describe_dataset, write_preview
from pix2rep.data.discover import load_dataset
from pix2rep.data.folders import read_nifti_folder, read_nnunet_folder
from pix2rep.data.nifti import read_nifti_4d, read_nifti_volume
from pix2rep.errors import DataError

SPACING = (1.5, 1.25, 8.0)  # file axes (X, Y, Z)
SHAPE = (12, 10, 5)


def make_image(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=shape).astype(np.int16)


def make_mask(shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[3:6, 2:5, 1:4] = 1
    mask[6:9, 2:5, 1:4] = 2
    mask[7:8, 3:4, 2:3] = 3
    return mask


def save(path, array, affine=None):
    affine = np.diag(SPACING + (1.0,)) if affine is None else affine
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


# --- NIfTI volumes ---------------------------------------------------------------------------


def test_read_volume_canonical_shape_spacing_and_dtypes(tmp_path):
    image, mask = make_image(), make_mask()
    vol = read_nifti_volume(save(tmp_path / "a.nii.gz", image), save(tmp_path / "a_gt.nii.gz", mask), phase="ED")
    # The slice axis (largest spacing, file axis 2) comes first; X then Y in plane.
    assert vol.image.shape == (5, 12, 10)
    assert vol.spacing == pytest.approx((8.0, 1.5, 1.25))
    assert vol.image.dtype == np.float32 and vol.mask.dtype == np.uint8
    assert vol.image.flags["C_CONTIGUOUS"] and vol.mask.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(vol.image, image.transpose(2, 0, 1))
    np.testing.assert_array_equal(vol.mask, mask.transpose(2, 0, 1))
    assert vol.phase == "ED" and vol.source.endswith("a.nii.gz")
    np.testing.assert_allclose(vol.affine, np.diag(SPACING + (1.0,)))
    assert sorted(np.unique(vol.mask).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_image_and_mask_dtypes_are_normalised(tmp_path, dtype):
    image = make_image().astype(dtype) % 200
    mask = make_mask().astype(np.float32 if dtype == np.uint8 else dtype)
    vol = read_nifti_volume(save(tmp_path / "a.nii", image), save(tmp_path / "m.nii", mask))
    assert vol.image.dtype == np.float32 and vol.mask.dtype == np.uint8
    np.testing.assert_array_equal(vol.image, image.transpose(2, 0, 1).astype(np.float32))
    np.testing.assert_array_equal(vol.mask, make_mask().transpose(2, 0, 1))


def test_scaled_data_is_applied(tmp_path):
    img = nib.Nifti1Image(make_image(), np.diag(SPACING + (1.0,)))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    vol = read_nifti_volume(tmp_path / "s.nii.gz")
    np.testing.assert_allclose(vol.image, make_image().transpose(2, 0, 1) * 0.5 + 10.0)


def _reoriented_copies(image):
    """The same physical volume stored with permuted and flipped voxel axes, with matching affines."""
    base = np.diag(SPACING + (1.0,))
    base[:3, 3] = (-7.0, 3.0, 20.0)
    copies = [(image, base)]
    # Permute file axes: new axis k is old axis perm[k].
    for perm in [(2, 0, 1), (1, 0, 2), (2, 1, 0)]:
        affine = base.copy()
        affine[:3, :3] = base[:3, list(perm)]
        copies.append((np.transpose(image, perm), affine))
    # Flip file axes: voxel i along a flipped axis is old voxel n-1-i.
    for axes in [(0,), (1, 2), (0, 1, 2)]:
        flipped, affine = image, base.copy()
        for a in axes:
            flipped = np.flip(flipped, axis=a)
            affine[:3, 3] += affine[:3, a] * (image.shape[a] - 1)
            affine[:3, a] *= -1
        copies.append((np.ascontiguousarray(flipped), affine))
    return copies


def test_permuted_and_flipped_files_give_the_same_canonical_volume(tmp_path):
    image, mask = make_image(), make_mask()
    reference = None
    for k, ((img_arr, affine), (mask_arr, _)) in enumerate(zip(_reoriented_copies(image), _reoriented_copies(mask))):
        image_file = save(tmp_path / f"i{k}.nii.gz", img_arr, affine)
        vol = read_nifti_volume(image_file, save(tmp_path / f"m{k}.nii.gz", mask_arr, affine))
        if reference is None:
            reference = vol
        np.testing.assert_array_equal(vol.image, reference.image)
        np.testing.assert_array_equal(vol.mask, reference.mask)
        assert vol.spacing == pytest.approx(reference.spacing)
        # Back on the file's own grid.
        np.testing.assert_array_equal(vol.to_native(vol.image), img_arr.astype(np.float32))
        np.testing.assert_array_equal(vol.to_native(vol.mask), mask_arr)
        np.testing.assert_allclose(vol.affine, affine)


def test_spacing_comes_from_pixdim_when_sform_is_unit_scaled(tmp_path):
    """ACDC stores directions only in the sform (unit columns) and the voxel size in pixdim."""
    img = nib.Nifti1Image(make_image((20, 16, 6)), None)
    img.header.set_zooms((1.5625, 1.5625, 10.0))
    img.header.set_sform(np.diag([-1.0, -1.0, 1.0, 1.0]), code=2)
    img.header.set_qform(None, code=0)
    nib.save(img, str(tmp_path / "acdc_like.nii.gz"))
    vol = read_nifti_volume(tmp_path / "acdc_like.nii.gz")
    assert vol.image.shape == (6, 20, 16)
    assert vol.spacing == pytest.approx((10.0, 1.5625, 1.5625))


def test_4d_with_singleton_time_axis_is_squeezed(tmp_path):
    image = make_image()
    vol = read_nifti_volume(save(tmp_path / "a.nii.gz", image[..., None]))
    assert vol.image.shape == (5, 12, 10)


def test_read_nifti_4d_gives_one_volume_per_frame(tmp_path):
    cine = np.stack([make_image(seed=t) for t in range(3)], axis=-1)
    frames = read_nifti_4d(save(tmp_path / "p_4d.nii.gz", cine))
    assert [f.phase for f in frames] == ["frame01", "frame02", "frame03"]
    for t, frame in enumerate(frames):
        assert frame.mask is None and frame.spacing == pytest.approx((8.0, 1.5, 1.25))
        np.testing.assert_array_equal(frame.image, cine[..., t].transpose(2, 0, 1))


def _bad_input(tmp_path, case):
    """Write one broken input; return (image path, mask path or None, name expected in the message)."""
    good = save(tmp_path / "good.nii.gz", make_image())
    if case == "missing":
        return tmp_path / "nowhere.nii.gz", None, "nowhere.nii.gz"
    if case in ("truncated_gz", "truncated_nii", "header_only"):
        src = good if case != "truncated_nii" else save(tmp_path / "good.nii", make_image())
        data = src.read_bytes()
        name = {"truncated_gz": "cut.nii.gz", "truncated_nii": "cut.nii", "header_only": "head.nii.gz"}[case]
        (tmp_path / name).write_bytes(data[:100] if case == "header_only" else data[: len(data) // 2])
        return tmp_path / name, None, name
    if case == "garbage":
        (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti file" * 100)
        return tmp_path / "junk.nii.gz", None, "junk.nii.gz"
    if case == "4d":
        return save(tmp_path / "cine.nii.gz", np.stack([make_image()] * 3, axis=-1)), None, "cine.nii.gz"
    if case == "2d":
        return save(tmp_path / "flat.nii.gz", make_image()[..., 0]), None, "flat.nii.gz"
    if case in ("nan", "inf"):
        image = make_image().astype(np.float32)
        image[1, 2, 3] = np.nan if case == "nan" else np.inf
        return save(tmp_path / f"{case}.nii.gz", image), None, f"{case}.nii.gz"
    if case == "constant":
        return save(tmp_path / "const.nii.gz", np.full(SHAPE, 7, np.int16)), None, "const.nii.gz"
    if case == "mask_shape":
        return good, save(tmp_path / "small_gt.nii.gz", make_mask()[:-1]), "small_gt.nii.gz"
    if case == "mask_value":
        mask = make_mask()
        mask[0, 0, 0] = 5
        return good, save(tmp_path / "five_gt.nii.gz", mask), "five_gt.nii.gz"
    if case == "mask_negative":
        return good, save(tmp_path / "neg_gt.nii.gz", make_mask().astype(np.int16) - 1), "neg_gt.nii.gz"
    if case == "mask_fraction":
        mask = make_mask().astype(np.float32)
        mask[0, 0, 0] = 1.5
        return good, save(tmp_path / "frac_gt.nii.gz", mask), "frac_gt.nii.gz"
    if case == "mask_missing":
        return good, tmp_path / "absent_gt.nii.gz", "absent_gt.nii.gz"
    raise AssertionError(case)


BAD_CASES = {
    "missing": "does not exist",
    "truncated_gz": "truncated or corrupt",
    "truncated_nii": "truncated or corrupt",
    "header_only": "truncated or corrupt",
    "garbage": "truncated or corrupt",
    "4d": "is 4D",
    "2d": "is 2D",
    "nan": "NaN/Inf",
    "inf": "NaN/Inf",
    "constant": "constant",
    "mask_shape": "differs from image shape",
    "mask_value": "outside {0, 1, 2, 3}: 5",
    "mask_negative": "outside {0, 1, 2, 3}: -1",
    "mask_fraction": "non-integer values (e.g. 1.5)",
    "mask_missing": "does not exist",
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_inputs_raise_one_line_data_error_naming_the_file(tmp_path, case):
    image, mask, name = _bad_input(tmp_path, case)
    with pytest.raises(DataError) as info:
        read_nifti_volume(image, mask)
    message = str(info.value)
    assert name in message and BAD_CASES[case] in message
    assert "\n" not in message


def test_read_nifti_4d_rejects_3d_and_broken_frames(tmp_path):
    with pytest.raises(DataError, match="is 3D"):
        read_nifti_4d(save(tmp_path / "vol.nii.gz", make_image()))
    cine = np.stack([make_image(), np.zeros(SHAPE, np.int16)], axis=-1)
    with pytest.raises(DataError, match=r"c_4d.nii.gz: frame02: image is constant"):
        read_nifti_4d(save(tmp_path / "c_4d.nii.gz", cine))


# --- ACDC layout -----------------------------------------------------------------------------

INFO = "ED: 2\nES: 4\nGroup: MINF\nHeight: 172.5\nNbFrame: 5\nWeight: 80.0\n"


def make_acdc_patient(root, pid="patient007", info=INFO, with_gt=True, with_4d=False):
    folder = root / pid
    folder.mkdir(parents=True)
    (folder / "Info.cfg").write_text(info)
    for frame, seed in ((2, 1), (4, 2)):
        save(folder / f"{pid}_frame{frame:02d}.nii.gz", make_image(seed=seed))
        if with_gt:
            save(folder / f"{pid}_frame{frame:02d}_gt.nii.gz", make_mask())
    if with_4d:
        save(folder / f"{pid}_4d.nii.gz", np.stack([make_image(seed=10 + t) for t in range(5)], axis=-1))
    return folder


def test_parse_info_cfg(tmp_path):
    (tmp_path / "Info.cfg").write_text(INFO)
    info = parse_info_cfg(tmp_path / "Info.cfg")
    assert info == {"ED": 2, "ES": 4, "Group": "MINF", "Height": 172.5, "NbFrame": 5, "Weight": 80.0}
    assert isinstance(info["ED"], int) and isinstance(info["Height"], float)


@pytest.mark.parametrize(
    "text, problem",
    [
        (None, "does not exist"),
        ("ED: 1\nES 2\n", "line 2 is not 'Key: value'"),
        ("ED: 1\nES: 2\nNbFrame: 5\nHeight: 170\n", "missing key(s): Weight"),
        (INFO.replace("Weight: 80.0", "Weight: heavy"), "Weight is not a number: 'heavy'"),
        (INFO.replace("ED: 2", "ED: 2.5"), "ED is not a whole number"),
        (INFO.replace("ES: 4", "ES: 9"), "ES frame 9 is outside 1..NbFrame=5"),
    ],
)
def test_parse_info_cfg_errors_name_the_file(tmp_path, text, problem):
    path = tmp_path / "Info.cfg"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError) as info:
        parse_info_cfg(path)
    assert str(info.value).startswith(str(path)) and problem in str(info.value)


def test_read_acdc_patient(tmp_path):
    patient = read_acdc_patient(make_acdc_patient(tmp_path))
    assert patient.id == "patient007" and patient.group == "MINF"
    assert patient.info == {"ED": 2, "ES": 4, "Height": 172.5, "NbFrame": 5, "Weight": 80.0}
    assert list(patient.volumes) == ["ED", "ES"] and patient.labeled and patient.unlabeled == []
    assert patient.volumes["ED"].source.endswith("patient007_frame02.nii.gz")
    assert patient.volumes["ES"].source.endswith("patient007_frame04.nii.gz")
    assert [v.phase for v in patient.volumes.values()] == ["ED", "ES"]
    np.testing.assert_array_equal(patient.volumes["ES"].image, make_image(seed=2).transpose(2, 0, 1))


def test_read_acdc_patient_without_gt_and_with_4d(tmp_path):
    folder = make_acdc_patient(tmp_path, with_gt=False, with_4d=True)
    assert read_acdc_patient(folder).unlabeled == []
    patient = read_acdc_patient(folder, include_4d=True)
    assert not patient.labeled and all(v.mask is None for v in patient.volumes.values())
    # 5 frames, ED (2) and ES (4) left out.
    assert [v.phase for v in patient.unlabeled] == ["frame01", "frame03", "frame05"]
    np.testing.assert_array_equal(patient.unlabeled[1].image, make_image(seed=12).transpose(2, 0, 1))


def test_read_acdc_patient_missing_frame(tmp_path):
    folder = make_acdc_patient(tmp_path)
    (folder / "patient007_frame04.nii.gz").unlink()
    with pytest.raises(DataError, match=r"patient007_frame04.nii.gz: does not exist \(Info.cfg gives ES as frame 04\)"):
        read_acdc_patient(folder)


# --- nnU-Net and plain folders ---------------------------------------------------------------


def make_nnunet(root, train=("c1", "c2"), test=("t1",)):
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    for k, case in enumerate(train):
        save(root / "imagesTr" / f"{case}_0000.nii.gz", make_image(seed=k))
        save(root / "labelsTr" / f"{case}.nii.gz", make_mask())
    for case in test:
        save(root / "imagesTs" / f"{case}_0000.nii.gz", make_image(seed=9))
    return root


def test_nnunet_folder(tmp_path):
    patients = read_nnunet_folder(make_nnunet(tmp_path))
    assert [p.id for p in patients] == ["c1", "c2", "t1"]
    assert [p.labeled for p in patients] == [True, True, False]
    assert all(list(p.volumes) == ["image"] and p.group is None for p in patients)
    np.testing.assert_array_equal(patients[1].volumes["image"].image, make_image(seed=1).transpose(2, 0, 1))


def test_nnunet_label_without_image_and_extra_channels(tmp_path):
    make_nnunet(tmp_path)
    save(tmp_path / "imagesTr" / "c1_0001.nii.gz", make_image())
    with pytest.warns(UserWarning, match="c1_0001.nii.gz"):
        assert len(read_nnunet_folder(tmp_path)) == 3
    save(tmp_path / "labelsTr" / "orphan.nii.gz", make_mask())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"orphan.nii.gz: label has no image imagesTr/orphan_0000.nii.gz"):
            read_nnunet_folder(tmp_path)


def test_nifti_folder(tmp_path):
    save(tmp_path / "b_scan.nii", make_image(seed=1))
    save(tmp_path / "a_scan.nii.gz", make_image(seed=0))
    (tmp_path / "notes.txt").write_text("ignored")
    patients = read_nifti_folder(tmp_path)
    assert [p.id for p in patients] == ["a_scan", "b_scan"]
    assert all(p.volumes["image"].mask is None for p in patients)


# --- discovery and report --------------------------------------------------------------------


def test_load_dataset_detects_layouts(tmp_path):
    acdc = tmp_path / "acdc"
    make_acdc_patient(acdc / "training", "patient001")
    make_acdc_patient(acdc / "testing", "patient101", with_gt=False)
    ds = load_dataset(acdc)
    assert ds.layout == "acdc" and [p.id for p in ds.patients] == ["patient001", "patient101"]
    assert load_dataset(acdc / "training").layout == "acdc"
    assert load_dataset(acdc / "training" / "patient001").layout == "acdc"

    nn = load_dataset(make_nnunet(tmp_path / "nn"))
    assert nn.layout == "nnunet" and len(nn.patients) == 3

    folder = tmp_path / "plain"
    folder.mkdir()
    save(folder / "x.nii.gz", make_image())
    assert load_dataset(folder).layout == "nifti-folder"
    single = load_dataset(folder / "x.nii.gz")
    assert single.layout == "nifti-file" and single.patients[0].id == "x"


@pytest.mark.parametrize(
    "setup, problem",
    [
        ("missing", "does not exist"),
        ("empty", "is an empty folder; expected ACDC"),
        ("junk", "holds nothing recognisable"),
        ("textfile", "is a file but not a .nii/.nii.gz image"),
    ],
)
def test_load_dataset_unrecognisable(tmp_path, setup, problem):
    path = tmp_path / "data"
    if setup == "empty":
        path.mkdir()
    elif setup == "junk":
        path.mkdir()
        (path / "readme.txt").write_text("hello")
    elif setup == "textfile":
        path.write_text("hello")
    with pytest.raises(DataError, match=problem):
        load_dataset(path)


def test_load_dataset_skip_collects_problems(tmp_path):
    make_acdc_patient(tmp_path, "patient001")
    make_acdc_patient(tmp_path, "patient002", info="ED: 2\nES: four\n")
    with pytest.raises(DataError, match="patient002"):
        load_dataset(tmp_path)
    with pytest.warns(UserWarning, match="1 of 2 patients skipped"):
        ds = load_dataset(tmp_path, on_error="skip")
    assert [p.id for p in ds.patients] == ["patient001"]
    assert len(ds.problems) == 1 and "patient002/Info.cfg" in ds.problems[0]
    report = describe_dataset(ds)
    assert "problems:  1" in report and ds.problems[0] in report
    with pytest.raises(ValueError):
        load_dataset(tmp_path, on_error="ignore")


def test_describe_dataset_and_preview(tmp_path):
    make_acdc_patient(tmp_path / "d", "patient001")
    make_acdc_patient(tmp_path / "d", "patient002", info=INFO.replace("MINF", "NOR"))
    ds = load_dataset(tmp_path / "d")
    report = describe_dataset(ds)
    for expected in [
        "layout:    acdc",
        "patients:  2",
        "groups:    MINF 1, NOR 1",
        "phases:    ED 2, ES 2",
        "volumes:   4 (4 labeled)",
        "shape:     Z 5 x H 12 x W 10",
        "spacing:   Z 8.00 x H 1.50 x W 1.25 mm",
        "labels:    0, 1, 2, 3",
        "problems:  0",
    ]:
        assert expected in report, report
    png = write_preview(ds, tmp_path / "out" / "preview.png", n_slices=3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
