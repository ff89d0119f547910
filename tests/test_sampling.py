from collections import Counter
from dataclasses import dataclass

import pytest

from pix2rep.data.sampling import (
    ACDC_DEV_EVAL_IDS,
    choose_patients,
    has_development_ids,
    resolve_split,
    resolve_split_name,
    sample_few_shot_patients,
    split_development,
)
from pix2rep.errors import ConfigError, DataError

GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")


@dataclass
class FakePatient:
    id: str
    group: str
    labeled: bool = True


def acdc_like():
    return [FakePatient(f"patient{k:03d}", GROUPS[(k - 1) // 20]) for k in range(1, 101)]


def test_dev_split_is_20_patients_4_per_group_and_80_in_the_pool():
    pool, evaluation = split_development(acdc_like())
    assert len(pool) == 80 and len(evaluation) == 20
    assert Counter(p.group for p in evaluation) == {g: 4 for g in GROUPS}
    assert {p.id for p in pool}.isdisjoint(ACDC_DEV_EVAL_IDS)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_small_n_gives_distinct_groups(n):
    pool, _ = split_development(acdc_like())
    for seed in range(5):
        chosen = sample_few_shot_patients(pool, n, seed)
        assert len({p.group for p in chosen}) == n


@pytest.mark.parametrize("n", [5, 10, 20, 80])
def test_multiples_of_five_are_balanced(n):
    pool, _ = split_development(acdc_like())
    chosen = sample_few_shot_patients(pool, n, seed=1)
    assert len({p.id for p in chosen}) == n
    assert Counter(p.group for p in chosen) == {g: n // 5 for g in GROUPS}


def test_nested_and_deterministic():
    pool, _ = split_development(acdc_like())
    for seed in range(3):
        subsets = [[p.id for p in sample_few_shot_patients(pool, n, seed)] for n in (1, 2, 5, 10, 20)]
        for small, large in zip(subsets, subsets[1:]):
            assert set(small) <= set(large)
        shuffled = list(reversed(pool))
        assert [p.id for p in sample_few_shot_patients(shuffled, 20, seed)] == subsets[-1]
    assert sample_few_shot_patients(pool, 5, 0) != sample_few_shot_patients(pool, 5, 1)


def test_patients_without_group_and_bad_n():
    patients = [FakePatient(f"case{k}", None) for k in range(6)]
    assert len(sample_few_shot_patients(patients, 4, 0)) == 4
    with pytest.raises(ValueError, match="between 1 and 6"):
        sample_few_shot_patients(patients, 7, 0)


# -- --patients, --patient-ids and --split -------------------------------------------------------------------------


def test_choose_patients_draws_like_the_few_shot_sampler_among_labeled_patients():
    patients = acdc_like()[:10] + [FakePatient("unlabeled01", "NOR", labeled=False)]
    chosen = choose_patients(patients, n=3, seed=2, where="data")
    assert chosen == sample_few_shot_patients(patients[:10], 3, 2)
    assert "unlabeled01" not in [p.id for p in choose_patients(patients, n=10, where="data")]


def test_choose_patients_by_ids_keeps_their_order_and_counts_a_repeat_once():
    chosen = choose_patients(acdc_like()[:10], ids=" patient007, patient002,patient007 ,", where="data")
    assert [p.id for p in chosen] == ["patient007", "patient002"]
    assert [p.id for p in choose_patients(acdc_like()[:10], ids=["patient003"])] == ["patient003"]


@pytest.mark.parametrize("n,message", [
    (0, "--patients 0: 80 labeled patients in ACDC [dev-pool]; choose 1 to 80"),
    (-2, "--patients -2: 80 labeled patients in ACDC [dev-pool]; choose 1 to 80"),
    (1000, "--patients 1000: only 80 labeled patients in ACDC [dev-pool]; choose 1 to 80"),
])
def test_choose_patients_out_of_range_is_a_one_line_config_error(n, message):
    with pytest.raises(ConfigError) as refused:
        choose_patients(split_development(acdc_like())[0], n=n, where="ACDC [dev-pool]")
    assert str(refused.value) == message


def test_choose_patients_names_unknown_and_unlabeled_ids():
    patients = acdc_like()[:10] + [FakePatient("patient011", "NOR", labeled=False)]
    with pytest.raises(ConfigError) as refused:
        choose_patients(patients, ids="patient001,patient011,nobody", where="data [all]")
    assert str(refused.value) == "--patient-ids: no labeled patient patient011, nobody in data [all]"
    with pytest.raises(ConfigError, match="names no patient"):
        choose_patients(patients, ids=" , ")
    with pytest.raises(ConfigError, match="not both"):
        choose_patients(patients, n=1, ids="patient001")


def test_choose_patients_without_any_label_is_a_data_error():
    with pytest.raises(DataError) as refused:
        choose_patients([FakePatient("a", "NOR", labeled=False)], n=1, where="images/")
    assert str(refused.value).startswith("images/: no labeled patient")


def test_resolve_split_auto_uses_the_development_split_when_all_20_ids_are_there():
    patients = acdc_like()
    assert has_development_ids(patients) and not has_development_ids(patients[:50])
    pool = resolve_split(patients, "auto", "training")
    assert resolve_split_name(patients, "auto", "training") == "dev-pool"
    assert len(pool) == 80 and not {p.id for p in pool} & set(ACDC_DEV_EVAL_IDS)
    evaluation = resolve_split(patients, "auto", "evaluation")
    assert resolve_split_name(patients, "auto", "evaluation") == "dev-eval"
    assert sorted(p.id for p in evaluation) == sorted(ACDC_DEV_EVAL_IDS)
    assert resolve_split_name(patients[:50], "auto", "training") == "all"
    assert resolve_split(patients[:50], "auto", "training") == patients[:50]
    assert resolve_split(patients, "all", "evaluation") == patients


def test_resolve_split_dev_pool_without_acdc_ids_is_a_one_line_error():
    with pytest.raises(ConfigError) as refused:
        resolve_split(acdc_like()[:1], "dev-pool", "training", where="synthetic/")
    assert str(refused.value) == ("--split dev-pool: synthetic/ holds none of the 20 ACDC development evaluation "
                                  "patients; use --split all")
    with pytest.raises(ConfigError, match="--split dev: choose one of auto, all, dev-pool, dev-eval"):
        resolve_split(acdc_like()[:1], "dev", "training")
    with pytest.raises(ValueError, match="purpose must be one of"):
        resolve_split(acdc_like()[:1], "auto", "data/")
