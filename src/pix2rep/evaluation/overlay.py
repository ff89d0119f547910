"""PNG of a label volume over its image, for a person to look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import save_figure
from ..data.check import LABEL_COLOURS


def write_overlay(image: np.ndarray, labels: np.ndarray, out_png: Path, title: str = "", max_slices: int = 12) -> None:
    """Canonical ``(Z, H, W)`` image and labels -> a grid of slices with translucent labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z_idx = np.unique(np.linspace(0, image.shape[0] - 1, min(max_slices, image.shape[0])).round().astype(int))
    cols = min(6, len(z_idx))
    rows = int(np.ceil(len(z_idx) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), dpi=80, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, z in zip(axes.ravel(), z_idx):
        sl = image[z]
        lo, hi = np.percentile(sl, [1, 99])
        ax.imshow(np.clip((sl - lo) / max(hi - lo, 1e-6), 0, 1), cmap="gray")
        rgba = np.zeros(sl.shape + (4,))
        for label, colour in LABEL_COLOURS.items():
            rgba[labels[z] == label] = (*colour, 0.45)
        ax.imshow(rgba)
        ax.set_title(f"slice {z}", fontsize=7)
    fig.suptitle(title + "  [RV blue, MYO green, LV red]", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_png)
