"""Evaluate a segmentation model on prepared patients: 3D metrics per patient, phase, class.

Predictions are put back on each volume's full grid (all slices; background outside the
ROI) and compared with the whole ground truth at native resolution.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data.dataset import PreparedPatient
from ..inference import predict_prepared
from .clinical import CLINICAL_INDICES, clinical_indices, compare_indices
from .metrics import CLASS_NAMES, segmentation_metrics
from .regions import dice_by_region, slice_position_thirds


def evaluate_patients(
    model, patients: Sequence[PreparedPatient], device="cpu", amp: bool = True, keep_predictions=False, postprocess="none"
):
    """Rows of metrics (one per patient and phase) and clinical rows (one per patient with ED and ES)."""
    rows, clinical_rows, predictions = [], [], {}
    for p in patients:
        by_phase = {}
        for v in p.volumes:
            if v.canonical_mask is None:
                continue
            pred = predict_prepared(model, v, device, amp, postprocess)
            gt = v.canonical_mask
            row = {"patient": p.id, "group": p.group or "", "phase": v.phase or ""}
            row.update(segmentation_metrics(pred, gt, v.spacing))
            regions = slice_position_thirds(gt)
            for region, per_class in dice_by_region(pred, gt, regions).items():
                for label, value in per_class.items():
                    row[f"dice_{region}_{CLASS_NAMES[label]}"] = value
            rows.append(row)
            by_phase[v.phase] = (pred, gt, v.spacing)
            if keep_predictions:
                predictions[(p.id, v.phase)] = pred
        if "ED" in by_phase and "ES" in by_phase:
            (pe, ge, se), (ps, gs, ss) = by_phase["ED"], by_phase["ES"]
            pred_idx = clinical_indices(pe, ps, se, ss)
            gt_idx = clinical_indices(ge, gs, se, ss)
            crow = {"patient": p.id, "group": p.group or ""}
            for k in CLINICAL_INDICES:
                crow[f"{k}_pred"] = pred_idx[k]
                crow[f"{k}_gt"] = gt_idx[k]
            clinical_rows.append(crow)
    return rows, clinical_rows, predictions


def summarise(rows: list[dict], clinical_rows: list[dict]) -> dict:
    """Mean and std over cases of Dice / HD95 per class and overall; index agreement."""
    out = {"cases": len(rows)}
    for metric in ("dice", "hd95"):
        for name in list(CLASS_NAMES.values()) + (["mean"] if metric == "dice" else []):
            vals = np.array([r[f"{metric}_{name}"] for r in rows], dtype=float)
            finite = vals[np.isfinite(vals)]
            out[f"{metric}_{name}_mean"] = float(finite.mean()) if finite.size else float("nan")
            out[f"{metric}_{name}_std"] = float(finite.std()) if finite.size else float("nan")
            if metric == "hd95":
                out[f"hd95_{name}_missing"] = int((~np.isfinite(vals)).sum())
    if clinical_rows:
        pred = [{k: r[f"{k}_pred"] for k in CLINICAL_INDICES} for r in clinical_rows]
        gt = [{k: r[f"{k}_gt"] for k in CLINICAL_INDICES} for r in clinical_rows]
        out["clinical"] = compare_indices(pred, gt)
    return out
