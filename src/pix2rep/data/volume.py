"""In-memory volumes and patients, and the canonical short-axis orientation.

Every reader (ACDC, NIfTI folders, DICOM) returns :class:`Volume` objects whose arrays are
``(Z, H, W)``: Z indexes short-axis slices, ordered along the slice normal, and (H, W) is the
in-plane grid in one consistent orientation, whatever the axis order of the file. The
permutation and flips used are kept (``Volume.orientation``) so that a prediction made on the
canonical array goes back to the file's own voxel grid with :meth:`Volume.to_native`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

# The one list of label values and names (ACDC's): every reader, metric, report and output uses it.
LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
CLASS_NAMES = tuple(name for label, name in LABELS.items() if label)  # the structures: RV, MYO, LV


def short_axis_orientation(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Return the voxel-axis permutation and flips that give a canonical ``(Z, H, W)`` array.

    The result is an ``(3, 2)`` array: row k says which file axis becomes canonical axis k
    and whether it is flipped (-1) or not (+1).

    - Z, the slice axis, is the file axis with the largest voxel spacing (cine short-axis
      stacks are anisotropic: 5-10 mm between slices, 1-2 mm in plane); on a tie, the last
      one, as NIfTI files usually store slices last.
    - The two in-plane axes are ordered and flipped by the world axis each points along most
      (nibabel's ``io_orientation``), so that H runs towards world axis i and W towards world
      axis j > i, both in the positive direction; Z runs in the positive direction of its own
      closest world axis. Files that differ only by axis order or flips then give the same array.
    """
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    if len(shape) != 3:
        raise ValueError(f"expected a 3D shape, got {tuple(shape)}")
    import nibabel.orientations as nio

    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    # Largest spacing wins; ties (within 1 %) go to the later axis.
    order = sorted(range(3), key=lambda a: (round(float(spacing[a]) / max(spacing.max(), 1e-12), 2), a))
    slice_axis = order[-1]
    ornt = nio.io_orientation(affine)  # per file axis: (world axis, sign)
    inplane = [a for a in range(3) if a != slice_axis]
    inplane.sort(key=lambda a: ornt[a, 0])
    out = np.zeros((3, 2))
    for k, a in enumerate([slice_axis] + inplane):
        out[k] = (a, ornt[a, 1] if not np.isnan(ornt[a, 1]) else 1.0)
    return out


def to_canonical(array: np.ndarray, orientation: np.ndarray) -> np.ndarray:
    """Apply :func:`short_axis_orientation`'s result to a 3D array (a view where possible)."""
    axes = [int(a) for a in orientation[:, 0]]
    out = np.transpose(array, axes)
    for k in range(3):
        if orientation[k, 1] < 0:
            out = np.flip(out, axis=k)
    return out


def from_canonical(array: np.ndarray, orientation: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_canonical`: back to the file's own voxel axis order."""
    out = array
    for k in range(3):
        if orientation[k, 1] < 0:
            out = np.flip(out, axis=k)
    axes = [int(a) for a in orientation[:, 0]]
    return np.transpose(out, np.argsort(axes))


@dataclass
class Volume:
    """One 3D short-axis volume (one cardiac phase), with its optional label mask.

    image:  float32 ``(Z, H, W)`` in the canonical orientation, raw intensities.
    mask:   uint8 ``(Z, H, W)`` with labels 0 background, 1 RV, 2 MYO, 3 LV, or None.
    spacing: voxel size in mm along (Z, H, W).
    affine: the 4x4 voxel-to-world affine of the FILE's voxel grid (not of the canonical array).
    orientation: see :func:`short_axis_orientation`; identity for arrays made in memory.
    """

    image: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    mask: Optional[np.ndarray] = None
    orientation: np.ndarray = field(default_factory=lambda: np.array([[0, 1], [1, 1], [2, 1]], dtype=float))
    source: str = ""
    phase: Optional[str] = None  # "ED", "ES", a frame name, or None

    def __post_init__(self):
        if self.image.ndim != 3:
            raise ValueError(f"{self.source}: Volume.image must be (Z, H, W), got shape {self.image.shape}")
        if self.mask is not None and self.mask.shape != self.image.shape:
            raise ValueError(
                f"{self.source}: mask shape {self.mask.shape} differs from image shape {self.image.shape}"
            )

    @property
    def native_shape(self) -> tuple[int, ...]:
        """Shape of the file's own voxel grid."""
        return tuple(from_canonical(self.image, self.orientation).shape)

    def to_native(self, array: np.ndarray) -> np.ndarray:
        """Put a canonical ``(Z, H, W)`` array (e.g. a predicted mask) back on the file's voxel grid."""
        if array.shape != self.image.shape:
            raise ValueError(f"expected an array of shape {self.image.shape}, got {array.shape}")
        return np.ascontiguousarray(from_canonical(array, self.orientation))


@dataclass
class Patient:
    """A subject: an id, an optional pathology group and its volumes by phase name."""

    id: str
    volumes: dict[str, Volume]
    group: Optional[str] = None
    info: dict = field(default_factory=dict)  # e.g. Height, Weight, NbFrame from Info.cfg
    unlabeled: list[Volume] = field(default_factory=list)  # extra frames (4D cine), pretraining only

    @property
    def labeled(self) -> bool:
        return any(v.mask is not None for v in self.volumes.values())
