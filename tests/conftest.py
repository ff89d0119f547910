"""Shared fixtures: where the real ACDC data is, a private cache, a small synthetic dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ACDC_TRAINING = Path(
    os.environ.get("PIX2REP_ACDC") or Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc" / "training"
)
needs_acdc = pytest.mark.skipif(
    not ACDC_TRAINING.is_dir(), reason=f"ACDC training data not found at {ACDC_TRAINING} (set PIX2REP_ACDC)"
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Tests never read or write the user's ~/.cache/pix2rep."""
    monkeypatch.setenv("PIX2REP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Ten synthetic patients (two per group) in the ACDC layout."""
    from pix2rep.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data", n_patients=10, seed=0)
