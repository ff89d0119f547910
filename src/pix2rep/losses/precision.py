"""The precision every loss computes in."""

from __future__ import annotations

import torch


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the inputs already are: bf16 inputs (autocast) are upcast, so
    that a loss's sums and exponentials never run in 8 bits of mantissa."""
    return torch.promote_types(dtype, torch.float32)
