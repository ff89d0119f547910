"""Few-shot subsets of annotated patients, the fixed development split of ACDC, and the
``--split`` / ``--patients`` choices of the command line made into patient lists."""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence, TypeVar

import numpy as np

from ..errors import ConfigError, DataError

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


def has_development_ids(patients: Sequence) -> bool:
    """True when all 20 ACDC development evaluation patients are among ``patients`` (the ACDC
    training set, or a copy of it)."""
    ids = {p.id for p in patients}
    return all(i in ids for i in ACDC_DEV_EVAL_IDS)


SPLITS = ("auto", "all", "dev-pool", "dev-eval")
PURPOSES = ("training", "evaluation")


def resolve_split_name(patients: Sequence, split: str, purpose: str) -> str:
    """What ``--split auto`` means for these patients: ``dev-pool`` for ``purpose="training"``
    and ``dev-eval`` for ``purpose="evaluation"`` when all 20 ACDC development evaluation
    patients are present, else ``all``. Other splits are returned as they are."""
    if split not in SPLITS:
        raise ConfigError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    if split != "auto":
        return split
    if not has_development_ids(patients):
        return "all"
    return "dev-pool" if purpose == "training" else "dev-eval"


def resolve_split(patients: Sequence[P], split: str, purpose: str, where: str = "") -> list[P]:
    """The patients of a ``--split``.

    ``all`` keeps every patient; ``dev-pool`` leaves out the 20 ACDC development evaluation
    patients (training), ``dev-eval`` keeps only them (evaluation); ``auto`` is one of these by
    :func:`resolve_split_name` (which says which, for the record). ``purpose`` is ``training``
    (pretraining too) or ``evaluation``; ``where`` (the dataset) goes into the error messages.
    """
    split = resolve_split_name(patients, split, purpose)
    if split == "all":
        return list(patients)
    pool, evaluation = split_development(patients)
    if not evaluation:
        raise ConfigError(f"--split {split}: {where or 'the dataset'} holds none of the 20 ACDC development "
                          "evaluation patients; use --split all")
    return pool if split == "dev-pool" else evaluation


def choose_patients(patients: Sequence[P], n: Optional[int] = None, ids=None, seed: int = 0, where: str = "") -> list[P]:
    """The annotated patients of a few-shot run, among the labeled ones of ``patients``.

    ``ids`` (patient ids, a list or one comma-separated string) picks those patients, in that
    order; else ``n`` patients are drawn by :func:`sample_few_shot_patients` with ``seed``.
    Every way this can fail (no labeled patient, ``n`` out of range, unknown ids) is a one-line
    error naming ``where`` (the dataset and split) and the value given.
    """
    if (n is None) == (ids is None):
        raise ConfigError("give the number of annotated patients (--patients) or their ids (--patient-ids), not both")
    labeled = [p for p in patients if p.labeled]
    if not labeled:
        raise DataError(where or None, "no labeled patient: training a segmentation model needs ground truth")
    if ids is None:
        if not 1 <= n <= len(labeled):
            have = f"only {len(labeled)}" if n > len(labeled) else str(len(labeled))
            raise ConfigError(f"--patients {n}: {have} labeled patients in {where or 'the dataset'}; "
                              f"choose 1 to {len(labeled)}")
        return sample_few_shot_patients(labeled, n, seed)
    wanted = [s.strip() for s in ids.split(",")] if isinstance(ids, str) else [str(s).strip() for s in ids]
    wanted = list(dict.fromkeys(s for s in wanted if s))  # a repeated id counts once
    if not wanted:
        raise ConfigError("--patient-ids: names no patient")
    by_id = {p.id: p for p in labeled}
    missing = [w for w in wanted if w not in by_id]
    if missing:
        raise ConfigError(f"--patient-ids: no labeled patient {', '.join(missing)} in {where or 'the dataset'}")
    return [by_id[w] for w in wanted]
