"""Few-shot subsets of annotated patients and the fixed development split of ACDC."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence, TypeVar

import numpy as np

# 20 held-out evaluation patients of the 100 ACDC training patients, 4 per pathology group
# (drawn once with numpy's default_rng(2024), then frozen here). Never used for pretraining,
# few-shot selection or model selection.
ACDC_DEV_EVAL_IDS: tuple[str, ...] = (
    "patient002", "patient005", "patient013", "patient020",  # DCM
    "patient022", "patient034", "patient037", "patient039",  # HCM
    "patient043", "patient044", "patient048", "patient058",  # MINF
    "patient071", "patient072", "patient075", "patient080",  # NOR
    "patient081", "patient084", "patient090", "patient092",  # RV
)  # fmt: skip

P = TypeVar("P")


def split_development(patients: Sequence[P], eval_ids: Sequence[str] = ACDC_DEV_EVAL_IDS) -> tuple[list[P], list[P]]:
    """Split patients into (pool, evaluation): the pool is everything not in ``eval_ids``."""
    eval_set = set(eval_ids)
    pool = [p for p in patients if p.id not in eval_set]
    evaluation = [p for p in patients if p.id in eval_set]
    return pool, evaluation


def sample_few_shot_patients(patients: Sequence[P], n: int, seed: int) -> list[P]:
    """Pick ``n`` patients, stratified by group, nested across ``n`` for a given seed.

    The seed fixes a random order of the groups and a random order of the patients within
    each group; patients are then dealt round-robin over the groups: first patient of each
    group in group order, then the second of each, and so on. Hence:

    - n < number of groups: n distinct groups, one patient each;
    - n a multiple of the number of groups (5 for ACDC): n / 5 patients per group;
    - the subset for n is a prefix of the subset for any larger n (1 in 2 in 5 in 10 ...).

    Patients without a group form one group ``None``. Deterministic in (patients, n, seed),
    whatever the order of ``patients``.
    """
    if n < 1 or n > len(patients):
        raise ValueError(f"n must be between 1 and {len(patients)} (the number of patients), got {n}")
    rng = np.random.default_rng(seed)
    by_group: dict = defaultdict(list)
    for p in sorted(patients, key=lambda p: p.id):
        by_group[p.group].append(p)
    groups = sorted(by_group, key=lambda g: "" if g is None else str(g))
    group_order = [groups[i] for i in rng.permutation(len(groups))]
    queues = {g: [by_group[g][i] for i in rng.permutation(len(by_group[g]))] for g in groups}
    chosen: list[P] = []
    rank = 0
    while len(chosen) < n:
        for g in group_order:
            if rank < len(queues[g]) and len(chosen) < n:
                chosen.append(queues[g][rank])
        rank += 1
    return chosen
