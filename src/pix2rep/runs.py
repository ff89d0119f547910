"""Run folders and what every run writes into them: the metrics CSV and its curves."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Iterable, Optional

from .atomic import atomic_write_bytes, remove_stale_temporary_files, save_figure
from .errors import OutputExistsError, Pix2RepError

RUN_MARKER = "config.yaml"


def check_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse ``out`` unless it is new or empty, or ``resume``/``overwrite`` allows it; change nothing.

    Called before long work (loading data), so that a refusal comes at once.
    """
    out = Path(out)
    if resume and overwrite:
        raise Pix2RepError("give --resume or --overwrite, not both")
    if out.exists() and any(out.iterdir()):
        if (resume or overwrite) and not (out / RUN_MARKER).exists():
            what = "--resume needs a run folder" if resume else "not a pix2rep run folder"
            raise Pix2RepError(f"{out}: {what} (no {RUN_MARKER}); refusing to {'continue' if resume else 'delete'} it")
        if not (resume or overwrite):
            raise OutputExistsError(f"{out}: already exists; pass --resume to continue it or --overwrite to start again")
    elif resume:
        raise Pix2RepError(f"{out}: nothing to resume (the folder does not exist or is empty)")
    return out


def check_output_file(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse to replace an existing output file unless ``overwrite``; returns ``path`` as a Path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists; pass --overwrite to replace it")
    return path


def prepare_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Create ``out``; refuse an existing non-empty folder unless resuming or overwriting.

    ``overwrite`` only deletes a folder that is a pix2rep run (it holds config.yaml), so a
    typo can never wipe unrelated files.
    """
    out = check_run_dir(out, resume, overwrite)
    if out.exists() and any(out.iterdir()):
        if resume:
            remove_stale_temporary_files(out)  # left by a run killed mid-write
            return out
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


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
