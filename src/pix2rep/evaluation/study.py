"""The label-efficiency study's statistics and report, from its finished cells.

A cell is one (method, N, seed) run: its per-volume Dice and HD95 rows on the evaluation
patients. Everything here reads cells and writes runs.csv, REPORT.md and dice_vs_n.png; it
trains nothing, so a study's report can be rebuilt on any machine (``benchmark --report-only``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from ..atomic import atomic_write_bytes, save_figure
from ..data.volume import CLASS_NAMES as CLASSES
from ..provenance import read_invocations
from ..runs import MetricsLog
from .report import write_csv

METHOD_LABELS = {
    "baseline": "supervised baseline (from scratch)",
    "pix2rep-lp": "Pix2Rep linear probe",
    "pix2rep-ft": "Pix2Rep fine-tuning",
    "random-lp": "linear probe on a random backbone (floor)",
    "pix2rep-v2-lp": "Pix2Rep-v2 (Barlow Twins) linear probe",
    "pix2rep-v2-ft": "Pix2Rep-v2 (Barlow Twins) fine-tuning",
    "pix2rep-mt": "Pix2Rep fine-tuning + Mean Teacher",
    "baseline-mt": "baseline + Mean Teacher",
    "simclr-lp": "SimCLR (image-level) linear probe on a random decoder",
    "simclr-ft": "SimCLR (image-level) fine-tuning",
    "invariance-lp": "invariance ablation (no spatial transform) linear probe",
    "invariance-ft": "invariance ablation (no spatial transform) fine-tuning",
}


# the paper's further claims and what the baselines isolate, as paired comparisons (beyond the
# comparison of every method with the baseline): (method, reference, what the difference measures)
CONTRASTS: list[tuple[str, str, str]] = [
    ("pix2rep-v2-ft", "pix2rep-ft", "Barlow Twins (v2) instead of the contrastive loss, fine-tuned"),
    ("pix2rep-v2-lp", "pix2rep-lp", "Barlow Twins (v2) instead of the contrastive loss, probed"),
    ("pix2rep-mt", "pix2rep-ft", "Mean Teacher added to Pix2Rep fine-tuning"),
    ("pix2rep-ft", "invariance-ft", "the spatial transform between the views (equivariance)"),
    ("pix2rep-ft", "simclr-ft", "pixel-level instead of image-level pretraining"),
]


def load_cells(cells_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(cells_dir.glob("*.json"))]


def per_patient_dice(cell: dict) -> dict[str, float]:
    """Mean Dice over phases and the 3 classes, per evaluation patient."""
    by_patient: dict[str, list[float]] = {}
    for r in cell["rows"]:
        by_patient.setdefault(r["patient"], []).append(float(r["dice_mean"]))
    return {p: float(np.mean(v)) for p, v in by_patient.items()}


def cell_mean(cell: dict, key: str = "dice_mean") -> float:
    """Mean over evaluation volumes (patients x phases) of one metric."""
    return float(np.nanmean([float(r[key]) for r in cell["rows"]]))


def index_cells(cells: list[dict]) -> dict:
    """(method, N, seed) -> cell."""
    return {(c["method"], c["n"], c["seed"]): c for c in cells}


def hierarchical_bootstrap_ci(diffs: np.ndarray, n_boot: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``diffs`` (seeds x patients), resampling both levels.

    Each replicate draws S seeds with replacement (which annotated patients were drawn), then P
    evaluation patients with replacement (the same patients for every seed: each seed is scored on
    the same evaluation set), and takes the mean of the chosen block. With one seed this is the
    bootstrap over patients alone."""
    diffs = np.asarray(diffs, dtype=float)
    n_seeds, n_patients = diffs.shape
    if n_patients < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, (n_boot, n_seeds))
    patients = rng.integers(0, n_patients, (n_boot, n_patients))
    chosen = diffs[seeds]  # (n_boot, S, P): each replicate's seeds
    chosen = np.take_along_axis(chosen, np.repeat(patients[:, None, :], n_seeds, axis=1), axis=2)
    means = chosen.mean(axis=(1, 2))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired_differences(index: dict, method: str, reference: str, n: int) -> Optional[np.ndarray]:
    """Per seed and evaluation patient, Dice of ``method`` minus Dice of ``reference`` trained on
    the same annotated patients (same N and seed): an array seeds x patients (None: no shared seed).
    ``index`` is :func:`index_cells`."""
    diffs = []
    for seed in sorted(seed for (m, k, seed) in index if m == method and k == n):
        ref = index.get((reference, n, seed))
        if ref is None:
            continue
        a, b = per_patient_dice(index[(method, n, seed)]), per_patient_dice(ref)
        diffs.append([a[p] - b[p] for p in sorted(a) if p in b])
    return np.array(diffs) if diffs else None


