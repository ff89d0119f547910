"""The supervised segmentation loss of the downstream tasks (METHOD.md, section 5)."""

from __future__ import annotations

from torch import nn


def segmentation_loss(name: str) -> nn.Module:
    """MONAI's soft Dice (``"dice"``) or soft Dice + cross-entropy (``"dice-ce"``) of logits
    (B, K, H, W) against integer labels (B, 1, H, W), with softmax, background included.

    With ``p_bkx`` the softmax over the K classes, ``y_bkx`` the one-hot labels and
    ``eps = 1e-5``, each (slice b, class k) pair gets a soft Dice, and their mean is the loss:

        dice = 1 - 1/(B K) sum_{b,k} (2 sum_x p_bkx y_bkx + eps) / (sum_x p_bkx + sum_x y_bkx + eps)
        dice-ce = dice - 1/(B X) sum_{b,x} log p_{b, y_bx, x}

    (X pixels per slice; the cross-entropy is the mean over pixels.)
    """
    from monai.losses import DiceCELoss, DiceLoss  # MONAI is slow to import: only where used

    if name == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True, include_background=True)
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)
