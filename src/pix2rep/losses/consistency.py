"""The Mean Teacher consistency loss (Tarvainen and Valpola, 2017)."""

from __future__ import annotations

import torch
from torch import Tensor


def mean_teacher_consistency(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean squared difference of the student's and the teacher's class probabilities.

    For logits (B, K, H, W) with softmax over the K classes, ``p`` the student's and ``q`` the
    teacher's:

        loss = 1/(B K H W) sum_{b,k,h,w} (p_bkhw - q_bkhw)^2

    Both softmaxes run in float32; the teacher's probabilities are a target (no gradient).
    """
    target = torch.softmax(teacher_logits.detach().float(), dim=1)
    return (torch.softmax(student_logits.float(), dim=1) - target).pow(2).mean()
