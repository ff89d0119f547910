"""Tests of the synthetic short-axis cine MRI generator and its ACDC-layout writer."""


import nibabel as nib
import numpy as np
import pytest

from pix2rep.data.synthetic import GROUPS, make_synthetic_patient, write_synthetic_dataset
from pix2rep.errors import OutputExistsError

BACKGROUND, RV, MYO, LV = 0, 1, 2, 3
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def patients():
    """A few patients of every group, made once: {(group, seed): patient}."""
    return {(group, seed): make_synthetic_patient(seed, group) for group in GROUPS for seed in SEEDS}


def volume_ml(patient, phase, label):
    voxel_mm3 = float(np.prod(patient["spacing"]))
    return (patient["masks"][phase] == label).sum() * voxel_mm3 / 1000.0


def mean_wall_thickness_mm(patient, phase="ED"):
    """Myocardial thickness of the middle slices, from the areas of the LV and of LV + MYO
    (radius of the equivalent circles)."""
    mask = patient["masks"][phase]
    z = mask.shape[2]
    middle = mask[:, :, z // 2 - 1 : z // 2 + 1]
    pixel_mm2 = patient["spacing"][0] * patient["spacing"][1]
    lv_area = (middle == LV).sum() * pixel_mm2
    heart_area = lv_area + (middle == MYO).sum() * pixel_mm2
    return (np.sqrt(heart_area / np.pi) - np.sqrt(lv_area / np.pi)) / np.sqrt(middle.shape[2])


def ejection_fraction(patient):
    ed, es = volume_ml(patient, "ED", LV), volume_ml(patient, "ES", LV)
    return (ed - es) / ed


def test_same_seed_gives_same_arrays_and_other_seeds_differ():
    first, again = make_synthetic_patient(7, "MINF"), make_synthetic_patient(7, "MINF")
    other = make_synthetic_patient(8, "MINF")
    for phase in ("ED", "ES"):
        np.testing.assert_array_equal(first["images"][phase], again["images"][phase])
        np.testing.assert_array_equal(first["masks"][phase], again["masks"][phase])
        assert first["images"][phase].shape != other["images"][phase].shape or not np.array_equal(
            first["images"][phase], other["images"][phase]
        )
    assert first["spacing"] == again["spacing"]


def test_unknown_group_is_refused():
    with pytest.raises(ValueError, match="unknown group"):
        make_synthetic_patient(0, "XYZ")


def test_shapes_dtypes_spacing_and_intensities(patients):
    for (group, _), patient in patients.items():
        assert patient["group"] == group
        in_plane, _, slice_mm = patient["spacing"]
        assert 1.3 <= in_plane <= 1.8 and 8.0 <= slice_mm <= 10.0
        for phase in ("ED", "ES"):
            image, mask = patient["images"][phase], patient["masks"][phase]
            assert image.dtype == np.float32 and mask.dtype == np.uint8
            assert image.shape == mask.shape
            height, width, n_slices = image.shape
            assert 192 <= height <= 224 and 192 <= width <= 224 and 8 <= n_slices <= 12
            assert set(np.unique(mask)) <= {BACKGROUND, RV, MYO, LV}
            # int16-like magnitudes: non-negative, blood a few hundred, nothing extreme.
            assert image.min() >= 0 and 150 < np.percentile(image[mask == LV], 50) < 600
            assert image.max() < 2000
            # Bright blood, darker myocardium: the bSSFP contrast the models must learn.
            assert np.median(image[mask == LV]) > 1.8 * np.median(image[mask == MYO])


def test_middle_slices_hold_every_label(patients):
    for patient in patients.values():
        for phase in ("ED", "ES"):
            mask = patient["masks"][phase]
            middle = mask[:, :, mask.shape[2] // 2]
            assert set(np.unique(middle)) == {BACKGROUND, RV, MYO, LV}


def test_apex_is_smaller_than_base(patients):
    for patient in patients.values():
        lv_area = (patient["masks"]["ED"] == LV).sum(axis=(0, 1))
        annotated = np.flatnonzero(lv_area)
        assert lv_area[annotated[-1]] < 0.6 * lv_area[annotated].max()


def test_myocardium_surrounds_the_lv(patients):
    """Every LV pixel's 4 in-plane neighbours are LV or MYO: the LV never touches RV or background."""
    for patient in patients.values():
        for phase in ("ED", "ES"):
            mask = patient["masks"][phase]
            allowed = np.pad((mask == LV) | (mask == MYO), ((1, 1), (1, 1), (0, 0)))
            lv = mask == LV
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                neighbour_ok = allowed[1 + dy : 1 + dy + mask.shape[0], 1 + dx : 1 + dx + mask.shape[1]]
                assert neighbour_ok[lv].all()


def test_lv_is_larger_at_ed_than_es_and_wall_thicker_at_es(patients):
    for patient in patients.values():
        assert volume_ml(patient, "ED", LV) > volume_ml(patient, "ES", LV)
        assert volume_ml(patient, "ED", RV) > volume_ml(patient, "ES", RV)
        assert mean_wall_thickness_mm(patient, "ES") > mean_wall_thickness_mm(patient, "ED")


def test_groups_differ_like_acdc_pathologies(patients):
    for seed in SEEDS:
        normal = patients["NOR", seed]
        assert volume_ml(patients["DCM", seed], "ED", LV) > volume_ml(normal, "ED", LV)
        assert mean_wall_thickness_mm(patients["HCM", seed]) > mean_wall_thickness_mm(normal) + 3
        assert volume_ml(patients["RV", seed], "ED", RV) > 1.5 * volume_ml(normal, "ED", RV)
        assert ejection_fraction(patients["DCM", seed]) < ejection_fraction(normal) - 0.15
        assert ejection_fraction(patients["MINF", seed]) < ejection_fraction(normal) - 0.1
    mean_myo = {g: np.mean([volume_ml(patients[g, s], "ED", MYO) for s in SEEDS]) for g in ("NOR", "HCM")}
    assert mean_myo["HCM"] > 1.2 * mean_myo["NOR"]


def test_write_dataset_acdc_layout(tmp_path):
    root = write_synthetic_dataset(tmp_path / "synthetic", n_patients=5, seed=3)
    assert root == tmp_path / "synthetic"
    assert "SYNTHETIC" in (root / "README.txt").read_text()
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == [f"patient{i:03d}" for i in range(1, 6)]

    groups = []
    for name in folders:
        info = dict(line.split(": ") for line in (root / name / "Info.cfg").read_text().splitlines())
        assert set(info) == {"ED", "ES", "Group", "Height", "NbFrame", "Weight"}
        assert info["ED"] == "1" and info["NbFrame"] == "30"
        float(info["Height"]), float(info["Weight"])
        groups.append(info["Group"])
        frames = {"ED": 1, "ES": int(info["ES"])}
        assert 1 < frames["ES"] <= 30
        expected = {"Info.cfg"} | {f"{name}_frame{f:02d}{s}.nii.gz" for f in frames.values() for s in ("", "_gt")}
        assert {p.name for p in (root / name).iterdir()} == expected
        for frame in frames.values():
            image = nib.load(root / name / f"{name}_frame{frame:02d}.nii.gz")
            mask = nib.load(root / name / f"{name}_frame{frame:02d}_gt.nii.gz")
            assert image.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
            image_data, mask_data = np.asanyarray(image.dataobj), np.asanyarray(mask.dataobj)
            assert image_data.dtype == np.int16 and mask_data.dtype == np.uint8
            assert image_data.shape == mask_data.shape and image_data.ndim == 3
            assert 192 <= image_data.shape[0] <= 224 and 8 <= image_data.shape[2] <= 12
            zooms = image.header.get_zooms()
            assert zooms[0] == zooms[1] and 1.3 <= zooms[0] <= 1.8 and 8 <= zooms[2] <= 10
            np.testing.assert_allclose(np.abs(np.diag(image.affine)[:3]), zooms, rtol=1e-5)
            assert set(np.unique(mask_data)) == {BACKGROUND, RV, MYO, LV}
    assert sorted(groups) == sorted(GROUPS)  # 5 patients: one of each group


def test_write_dataset_is_idempotent_and_safe(tmp_path):
    root = write_synthetic_dataset(tmp_path / "synthetic", n_patients=2, seed=0)
    stamp = (root / "patient001" / "patient001_frame01.nii.gz").stat().st_mtime_ns
    assert write_synthetic_dataset(root, n_patients=2, seed=0) == root
    assert (root / "patient001" / "patient001_frame01.nii.gz").stat().st_mtime_ns == stamp

    # Other parameters: the old data set is replaced, not merged.
    write_synthetic_dataset(root, n_patients=1, seed=0)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["patient001"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".synthetic.tmp")]

    # A folder holding something else is never overwritten.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not a pix2rep synthetic data set"):
        write_synthetic_dataset(foreign, n_patients=1)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_write_dataset_never_deletes_a_foreign_folder_even_with_overwrite(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="even with --overwrite") as refused:
        write_synthetic_dataset(foreign, n_patients=1, overwrite=True)
    assert "\n" not in str(refused.value)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_write_dataset_replaces_other_parameters_only_when_allowed(tmp_path):
    root = write_synthetic_dataset(tmp_path / "synthetic", n_patients=2, seed=0)
    # what `pix2rep data synthetic --out` does: another data set there is an overwrite
    with pytest.raises(OutputExistsError, match=r"other parameters \(n_patients 2, seed 0\); pass --overwrite"):
        write_synthetic_dataset(root, n_patients=1, seed=4, replace_other_synthetic=False)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["patient001", "patient002"]
    # the same parameters are still reused as they are
    stamp = (root / "patient001" / "patient001_frame01.nii.gz").stat().st_mtime_ns
    assert write_synthetic_dataset(root, n_patients=2, seed=0, replace_other_synthetic=False) == root
    assert (root / "patient001" / "patient001_frame01.nii.gz").stat().st_mtime_ns == stamp
    # --overwrite replaces it
    write_synthetic_dataset(root, n_patients=1, seed=4, overwrite=True, replace_other_synthetic=False)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["patient001"]


def test_write_dataset_with_overwrite_writes_the_same_parameters_again(tmp_path):
    root = write_synthetic_dataset(tmp_path / "synthetic", n_patients=1, seed=0)
    (root / "patient001" / "patient001_frame01.nii.gz").unlink()  # a damaged copy
    write_synthetic_dataset(root, n_patients=1, seed=0, overwrite=True)
    assert (root / "patient001" / "patient001_frame01.nii.gz").is_file()


def test_is_synthetic_dataset(tmp_path):
    from pix2rep.data.synthetic import is_synthetic_dataset

    assert is_synthetic_dataset(write_synthetic_dataset(tmp_path / "synthetic", n_patients=1))
    assert not is_synthetic_dataset(tmp_path) and not is_synthetic_dataset(tmp_path / "nowhere")
