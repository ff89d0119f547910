"""Files an evaluation writes: per-case CSV, clinical CSV, summary JSON, a Dice plot."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes, save_figure
from ..data.volume import CLASS_NAMES


def write_csv(path: Path, rows: list[dict]) -> None:
    """Atomically write dict rows (columns: union of keys, in first-seen order)."""
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_bytes(Path(path), buf.getvalue().encode())


def breakdowns(rows: list[dict]) -> dict:
    """Mean Dice per pathology group, per phase and per slice position (basal/mid/apical)."""
    out: dict = {"by_group": {}, "by_phase": {}, "by_region": {}}
    for key, field in (("by_group", "group"), ("by_phase", "phase")):
        groups = defaultdict(list)
        for r in rows:
            groups[r[field]].append(r)
        for g, rs in sorted(groups.items()):
            out[key][g or "-"] = {c: _nanmean([r[f"dice_{c}"] for r in rs]) for c in list(CLASS_NAMES) + ["mean"]}
    for region in ("basal", "mid", "apical"):
        out["by_region"][region] = {
            c: _nanmean([r.get(f"dice_{region}_{c}", float("nan")) for r in rows]) for c in CLASS_NAMES
        }
    return out


def _nanmean(values) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return _json_safe(x.item())
    return x


def write_evaluation(out: Path, rows: list[dict], clinical_rows: list[dict], summary: dict, cfg) -> None:
    out = Path(out)
    write_csv(out / "per_case.csv", rows)
    if clinical_rows:
        write_csv(out / "clinical.csv", clinical_rows)
    summary = {**summary, **breakdowns(rows)}
    atomic_write_bytes(out / "summary.json", json.dumps(_json_safe(summary), indent=2).encode())
    cfg.save(out / "config.yaml")
    plot_dice_boxes(rows, out / "dice.png", f"Dice per class ({len(rows)} volumes)")


def plot_dice_boxes(rows: list[dict], out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(CLASS_NAMES) + ["mean"]
    data = [[r[f"dice_{n}"] for r in rows] for n in names]
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    ax.boxplot(data)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("3D Dice")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, out_png)
