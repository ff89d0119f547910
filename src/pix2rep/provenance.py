"""Where a result came from: package versions, the code's commit, the machine, the command lines.

Every run folder and every study cell records these, so that a number can be traced to the
code and the machine that produced it (and a report rebuilt elsewhere never misnames them).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import __version__


def versions() -> dict:
    return {"pix2rep": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


def git_commit() -> str:
    """The short commit of the code that runs, marked when the tree has uncommitted changes.

    Outside a git checkout (a copied tree, an sdist) the commit comes from ``PIX2REP_GIT_COMMIT``
    when whoever copied the tree set it, else it is "unknown"."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except Exception:
        commit, dirty = "", ""
    if not commit:
        given = os.environ.get("PIX2REP_GIT_COMMIT", "").strip()
        return f"{given} (PIX2REP_GIT_COMMIT; not a git checkout)" if given else "unknown"
    return commit + (" (with uncommitted changes)" if dirty else "")


def cpu_model_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_meta(device=None) -> dict:
    """Where the study runs: the CPU, and the GPU when ``device`` is a CUDA device."""
    host = f"{cpu_model_name()}, {os.cpu_count()} cores, {platform.system()}"
    device = torch.device(device) if device is not None else torch.device("cpu")
    machine = f"{torch.cuda.get_device_name(device)} GPU; host {host}" if device.type == "cuda" else host
    return {"machine": machine, "torch": str(torch.__version__), "version": __version__, "commit": git_commit(),
            "command": "pix2rep " + " ".join(sys.argv[1:])}


def log_invocation(out: Path) -> None:
    """Append this command line and the code's commit to ``invocations.jsonl``: the report names the
    first, and any resumes (which may run a later commit)."""
    entry = {"command": "pix2rep " + " ".join(sys.argv[1:]), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
             "commit": git_commit()}
    with open(out / "invocations.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def read_invocations(out: Path) -> list[dict]:
    path = out / "invocations.jsonl"
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:  # a run killed while appending leaves at most one broken last line
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return entries
