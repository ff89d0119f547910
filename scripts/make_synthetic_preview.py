"""Draw docs/synthetic_vs_acdc.png: four slices of a synthetic patient above four of ACDC's patient001.

Usage: python scripts/make_synthetic_preview.py [--seed 0] [--group NOR] [--acdc DIR] [--out PNG]

Both rows show base to apex at end-diastole, grey scale, with a thin contour of each label
(RV red, MYO green, LV blue). Without the ACDC data the bottom row is left out.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402  (installed with matplotlib)

REPO = Path(__file__).resolve().parents[1]
try:
    from pix2rep.data.synthetic import make_synthetic_patient
except ImportError:  # run from a checkout without installing the package
    import sys

    sys.path.insert(0, str(REPO / "src"))
    from pix2rep.data.synthetic import make_synthetic_patient
LABEL_COLOURS = {1: "tab:red", 2: "tab:green", 3: "tab:blue"}


def pick_slices(mask: np.ndarray, n: int = 4) -> list[int]:
    """``n`` evenly spread slices (base to apex) among those where the heart is annotated."""
    annotated = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))
    if annotated.size == 0:
        annotated = np.arange(mask.shape[-1])
    return [int(annotated[i]) for i in np.linspace(0, annotated.size - 1, n).round().astype(int)]


def draw_row(axes, image: np.ndarray, mask: np.ndarray, title: str) -> None:
    """One row: the chosen slices of an ``(H, W, Z)`` stack, on a shared grey scale."""
    vmax = np.percentile(image, 99.5)
    for k, (ax, z) in enumerate(zip(axes, pick_slices(mask))):
        ax.imshow(image[:, :, z], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        for label, colour in LABEL_COLOURS.items():
            if (mask[:, :, z] == label).any():
                ax.contour(mask[:, :, z] == label, levels=[0.5], colors=colour, linewidths=0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"slice {z}", fontsize=8)
        if k == 0:
            ax.set_title(title, fontsize=10, loc="left", fontweight="bold")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group", default="NOR")
    parser.add_argument("--acdc", type=Path, default=REPO.parent / "shared/data/acdc/training")
    parser.add_argument("--out", type=Path, default=REPO / "docs/synthetic_vs_acdc.png")
    args = parser.parse_args()

    patient = make_synthetic_patient(args.seed, args.group)
    real_dir = args.acdc / "patient001"
    has_real = (real_dir / "patient001_frame01.nii.gz").exists()
    fig, axes = plt.subplots(2 if has_real else 1, 4, figsize=(10, 5.4 if has_real else 2.9), squeeze=False)
    draw_row(axes[0], patient["images"]["ED"], patient["masks"]["ED"],
             f"SYNTHETIC (pix2rep, seed {args.seed}, {patient['group']}, ED)")
    if has_real:
        image = np.asanyarray(nib.load(real_dir / "patient001_frame01.nii.gz").dataobj).astype(np.float32)
        mask = np.asanyarray(nib.load(real_dir / "patient001_frame01_gt.nii.gz").dataobj)
        draw_row(axes[1], image, mask, "real ACDC patient001 (ED)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # An 8-bit palette keeps the PNG small (~150 kB) for the README.
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80, format="png")
    Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
