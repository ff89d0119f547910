"""The study's paired comparisons, on cells written by hand."""

from __future__ import annotations

import json

import pytest

import math

import numpy as np

from pix2rep.evaluation.study import (hierarchical_bootstrap_ci, paired_difference, summarise_contrasts, summarise_grid,
                                      write_report)

CLASSES = ("RV", "MYO", "LV")


def cell(method: str, n: int, seed: int, dice: dict[str, tuple[float, float]]) -> dict:
    """A cell whose patient p scores dice[p] = (ED, ES), the same for the three classes."""
    rows = []
    for patient, phases in dice.items():
        for phase, value in zip(("ED", "ES"), phases):
            rows.append({"patient": patient, "phase": phase, "dice_mean": value,
                         **{f"dice_{k}": value for k in CLASSES}, **{f"hd95_{k}": 1.0 for k in CLASSES}})
    return {"method": method, "n": n, "seed": seed, "train_seconds": 1.0, "eval_seconds": 1.0, "rows": rows}


# per-patient means: seed 0, A - B = (0.7 - 0.5, 0.5 - 0.5, 0.8 - 0.6) = (0.2, 0.0, 0.2);
# seed 1, A - B = (0.0, 0.4, 0.0); averaged over seeds (0.1, 0.2, 0.1), mean 0.4 / 3.
CELLS = [
    cell("pix2rep-mt", 1, 0, {"p1": (0.8, 0.6), "p2": (0.5, 0.5), "p3": (0.9, 0.7)}),
    cell("pix2rep-ft", 1, 0, {"p1": (0.5, 0.5), "p2": (0.4, 0.6), "p3": (0.6, 0.6)}),
    cell("pix2rep-mt", 1, 1, {"p1": (0.6, 0.6), "p2": (0.7, 0.7), "p3": (0.8, 0.8)}),
    cell("pix2rep-ft", 1, 1, {"p1": (0.6, 0.6), "p2": (0.3, 0.3), "p3": (0.8, 0.8)}),
    # seeds the other method lacks are left out of the pairing
    cell("pix2rep-ft", 1, 2, {"p1": (0.0, 0.0), "p2": (0.0, 0.0), "p3": (0.0, 0.0)}),
    cell("pix2rep-mt", 2, 0, {"p1": (1.0, 1.0), "p2": (1.0, 1.0), "p3": (1.0, 1.0)}),
]
INDEX = {(c["method"], c["n"], c["seed"]): c for c in CELLS}


def test_paired_difference_pairs_patients_within_a_seed_then_averages_seeds():
    mean, lo, hi = paired_difference(INDEX, "pix2rep-mt", "pix2rep-ft", 1)
    assert mean == pytest.approx(0.4 / 3)
    # a resampled mean of the per-seed, per-patient differences (0.2, 0, 0.2; 0, 0.4, 0) lies between their extremes
    assert 0.0 - 1e-9 <= lo <= mean <= hi <= 0.4 + 1e-9


def test_hierarchical_bootstrap_resamples_the_seeds():
    # Two seeds, every patient the same within a seed: resampling patients changes nothing, and
    # a replicate's mean is 0.1, 0.2 or 0.3 with probabilities 1/4, 1/2, 1/4 (the two seeds
    # drawn with replacement), so the 2.5th and 97.5th percentiles are 0.1 and 0.3. A bootstrap
    # over patients of the seed-averaged differences (all 0.2) would give [0.2, 0.2].
    lo, hi = hierarchical_bootstrap_ci(np.array([[0.1] * 5, [0.3] * 5]))
    assert (lo, hi) == pytest.approx((0.1, 0.3))


def test_hierarchical_bootstrap_with_one_seed_resamples_patients():
    # One seed, two patients 0 and 1: replicate means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.
    assert hierarchical_bootstrap_ci(np.array([[0.0, 1.0]])) == pytest.approx((0.0, 1.0))


def test_tables_show_the_sample_std_across_seeds():
    # pix2rep-ft at N = 1: cell means 3.2 / 6, 3.4 / 6 and 0 (seeds 0, 1, 2)
    values = [3.2 / 6, 3.4 / 6, 0.0]
    mean = sum(values) / 3
    sample_std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    m, s, k = summarise_grid(CELLS)["pix2rep-ft"][1]["dice_mean"]
    assert (m, s, k) == (pytest.approx(mean), pytest.approx(sample_std), 3)
    assert summarise_grid(CELLS)["pix2rep-mt"][2]["dice_mean"][1:] == (0.0, 1)  # one seed: no spread


def test_paired_difference_is_none_without_a_shared_seed():
    assert paired_difference(INDEX, "pix2rep-mt", "pix2rep-ft", 2) is None


def test_contrasts_reach_the_report_and_its_summary(tmp_path):
    contrasts = summarise_contrasts(CELLS)
    assert list(contrasts) == ["pix2rep-mt - pix2rep-ft"]  # the only pair of CONTRASTS present
    assert list(contrasts["pix2rep-mt - pix2rep-ft"]) == [1]
    summary = write_report(tmp_path, CELLS, {"machine": "test"})
    assert summary["contrasts"]["pix2rep-mt - pix2rep-ft"]["1"][0] == pytest.approx(0.4 / 3)
    json.dumps(summary)  # summary.json is written from it
    report = (tmp_path / "REPORT.md").read_text()
    line = next(row for row in report.splitlines() if row.startswith("| pix2rep-mt - pix2rep-ft |"))
    assert "| 1 | +0.133 |" in line


def test_baseline_column_uses_the_same_pairing():
    cells = [dict(c, method="baseline") if c["method"] == "pix2rep-ft" else c for c in CELLS]
    table = summarise_grid(cells)
    assert table["pix2rep-mt"][1]["diff"][0] == pytest.approx(0.4 / 3)
    assert "diff" not in table["pix2rep-mt"][2]


def test_report_names_the_machines_the_cells_recorded_and_counts_the_rest():
    from pix2rep.evaluation.study import where_cells_ran

    gpu = {"machine": "H200", "torch": "2.11"}
    cpu = {"machine": "EPYC", "torch": "2.13"}
    cells = [dict(CELLS[0], **gpu), dict(CELLS[1], **gpu), dict(CELLS[2], **cpu), CELLS[3]]
    here = {"machine": "laptop", "torch": "2.13"}
    assert where_cells_ran(cells, here) == [
        "- machine: H200; torch 2.11 (2 cells)",
        "- machine: EPYC; torch 2.13 (1 cell)",
        "- machine: not recorded by 1 cell (written before cells recorded it); this report was written on laptop; torch 2.13",
    ]
    assert where_cells_ran(cells[:2], here) == ["- machine: H200; torch 2.11"]
    assert where_cells_ran([], here) == ["- machine: laptop; torch 2.13"]