def paired_difference(index: dict, method: str, reference: str, n: int) -> Optional[tuple[float, float, float]]:
    """Dice of ``method`` minus Dice of ``reference``, paired by seed and patient: (mean, 95 % CI).

    The mean is over seeds and evaluation patients of :func:`paired_differences`; the interval is
    the :func:`hierarchical_bootstrap_ci`, which resamples the draws of annotated patients (seeds)
    and then the evaluation patients. None: no shared seed."""
    diffs = paired_differences(index, method, reference, n)
    if diffs is None:
        return None
    return (float(diffs.mean()), *hierarchical_bootstrap_ci(diffs))


def summarise_grid(cells: list[dict]) -> dict:
    """table[method][n] = {"dice": (mean, std, seeds), per class ..., "diff": (mean, lo, hi)}."""
    table: dict = {}
    index = index_cells(cells)
    for (method, n, seed), c in index.items():
        table.setdefault(method, {}).setdefault(n, {"cells": []})["cells"].append(c)
    for method, by_n in table.items():
        for n, entry in by_n.items():
            cs = entry["cells"]
            for key in ["dice_mean"] + [f"dice_{k}" for k in CLASSES]:
                vals = np.array([cell_mean(c, key) for c in cs])
                # sample std (ddof = 1) across seeds; 0 where there is one seed (shown as the mean alone)
                entry[key] = (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, len(vals))
            if method != "baseline":
                diff = paired_difference(index, method, "baseline", n)
                if diff is not None:
                    entry["diff"] = diff
    return table


def summarise_contrasts(cells: list[dict]) -> dict:
    """contrasts["A - B"][n] = paired_difference of A against B, for the pairs of CONTRASTS present."""
    index = index_cells(cells)
    out: dict = {}
    for method, reference, _ in CONTRASTS:
        for n in sorted({k for (m, k, _s) in index if m == method}):
            diff = paired_difference(index, method, reference, n)
            if diff is not None:
                out.setdefault(f"{method} - {reference}", {})[n] = diff
    return out


def contrast_table(contrasts: dict) -> list[str]:
    """The Markdown table of :func:`summarise_contrasts`, in the order of CONTRASTS."""
    lines = ["| comparison | what it measures | N | difference (Dice points) | 95 % CI |", "|---|---|---|---|---|"]
    for method, reference, measures in CONTRASTS:
        for n, d in contrasts.get(f"{method} - {reference}", {}).items():
            lines.append(f"| {method} - {reference} | {measures} | {n} | {d[0]:+.3f} | [{d[1]:+.3f}, {d[2]:+.3f}] |")
    return lines


