"""``pix2rep data``: a text summary of a loaded dataset, a preview image of it, and how often the
label-free ROI contains the annotated heart."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..atomic import save_figure
from ..errors import DataError
from ..runs import check_output_file
from .discover import Dataset
from .volume import LABELS

# Overlay colours of labels 1 (RV), 2 (MYO), 3 (LV), in every picture pix2rep draws.
LABEL_COLOURS = {1: (0.15, 0.45, 1.0), 2: (0.2, 0.85, 0.2), 3: (1.0, 0.25, 0.2)}


def _range(values: np.ndarray, fmt: str) -> str:
    """``Z 6-18 x H 154-256 x W 154-256`` style ranges, one per canonical axis."""
    parts = []
    for axis, column in zip("ZHW", values.T):
        low, high = column.min(), column.max()
        parts.append(f"{axis} {low:{fmt}}" if low == high else f"{axis} {low:{fmt}}-{high:{fmt}}")
    return " x ".join(parts)


def describe_dataset(dataset: Dataset) -> str:
    """A human-readable report: layout, patients, groups, phases, shapes, spacings, labels, problems."""
    volumes = [v for p in dataset.patients for v in p.volumes.values()]
    extra = sum(len(p.unlabeled) for p in dataset.patients)
    lines = [
        f"dataset:   {dataset.root}",
        f"layout:    {dataset.layout}",
        f"patients:  {len(dataset.patients)}",
    ]
    groups = Counter(p.group for p in dataset.patients if p.group is not None)
    if groups:
        lines.append("groups:    " + ", ".join(f"{g} {n}" for g, n in sorted(groups.items())))
    phases = Counter(name for p in dataset.patients for name in p.volumes)
    lines.append("phases:    " + ", ".join(f"{name} {n}" for name, n in phases.items()))
    lines.append(f"volumes:   {len(volumes)} ({sum(v.mask is not None for v in volumes)} labeled)")
    if extra:
        lines.append(f"extra unlabeled frames (4D cine): {extra}")
    if volumes:
        shapes = np.array([v.image.shape for v in volumes])
        spacings = np.array([v.spacing for v in volumes], dtype=float)
        lines.append("shape:     " + _range(shapes, "d"))
        lines.append("spacing:   " + _range(spacings, ".2f") + " mm")
    label_counts = np.zeros(256, dtype=np.int64)
    for v in volumes:
        if v.mask is not None:
            label_counts += np.bincount(v.mask.ravel(), minlength=256)
    found = np.flatnonzero(label_counts).tolist()
    lines.append("labels:    " + (", ".join(str(v) for v in found) if found else "none"))
    lines.append(f"problems:  {len(dataset.problems)}")
    lines += [f"  - {problem}" for problem in dataset.problems]
    return "\n".join(lines)


def _slice_indices(volume, n_slices: int) -> list[int]:
    """``n_slices`` slices spread over the labeled part of the stack (the whole stack if unlabeled)."""
    depth = volume.image.shape[0]
    if volume.mask is not None and volume.mask.any():
        labeled = np.flatnonzero(volume.mask.reshape(depth, -1).any(axis=1))
        low, high = int(labeled[0]), int(labeled[-1])
    else:
        low, high = 0, depth - 1
    return sorted(set(np.linspace(low, high, n_slices).round().astype(int).tolist()))


def write_preview(dataset: Dataset, out_png: str | Path, n_patients: int = 6, n_slices: int = 4,
                  overwrite: bool = False) -> Path:
    """Save a grid of slices with the masks overlaid: one row per (patient, phase), slices in z order.

    Shows the first ``n_patients`` patients, at most two phases each (ED and ES for ACDC). An
    existing ``out_png`` is refused (OutputExistsError) unless ``overwrite``.
    """
    out_png = check_output_file(out_png, overwrite)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [(p.id, name, v) for p in dataset.patients[:n_patients] for name, v in list(p.volumes.items())[:2]]
    if not rows:
        raise DataError(out_png, "no volumes to preview")
    fig, axes = plt.subplots(len(rows), n_slices, figsize=(2.2 * n_slices, 2.3 * len(rows)), squeeze=False)
    for (patient_id, phase, volume), row_axes in zip(rows, axes):
        low, high = np.percentile(volume.image, [1, 99])
        indices = _slice_indices(volume, n_slices)
        for ax, z in zip(row_axes, indices + [None] * n_slices):
            ax.axis("off")
            if z is None:
                continue
            ax.imshow(volume.image[z], cmap="gray", vmin=low, vmax=max(high, low + 1e-6))
            if volume.mask is not None:
                overlay = np.zeros(volume.mask[z].shape + (4,))
                for label, colour in LABEL_COLOURS.items():
                    overlay[volume.mask[z] == label] = colour + (0.4,)
                ax.imshow(overlay)
            ax.set_title(f"{patient_id} {phase} z={z}", fontsize=7)
    handles = [Patch(color=colour, alpha=0.6, label=LABELS[label]) for label, colour in LABEL_COLOURS.items()]
    fig.legend(handles=handles, loc="upper right", ncol=3, fontsize=8)
    title = f"{dataset.root} ({dataset.layout}), slices in stack order (base to apex in ACDC)"
    fig.suptitle(title, fontsize=9, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out_png, dpi=80)
    return out_png


# -- does the label-free ROI contain the heart? (``pix2rep data roi``) ---------------------------

SINGLE, WITH_OTHER_PHASE = "single volume", "with the other phase"


def roi_containment(dataset: Dataset, fov_mm: float | None = None, progress: bool = False) -> dict:
    """How often the label-free ROI holds every annotated voxel, per labeled volume.

    The ROI is located twice per volume: from the volume alone, and with the patient's other
    phase (the |ED - ES| cue). ``fov_mm`` replaces the default field of view. Returns
    ``{"fov_mm", "size", "counts": {way: (inside, volumes)}, "misses": [(way, source), ...]}``;
    raises a DataError naming the dataset when it has no labeled volume.
    """
    from tqdm.auto import tqdm

    from .preprocess import PreprocessConfig, box_contains_mask, prepare_volume

    with_other = PreprocessConfig() if fov_mm is None else PreprocessConfig(fov_mm=fov_mm)
    single = PreprocessConfig(**{**with_other.__dict__, "use_phase_difference": False})
    counts = {SINGLE: [0, 0], WITH_OTHER_PHASE: [0, 0]}
    misses = []
    for patient in tqdm(dataset.patients, desc="ROI containment", unit="patient", disable=not progress, leave=False):
        volumes = list(patient.volumes.values())
        for volume in volumes:
            if volume.mask is None or not volume.mask.any():
                continue
            other = next((o for o in volumes if o is not volume), None)
            for way, cfg, other_phase in ((SINGLE, single, None), (WITH_OTHER_PHASE, with_other, other)):
                inside = box_contains_mask(prepare_volume(volume, cfg, other_phase=other_phase).box, volume.mask)
                counts[way][0] += inside
                counts[way][1] += 1
                if not inside:
                    misses.append((way, volume.source))
    if not counts[SINGLE][1]:
        raise DataError(dataset.root, "no labeled volume: ROI containment needs ground truth")
    return {"fov_mm": with_other.fov_mm, "size": with_other.size,
            "counts": {way: tuple(c) for way, c in counts.items()}, "misses": misses}


def format_roi_containment(result: dict) -> str:
    """The report of :func:`roi_containment`, one line per way of locating the ROI and per miss."""
    lines = [f"label-free ROI: {result['fov_mm']:g} mm field of view, {result['size']} px"]
    for way, (inside, n) in result["counts"].items():
        lines.append(f"  {way}: whole heart inside the ROI in {inside}/{n} volumes ({100 * inside / n:.1f} %)")
    lines += [f"  missed ({way}: {source})" for way, source in result["misses"]]
    return "\n".join(lines)
