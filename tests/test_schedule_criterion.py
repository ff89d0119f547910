"""The convergence rule of scripts/downstream_schedule_study.py, on hand-made curves."""

import importlib.util
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[1] / "scripts" / "downstream_schedule_study.py"
_spec = importlib.util.spec_from_file_location("downstream_schedule_study", _path)
schedule_study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(schedule_study)


@pytest.mark.parametrize("curve, expected", [
    ({300: 0.508, 600: 0.514, 1200: 0.506}, 300),          # both doublings within 0.01
    ({300: 0.538, 600: 0.538, 1200: 0.658}, None),         # a plateau, then a rise: not converged
    ({300: 0.50, 600: 0.60, 1200: 0.605, 2400: 0.606}, 600),
    ({300: 0.333, 600: 0.375, 1200: 0.315}, None),         # overfitting fails the criterion too
    ({300: 0.5, 1000: 0.5}, None),                         # no doubling tried
    ({300: 0.5}, None),
])
def test_converged_from_needs_every_later_doubling_within_the_criterion(curve, expected):
    assert schedule_study.converged_from(curve) == expected
