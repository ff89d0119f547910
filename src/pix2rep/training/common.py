"""What every training loop shares: device and precision, run folders, checkpoints, logs.

Checkpoints are plain dicts of tensors and built-in values written with ``torch.save`` and
read with ``torch.load(weights_only=True)``: loading one never unpickles arbitrary objects.
Files are written atomically (temporary file, fsync, rename), so a killed run leaves the
previous version intact.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import functools
import os
import platform
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch

from .. import __version__
from ..atomic import atomic_path, atomic_write_bytes, remove_stale_temporary_files, save_figure  # noqa: F401 (atomic_write_bytes re-exported)
from ..config import RunConfig
from ..errors import OutputExistsError, Pix2RepError

RUN_MARKER = "config.yaml"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Pix2RepError(f"--device {name}: CUDA is not available on this machine")
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


def prepare_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Create ``out``; refuse an existing non-empty folder unless resuming or overwriting.

    ``overwrite`` only deletes a folder that is a pix2rep run (it holds config.yaml), so a
    typo can never wipe unrelated files.
    """
    out = Path(out)
    if resume and overwrite:
        raise Pix2RepError("give --resume or --overwrite, not both")
    if out.exists() and any(out.iterdir()):
        if resume:
            if not (out / RUN_MARKER).exists():
                raise Pix2RepError(f"{out}: --resume needs a run folder (with {RUN_MARKER}); this one has none")
            remove_stale_temporary_files(out)  # left by a run killed mid-write
            return out
        if overwrite:
            if not (out / RUN_MARKER).exists():
                raise Pix2RepError(f"{out}: not a pix2rep run folder (no {RUN_MARKER}); refusing to delete it")
            shutil.rmtree(out)
        else:
            raise OutputExistsError(f"{out}: already exists; pass --resume to continue it or --overwrite to start again")
    elif resume:
        raise Pix2RepError(f"{out}: nothing to resume (the folder does not exist or is empty)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomically save a dict of tensors / built-in values (loadable with weights_only=True)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def versions() -> dict:
    return {"pix2rep": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


def find_checkpoint(model: str | Path, name: str = "best.pt") -> Path:
    """``-m/--model`` accepts a run folder (its ``name`` checkpoint) or a checkpoint file."""
    path = Path(model)
    if path.is_dir():
        for candidate in (name, "best.pt", "last.pt", "model.pt"):
            if (path / candidate).is_file():
                return path / candidate
        raise Pix2RepError(f"{path}: no checkpoint (best.pt, last.pt or model.pt) in this run folder")
    if not path.is_file():
        raise Pix2RepError(f"{path}: no such run folder or checkpoint file")
    return path


def load_checkpoint(model: str | Path, map_location="cpu") -> tuple[dict, Path]:
    """Load a checkpoint safely (``weights_only=True``); returns (payload, file)."""
    path = find_checkpoint(model)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for crafted files, zip errors for broken ones
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else type(exc).__name__)
        raise Pix2RepError(f"{path}: refused to load: not a plain pix2rep checkpoint ({why[:300]})") from None
    if not isinstance(payload, dict) or "config" not in payload:
        raise Pix2RepError(f"{path}: not a pix2rep checkpoint (no config inside)")
    return payload, path


def load_state(module: torch.nn.Module, state: dict, what: str, path: Path) -> None:
    """``load_state_dict`` with a clear message listing mismatched keys."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        own = module.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        raise Pix2RepError(
            f"{path}: the {what} weights do not match the configured architecture "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}, shape differs {shape[:5]}{'...' if len(shape) > 5 else ''})"
        ) from exc


def config_from_checkpoint(payload: dict) -> RunConfig:
    return RunConfig.from_dict(payload["config"])


class MetricsLog:
    """A CSV file with one row per epoch, rewritten atomically (resumable runs keep rows)."""

    def __init__(self, path: Path, columns: Iterable[str]):
        self.path = Path(path)
        self.columns = list(columns)
        self.rows: list[dict] = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = [dict(r) for r in csv.DictReader(f)]

    def truncate(self, n_epochs: int) -> None:
        """Forget rows after epoch ``n_epochs`` (when resuming from an older checkpoint)."""
        self.rows = [r for r in self.rows if int(r["epoch"]) <= n_epochs]

    def append(self, row: dict) -> None:
        self.rows.append({k: row.get(k, "") for k in self.columns})
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_bytes(self.path, buf.getvalue().encode())


def plot_curves(rows: list[dict], out_png: Path, columns: tuple[str, ...], title: str, ylabel: str = "loss") -> None:
    """Line plot of some metric columns against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    epochs = [int(r["epoch"]) for r in rows]
    for col in columns:
        pts = [(e, float(r[col])) for e, r in zip(epochs, rows) if r.get(col) not in ("", None)]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=col)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out_png)


def optional_float(x) -> Optional[float]:
    return None if x in ("", None) else float(x)
