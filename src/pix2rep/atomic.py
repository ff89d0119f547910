"""Crash-safe file writes: temporary file in the same folder, fsync, rename.

A run killed mid-write, or a disk that fills up, leaves the previous version of the file (or no
file) in place, never a truncated one. Every file pix2rep writes goes through here.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from .errors import Pix2RepError


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` when the block succeeds.

    The temporary name keeps the file's suffixes (``.nii.gz``, ``.png``), so writers that infer
    the format from the name work unchanged. On any error the temporary file is removed and
    ``path`` is untouched; an OSError (disk full, permissions) becomes a Pix2RepError naming it.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            why = "no space left on the device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise Pix2RepError(f"{path}: could not write ({why}); any previous version is left intact") from exc
        raise


def remove_stale_temporary_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files under ``folder`` that a killed process left; return them.

    A SIGKILL between writing a temporary file and renaming it leaves ``.tmp-PID-name`` behind.
    Only files whose process is gone are removed: several processes may fill one study folder."""
    removed = []
    for tmp in Path(folder).rglob(".tmp-*"):
        pid = tmp.name.split("-")[1]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def save_figure(fig, path: str | Path, **kwargs) -> None:
    """``fig.savefig`` through a temporary file; closes the figure."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, **kwargs)
    finally:
        plt.close(fig)
