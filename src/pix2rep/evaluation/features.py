"""See what a representation learned: per-pixel features projected by PCA to RGB."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..atomic import save_figure
from ..runs import check_output_file
from ..data.preprocess import prepare_volume


def pca_rgb(features: torch.Tensor) -> np.ndarray:
    """Project ``(K, D, H, W)`` features on their first 3 principal components -> ``(K, H, W, 3)``.

    One PCA for all K slices, so colours are comparable between slices; each component is
    stretched between its 1st and 99th percentiles.
    """
    K, D, H, W = features.shape
    x = features.permute(0, 2, 3, 1).reshape(-1, D).double()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x[:: max(1, len(x) // 20000)], full_matrices=False)
    proj = (x @ v[:3].T).reshape(K, H, W, 3).numpy()
    lo, hi = np.percentile(proj, [1, 99], axis=(0, 1, 2))
    return np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0, 1)


def write_feature_pca(volume_path, model, out_png, n_slices: int = 4, overwrite: bool = False) -> Path:
    """Write a PNG: for a few slices of a volume, the image beside its feature PCA; returns its path.

    An existing ``out_png`` is refused (OutputExistsError) unless ``overwrite``.
    """
    out_png = check_output_file(out_png, overwrite)  # before loading anything
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.nifti import read_nifti_volume
    from ..checkpoints import load_backbone

    backbone, cfg, ckpt = load_backbone(model)
    backbone.eval()
    volume = read_nifti_volume(volume_path)
    pre_cfg = cfg.preprocess
    if pre_cfg.protocol == "gt-crop" and volume.mask is None:
        pre_cfg = dataclasses.replace(pre_cfg, protocol="label-free")
    prepared = prepare_volume(volume, pre_cfg)
    idx = np.unique(np.linspace(0, len(prepared.images) - 1, min(n_slices, len(prepared.images))).round().astype(int))
    x = torch.from_numpy(prepared.images[idx])[:, None]
    with torch.no_grad():
        feats = backbone(x).float()
    rgb = pca_rgb(feats)
    fig, axes = plt.subplots(2, len(idx), figsize=(2.2 * len(idx), 4.6), dpi=90, squeeze=False)
    for j, k in enumerate(idx):
        axes[0, j].imshow(prepared.images[k], cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(f"slice {prepared.slice_index[k]}", fontsize=8)
        axes[1, j].imshow(rgb[j])
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"{Path(volume_path).name}: image / feature PCA (D={cfg.model.out_channels}, {Path(ckpt).parent.name})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_png)
    return out_png
