"""Clinical indices from ED/ES label volumes (ACDC conventions) and their agreement statistics.

Labels: 1 RV cavity, 2 MYO (left-ventricular myocardium), 3 LV cavity. Volumes in ml, EF in %,
mass in g:

- structure volume (ml) = voxel count x (dz x dy x dx in mm^3) / 1000
- EF (%) = (EDV - ESV) / EDV x 100, NaN when EDV == 0
- myocardial mass (g) = MYO volume at ED (ml) x 1.05 g/ml (myocardial density; ACDC uses ED)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from pix2rep.evaluation.metrics import as_label_array, check_spacing

RV, MYO, LV = 1, 2, 3
MYOCARDIAL_DENSITY_G_PER_ML = 1.05

# Keys of clinical_indices() and their units.
INDEX_UNITS = {
    "LV_EDV": "ml",
    "LV_ESV": "ml",
    "LV_EF": "%",
    "RV_EDV": "ml",
    "RV_ESV": "ml",
    "RV_EF": "%",
    "MYO_mass": "g",
}
CLINICAL_INDICES = tuple(INDEX_UNITS)


def structure_volume_ml(mask, label: int, spacing) -> float:
    """Volume of ``label`` in ml: ``count(mask == label) * prod(spacing) / 1000`` (spacing in mm)."""
    mask = as_label_array(mask)
    spacing = check_spacing(spacing, mask.ndim)
    voxel_mm3 = float(np.prod(spacing))
    return int(np.count_nonzero(mask == label)) * voxel_mm3 / 1000.0


def ejection_fraction(edv: float, esv: float) -> float:
    """EF (%) = (EDV - ESV) / EDV x 100; NaN when EDV is 0."""
    return (edv - esv) / edv * 100.0 if edv > 0 else math.nan


def clinical_indices(ed_mask, es_mask, spacing_ed, spacing_es) -> dict[str, float]:
    """LV/RV EDV, ESV (ml) and EF (%), and myocardial mass at ED (g); keys as in ``INDEX_UNITS``.

    ED and ES may have different shapes and spacings (each volume uses its own).
    """
    lv_edv = structure_volume_ml(ed_mask, LV, spacing_ed)
    lv_esv = structure_volume_ml(es_mask, LV, spacing_es)
    rv_edv = structure_volume_ml(ed_mask, RV, spacing_ed)
    rv_esv = structure_volume_ml(es_mask, RV, spacing_es)
    return {
        "LV_EDV": lv_edv,
        "LV_ESV": lv_esv,
        "LV_EF": ejection_fraction(lv_edv, lv_esv),
        "RV_EDV": rv_edv,
        "RV_ESV": rv_esv,
        "RV_EF": ejection_fraction(rv_edv, rv_esv),
        "MYO_mass": structure_volume_ml(ed_mask, MYO, spacing_ed) * MYOCARDIAL_DENSITY_G_PER_ML,
    }


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN with fewer than 3 pairs or when either series is constant."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def compare_indices(
    pred_rows: Sequence[Mapping[str, float]],
    gt_rows: Sequence[Mapping[str, float]],
    indices: Sequence[str] = CLINICAL_INDICES,
) -> dict[str, dict[str, float]]:
    """Agreement of predicted vs reference indices, one row per patient in the same order.

    For each index, over the patients where both values are finite (the others are counted in
    ``n_missing``, e.g. an EF with EDV = 0):

    - ``mae``  = mean |pred - gt|
    - ``bias`` = mean (pred - gt)
    - ``pearson_r``: Pearson correlation (NaN if n < 3 or either series is constant)
    - ``n``: number of patients used, ``n_missing``: number left out
    """
    if len(pred_rows) != len(gt_rows):
        raise ValueError(f"need one prediction row per reference row: expected {len(gt_rows)}, got {len(pred_rows)}")
    result = {}
    for key in indices:
        pred = np.array([float(row[key]) for row in pred_rows])
        gt = np.array([float(row[key]) for row in gt_rows])
        usable = np.isfinite(pred) & np.isfinite(gt)
        pred, gt = pred[usable], gt[usable]
        diff = pred - gt
        result[key] = {
            "mae": float(np.mean(np.abs(diff))) if len(diff) else math.nan,
            "bias": float(np.mean(diff)) if len(diff) else math.nan,
            "pearson_r": pearson_r(pred, gt),
            "n": int(usable.sum()),
            "n_missing": int((~usable).sum()),
        }
    return result