def efficiency_factor(table: dict, method: str, n: int, pool_size: int) -> str:
    """How many annotated patients the baseline needs to match ``method`` at ``n``.

    Interpolates the baseline's mean Dice linearly on a log N axis; returns e.g. "3.4x
    (baseline needs 6.8 patients)" or "more than 80/N" when the baseline never matches it.
    """
    if method not in table or n not in table[method] or "baseline" not in table:
        return "n/a"
    target = table[method][n]["dice_mean"][0]
    ns = sorted(table["baseline"])
    ys = [table["baseline"][k]["dice_mean"][0] for k in ns]
    for (n0, y0), (n1, y1) in zip([(None, None)] + list(zip(ns, ys)), zip(ns, ys)):
        if y1 >= target:
            if n0 is None or y1 == y0:
                needed = float(n1)
            else:
                t = (target - y0) / (y1 - y0)
                needed = float(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))))
            if needed <= n:
                return f"none: the baseline already matches it at N = {n1}"
            return f"{needed / n:.1f}x (baseline needs {needed:.1f} patients)"
    return f"more than {max(ns) // n}x (baseline never matches it up to N = {max(ns)})"


def total_stage_seconds(out: Path, cells: list[dict], pretraining_folders: dict[str, str]) -> dict[str, float]:
    """Wall time per stage summed over every invocation: pretraining epochs (``pretraining_folders``:
    pretraining kind -> its folder in ``out``) and grid cells."""
    stages = {}
    for kind, folder in pretraining_folders.items():
        pre = out / folder / "metrics.csv"
        if pre.exists():
            label = "pretraining" if kind == "pix2rep" else f"pretraining {kind}"
            stages[label] = sum(float(r["seconds"]) for r in MetricsLog(pre, ()).rows)
    # cells trained in parallel worker processes overlap: their times add up to more than the wall
    summed = " (summed over cells, which ran in parallel processes)" if any(c.get("workers", 1) > 1 for c in cells) else ""
    stages["downstream training" + summed] = sum(c["train_seconds"] for c in cells)
    stages["evaluation" + summed] = sum(c["eval_seconds"] for c in cells)
    for method in sorted({c["method"] for c in cells}, key=lambda m: list(METHOD_LABELS).index(m) if m in METHOD_LABELS else 99):
        stages[f"downstream training + evaluation, {method}{summed}"] = sum(
            c["train_seconds"] + c["eval_seconds"] for c in cells if c["method"] == method)
    return stages


def _cells(k: int) -> str:
    return f"{k} cell" + ("s" if k != 1 else "")


def where_cells_ran(cells: list[dict], meta: dict) -> list[str]:
    """Report lines naming the machines and torch builds the cells recorded.

    A report can be rebuilt on another machine (``--report-only``), so the machine writing it
    is never taken for the one that ran a cell."""
    counts = Counter((c["machine"], c["torch"]) for c in cells if "machine" in c)
    lines = [f"- machine: {machine}; torch {torch_version}" + (f" ({_cells(k)})" if len(counts) > 1 else "")
             for (machine, torch_version), k in counts.most_common()]
    unrecorded = sum("machine" not in c for c in cells)
    if unrecorded:
        lines.append(f"- machine: not recorded by {_cells(unrecorded)} (written before cells recorded it); "
                     f"this report was written on {meta.get('machine')}; torch {meta.get('torch')}")
    return lines or [f"- machine: {meta.get('machine')}; torch {meta.get('torch')}"]


def _fmt(mean_std, seeds_planned: int = 0) -> str:
    """``mean ± std`` over seeds; an entry with fewer seeds than planned (a cut-short run) says so."""
    m, s, k = mean_std
    text = f"{m:.3f} ± {s:.3f}" if k > 1 else f"{m:.3f}"
    return text + (f" ({k} of {seeds_planned} seeds)" if 0 < k < seeds_planned else "")


