"""Per-class segmentation metrics on whole 3D label volumes: Dice and HD95.

Arrays are label maps (0 background, 1 RV, 2 MYO, 3 LV), usually ``(Z, H, W)`` with the voxel
``spacing`` in mm given in the same axis order. The computations are MONAI's
(:func:`monai.metrics.compute_dice`, :func:`monai.metrics.compute_hausdorff_distance`);
this module only fixes the conventions for empty structures:

- Dice: ``2 |P ∩ G| / (|P| + |G|)`` over all voxels of the volume. A structure absent from both
  prediction and ground truth scores 1.0 (nothing to find, nothing predicted); absent from one
  of them scores 0.0.
- HD95: the symmetric 95th-percentile Hausdorff distance between the surfaces of P and G, in mm:
  ``max(q95{d(p, G) : p in ∂P}, q95{d(g, P) : g in ∂G})`` (MONAI's definition). It is undefined
  (NaN) when P or G is empty; such values are *missing*, to be counted with
  :func:`count_missing`, never silently averaged away.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from pix2rep.data.volume import LABELS

FOREGROUND_LABELS = tuple(label for label in LABELS if label)  # (1, 2, 3)
CLASS_NAMES = {label: LABELS[label] for label in FOREGROUND_LABELS}  # {1: "RV", 2: "MYO", 3: "LV"}


def as_label_array(array, name: str = "mask") -> np.ndarray:
    """Return ``array`` as an integer numpy label map; floats must hold whole numbers."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"{name} must hold integer labels, got non-integer values (dtype {array.dtype})")
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label array, got dtype {array.dtype}")
    return array


def check_same_shape(pred: np.ndarray, gt: np.ndarray) -> None:
    """Raise ValueError naming both shapes unless ``pred`` and ``gt`` have the same shape."""
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction and ground truth shapes differ: expected {gt.shape} (ground truth), got {pred.shape}"
        )


def check_spacing(spacing, ndim: int) -> tuple[float, ...]:
    """Return ``spacing`` as a tuple of ``ndim`` positive floats, or raise ValueError."""
    spacing = tuple(float(s) for s in np.asarray(spacing, dtype=float).ravel())
    if len(spacing) != ndim:
        raise ValueError(f"spacing must have one value per array axis: expected {ndim}, got {len(spacing)} ({spacing})")
    if not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing values must be positive and finite, got {spacing}")
    return spacing


def _one_hot(mask: np.ndarray, labels: Sequence[int]) -> torch.Tensor:
    """``(1, len(labels), *mask.shape)`` float tensor, channel k = (mask == labels[k])."""
    channels = np.stack([mask == label for label in labels])
    return torch.from_numpy(channels[None].astype(np.float32))


def dice_per_class(pred, gt, labels: Sequence[int] = FOREGROUND_LABELS) -> dict[int, float]:
    """Dice per label over the whole array: ``2 |P ∩ G| / (|P| + |G|)``.

    Absent from both prediction and ground truth -> 1.0; present in only one of them -> 0.0
    (MONAI's ``compute_dice(..., ignore_empty=False)``). Never NaN.
    """
    pred, gt = as_label_array(pred, "prediction"), as_label_array(gt, "ground truth")
    check_same_shape(pred, gt)
    labels = tuple(int(label) for label in labels)
    scores = compute_dice(_one_hot(pred, labels), _one_hot(gt, labels), include_background=True, ignore_empty=False)
    return {label: float(scores[0, k]) for k, label in enumerate(labels)}


def hd95_per_class(pred, gt, spacing, labels: Sequence[int] = FOREGROUND_LABELS) -> dict[int, float]:
    """Symmetric 95th-percentile Hausdorff distance per label, in mm.

    ``spacing`` is the voxel size along each array axis (``(Z, H, W)`` -> ``(dz, dy, dx)``).
    HD95 = ``max(q95 d(∂P -> G), q95 d(∂G -> P))`` with Euclidean distances scaled by the spacing
    (MONAI's ``compute_hausdorff_distance(percentile=95, spacing=...)``). NaN where the label is
    empty in the prediction or in the ground truth: count those with :func:`count_missing`.
    """
    pred, gt = as_label_array(pred, "prediction"), as_label_array(gt, "ground truth")
    check_same_shape(pred, gt)
    spacing = check_spacing(spacing, gt.ndim)
    distances = {}
    for label in (int(label) for label in labels):
        if not (pred == label).any() or not (gt == label).any():
            distances[label] = math.nan
            continue
        with warnings.catch_warnings():  # MONAI's own internal call of a deprecated argument
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            hd = compute_hausdorff_distance(
                _one_hot(pred, [label]), _one_hot(gt, [label]), include_background=True, percentile=95, spacing=spacing
            )
        distances[label] = float(hd[0, 0])
    return distances


def count_missing(values: Iterable[float] | Mapping) -> int:
    """Number of NaN (missing) values in ``values`` (an iterable of numbers, or a mapping's values)."""
    if isinstance(values, Mapping):
        values = values.values()
    return sum(1 for v in values if v is None or math.isnan(float(v)))


def segmentation_metrics(pred, gt, spacing) -> dict[str, float]:
    """Dice and HD95 (mm) for RV, MYO and LV, plus their mean Dice, as one flat row.

    Keys: ``dice_RV, dice_MYO, dice_LV, dice_mean, hd95_RV, hd95_MYO, hd95_LV, hd95_missing``
    where ``dice_mean = (dice_RV + dice_MYO + dice_LV) / 3`` and ``hd95_missing`` is how many of
    the three HD95 values are NaN (an empty prediction or ground truth for that class).
    """
    dice = dice_per_class(pred, gt, FOREGROUND_LABELS)
    hd95 = hd95_per_class(pred, gt, spacing, FOREGROUND_LABELS)
    row = {f"dice_{CLASS_NAMES[label]}": dice[label] for label in FOREGROUND_LABELS}
    row["dice_mean"] = float(np.mean([dice[label] for label in FOREGROUND_LABELS]))
    row.update({f"hd95_{CLASS_NAMES[label]}": hd95[label] for label in FOREGROUND_LABELS})
    row["hd95_missing"] = count_missing(hd95)
    return row
