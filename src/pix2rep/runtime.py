"""Where and in which precision pix2rep computes: device, bf16 autocast, the allocator.

Shared by training, evaluation, inference and the speed benchmark, so that none of them needs
to import another to run a model.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
from typing import Optional

import torch

from .errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device a ``--device`` value (or a config's ``device``) names; ``auto`` is CUDA
    when available, else the CPU. Any other value, or a CUDA device this machine lacks, is a
    one-line ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # torch's own message is a long list of every backend
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: not a device pix2rep runs on; choose one of {DEVICE_CHOICES}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return device


_ALLOCATOR_TUNED: Optional[bool] = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    By default every buffer above 32 MB (and, after frees, many smaller ones) is mmap-ed and
    unmapped again, so each training step pays page faults and the kernel's zeroing for every
    activation and gradient it allocates: on the 2-core CPU this was a large share of the time
    that looked like elementwise work (ReLU backward, fills). ``mallopt(M_MMAP_MAX, 0)`` serves
    all sizes from the heap and ``M_TRIM_THRESHOLD`` keeps freed heap memory; the numbers
    computed do not change. Process-wide and idempotent; returns whether it is in effect: False
    where malloc is not glibc's (macOS, musl) or with ``PIX2REP_KEEP_FREED_MEMORY=0`` in the
    environment (the escape hatch, and how ``pix2rep bench`` measures the difference).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED is None:
        _ALLOCATOR_TUNED = False
        wanted = os.environ.get("PIX2REP_KEEP_FREED_MEMORY", "1") != "0"
        if wanted and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
                M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
                _ALLOCATOR_TUNED = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
            except (AttributeError, OSError):
                pass
    return _ALLOCATOR_TUNED


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware.

    A CPU without AVX-512-BF16 or AMX (AVX2-only x86, for one) emulates bf16: measured on a
    2-core AVX2 EPYC (scripts/bf16_vs_fp32_step.py), matmuls ran about 100 times slower than in
    fp32 and a `cpu`-preset pretraining step 8 times slower.
    """
    return _bf16_is_native(torch.device(device).type)


@functools.lru_cache(maxsize=None)
def _bf16_is_native(device_type: str) -> bool:  # asked at every forward pass: ask the backend once
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def use_bf16(requested: bool, device: torch.device) -> bool:
    """bf16 autocast is used when the config asks for it and the device computes bf16 natively."""
    return bool(requested) and bf16_is_native(device)


def precision_note(requested: bool, used: bool) -> str:
    """For the log: which precision runs, and why bf16 was dropped if it was."""
    if used:
        return "bf16 autocast"
    return "fp32 (this device has no native bf16)" if requested else "fp32"


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CPU and CUDA; a no-op context when disabled or when the device has no
    native bf16 (there fp32 is the faster of the two)."""
    if not use_bf16(enabled, device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