def write_report(out: Path, cells: list[dict], meta: dict, synthetic: bool = False) -> dict:
    """Write runs.csv, REPORT.md and dice_vs_n.png from the finished cells.

    ``meta["planned_seeds"]`` maps (method, N) to the number of seeds the grid asked for: an entry
    with fewer finished seeds is marked "(k of S seeds)"."""
    rows = []
    for c in cells:
        for r in c["rows"]:
            for k in CLASSES:
                rows.append({**({"data": "SYNTHETIC"} if synthetic else {}),
                             "method": c["method"], "N": c["n"], "seed": c["seed"], "patient": r["patient"],
                             "phase": r["phase"], "class": k, "dice": r[f"dice_{k}"], "hd95": r[f"hd95_{k}"]})
    write_csv(out / "runs.csv", rows)
    table = summarise_grid(cells)
    methods = [m for m in METHOD_LABELS if m in table] + sorted(m for m in table if m not in METHOD_LABELS)
    ns = sorted({c["n"] for c in cells})
    planned = meta.get("planned_seeds", {})  # (method, N) -> seeds the grid asked for
    prefix = "SYNTHETIC DATA: " if synthetic else ""
    lines = [f"# {prefix}Label-efficiency study", ""]
    if synthetic:
        lines += ["**These numbers come from pix2rep's synthetic images, not from real MRI. They say nothing about "
                  "performance on real data.**", ""]
    lines += [f"Data: `{meta.get('data')}`; evaluation: {meta.get('evaluation')}; protocol `{meta.get('protocol')}`; "
              f"preset `{meta.get('preset')}`.", "",
              "Dice: 3D, per volume at native resolution, mean over the 3 classes (RV, MYO, LV), then over "
              "evaluation volumes (patients x ED/ES); mean ± sample std (ddof = 1) across seeds.", ""]
    draws: dict[int, int] = {}  # N -> the most seeds any method was planned with
    for (_, n), k in planned.items():
        draws[n] = max(k, draws.get(n, 0))
    draws = {n: draws[n] for n in ns if n in draws}
    if draws:
        lines += ["Seeds (draws of annotated patients) per N: " + ", ".join(f"N={n}: {k}" for n, k in draws.items()) + ".", ""]
    lines += ["## Mean Dice versus number of annotated patients", "",
              "| method | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for m in methods:
        lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(
            _fmt(table[m][n]["dice_mean"], planned.get((m, n), 0)) if n in table[m] else "" for n in ns) + " |")
    lines += ["", "## Per class", "", "| method | N | RV | MYO | LV |", "|---|---|---|---|---|"]
    for m in methods:
        for n in ns:
            if n in table[m]:
                e = table[m][n]
                lines.append(f"| {m} | {n} | " + " | ".join(_fmt(e[f'dice_{k}'], planned.get((m, n), 0)) for k in CLASSES) + " |")
    lines += ["", "## Paired difference against the baseline", "",
              "Per evaluation patient, Dice of the method minus Dice of the baseline trained on the same patients "
              "(same N and seed), averaged over seeds and patients; 95 % hierarchical bootstrap interval, "
              "resampling the seeds (draws of annotated patients), then the evaluation patients.", "",
              "| method | N | difference (Dice points) | 95 % CI |", "|---|---|---|---|"]
    for m in methods:
        for n in ns:
            d = table[m].get(n, {}).get("diff")
            if d:
                lines.append(f"| {m} | {n} | {d[0]:+.3f} | [{d[1]:+.3f}, {d[2]:+.3f}] |")
    contrasts = summarise_contrasts(cells)
    if contrasts:
        lines += ["", "## Paired differences between methods", "",
                  "The same pairing, of the first method against the second: the paper's further claims, and "
                  "what each baseline isolates.", "", *contrast_table(contrasts)]
    headline = {}
    if "baseline" in table and 1 in table["baseline"]:
        lines += ["", "## Headline figures (the paper's claims, measured)", ""]
        base1 = table["baseline"][1]["dice_mean"][0]
        for m in ("pix2rep-lp", "pix2rep-ft"):
            if m in table and 1 in table[m]:
                v = table[m][1]["dice_mean"][0]
                rel = 100 * (v - base1) / base1 if base1 > 0 else float("inf")
                headline[m] = {"points": v - base1, "relative_percent": rel}
                d = table[m][1].get("diff")
                paired = f" (paired, 95 % hierarchical bootstrap interval [{d[1]:+.3f}, {d[2]:+.3f}])" if d else ""
                lines.append(f"- One-shot (N = 1), {METHOD_LABELS[m]}: {v:.3f} vs baseline {base1:.3f}: "
                             f"{v - base1:+.3f} Dice points{paired}, {rel:+.1f} % relative (paper: +30 % LP, +31 % FT).")
        pool = meta.get("pool_size", 80)
        for m in ("pix2rep-lp", "pix2rep-ft"):
            for n in (1, 2, 5):
                if m in table and n in table[m]:
                    lines.append(f"- Annotation efficiency, {m} at N = {n}: {efficiency_factor(table, m, n, pool)} "
                                 "(paper: about 5x).")
    lines += per_seed_lines(index_cells(cells), methods, 1)
    invocations = read_invocations(out)
    first = invocations[0]["command"] if invocations else meta.get("command")
    lines += ["", "![Dice versus N](dice_vs_n.png)", "", "## How this was produced", "",
              f"- command: `{first}`"]
    for inv in invocations[1:]:
        at = f", commit `{inv['commit']}`" if "commit" in inv else ""
        lines.append(f"- continued with: `{inv['command']}` ({inv['started']}{at})")
    first_commit = (invocations[0].get("commit") if invocations else None) or meta.get("commit")
    lines += [f"- git commit: `{first_commit}`" + (" (of the first command)" if len(invocations) > 1 else ""),
              *where_cells_ran(cells, meta), f"- pix2rep {meta.get('version')}",
              f"- downstream budget: {meta.get('budget')}"]
    for stage, secs in {**total_stage_seconds(out, cells, meta.get("pretraining_folders", {})), **meta.get("stage_seconds", {})}.items():
        lines.append(f"- wall time, {stage}: {secs / 60:.1f} min")
    atomic_write_bytes(out / "REPORT.md", ("\n".join(lines) + "\n").encode())
    plot_dice_vs_n(table, methods, out / "dice_vs_n.png", prefix)
    return {"table": {m: {str(n): {k: v for k, v in e.items() if k != "cells"} for n, e in by.items()} for m, by in table.items()},
            "contrasts": {name: {str(n): d for n, d in by.items()} for name, by in contrasts.items()},
            "headline": headline, "synthetic_data": synthetic}


