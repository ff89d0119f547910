from collections import Counter
from dataclasses import dataclass

import pytest

from pix2rep.data.sampling import ACDC_DEV_EVAL_IDS, sample_few_shot_patients, split_development

GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")


@dataclass
class FakePatient:
    id: str
    group: str


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
