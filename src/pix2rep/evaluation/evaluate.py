"""Evaluate a segmentation model on prepared patients: 3D metrics per patient, phase, class.

Predictions are put back on each volume's full grid (all slices; background outside the
ROI) and compared with the whole ground truth at native resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..data.dataset import PreparedPatient
from ..data.volume import CLASS_NAMES, LABELS
from ..errors import DataError
from ..inference import predict_prepared
from .clinical import CLINICAL_INDICES, clinical_indices, compare_indices
from .metrics import segmentation_metrics
from .regions import dice_by_region, slice_position_thirds


def evaluate_patients(
    model, patients: Sequence[PreparedPatient], device="cpu", amp: bool = True, keep_predictions=False, postprocess="none",
    progress: bool = False,
):
    """Rows of metrics (one per patient and phase) and clinical rows (one per patient with ED and ES).

    ``progress`` shows a bar over the patients (on stderr); the results do not depend on it.
    """
    from tqdm.auto import tqdm

    rows, clinical_rows, predictions = [], [], {}
    for p in tqdm(patients, desc="evaluate", unit="patient", disable=not progress, leave=False):
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
                    row[f"dice_{region}_{LABELS[label]}"] = value
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
    """Mean and std over volumes of Dice / HD95 per class and overall; index agreement."""
    out = {"volumes": len(rows)}
    for metric in ("dice", "hd95"):
        for name in list(CLASS_NAMES) + (["mean"] if metric == "dice" else []):
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


def evaluate_model(model, cfg, model_path, patients: Sequence[PreparedPatient], data, out, *, split: str = "",
                   device=None, resume: bool = False, overwrite: bool = False, progress: bool = False,
                   log: Callable[[str], None] = print) -> dict:
    """``pix2rep evaluate``: evaluate a loaded segmentation model on prepared patients and write
    ``per_case.csv``, ``clinical.csv``, ``summary.json``, ``config.yaml`` and ``dice.png`` to ``out``.

    ``cfg`` and ``model_path`` come with the model (:func:`~pix2rep.checkpoints.load_segmentation_model`);
    ``data`` and ``split`` are recorded in the summary, which is returned. ``device`` defaults to
    the config's. Patients the model was trained on are named in a warning.
    """
    from ..runs import prepare_run_dir
    from ..runtime import resolve_device
    from .report import write_evaluation

    device = resolve_device(device or cfg.device)
    if not any(p.labeled for p in patients):  # before the output folder exists
        raise DataError(data, "no labeled volume to evaluate")
    out = prepare_run_dir(out, resume, overwrite)
    seen_in_training = sorted(set(cfg.patients) & {p.id for p in patients})
    if seen_in_training:
        log(f"warning: {len(seen_in_training)} evaluation patient(s) were used to train this model: {seen_in_training}")
    rows, clinical_rows, _ = evaluate_patients(model.to(device), patients, device, cfg.bf16,
                                               postprocess=cfg.downstream.postprocess, progress=progress)
    summary = summarise(rows, clinical_rows)
    summary.update({"model": str(model_path), "data": str(Path(data).resolve()), "split": split})
    write_evaluation(out, rows, clinical_rows, summary, cfg)
    return summary