def per_seed_lines(index: dict, methods: list[str], n: int) -> list[str]:
    """Report lines: each method's mean Dice per seed at ``n``, and its difference from the
    baseline trained on the same patients (the spread that a single draw hides)."""
    seeds = sorted({s for (m, k, s) in index if k == n})
    if len(seeds) < 2:
        return []
    lines = ["", f"## Per seed at N = {n}", "",
             "Mean Dice of each draw of annotated patients (seed), and in brackets the difference from the "
             "baseline trained on the same patients.", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for m in methods:
        if not any((m, n, s) in index for s in seeds):
            continue
        texts = []
        for s in seeds:
            if (m, n, s) not in index:
                texts.append("")
                continue
            v = cell_mean(index[(m, n, s)])
            ref = index.get(("baseline", n, s))
            texts.append(f"{v:.3f}" + (f" ({v - cell_mean(ref):+.3f})" if ref is not None and m != "baseline" else ""))
        lines.append(f"| {m} | " + " | ".join(texts) + " |")
    return lines


def plot_dice_vs_n(table: dict, methods: list[str], out_png: Path, prefix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    for m in methods:
        ns = sorted(table[m])
        means = [table[m][n]["dice_mean"][0] for n in ns]
        stds = [table[m][n]["dice_mean"][1] for n in ns]
        ax.errorbar(ns, means, yerr=stds, marker="o", ms=4, capsize=3, label=METHOD_LABELS.get(m, m))
    ax.set_xscale("log")
    ax.set_xlabel("annotated patients N (log scale)")
    ax.set_ylabel("mean 3D Dice (RV, MYO, LV)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"{prefix}Dice versus number of annotated patients", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out_png)
