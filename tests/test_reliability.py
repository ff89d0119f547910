"""Reliability: crash-safe writes, kill and resume, determinism, fuzzed inputs, bounded memory."""

from __future__ import annotations

import csv
import errno
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pix2rep.atomic import atomic_write_bytes
from pix2rep.cli import main
from pix2rep.errors import DataError, Pix2RepError
from pix2rep.runs import MetricsLog
from pix2rep.checkpoints import load_checkpoint, save_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cli(args: list[str], env_cache: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "PIX2REP_CACHE": str(env_cache)}
    return subprocess.Popen([sys.executable, "-m", "pix2rep", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _no_temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".tmp-")]


# -- disk full ------------------------------------------------------------------------------------


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"config": {}, "epoch": 1, "w": torch.ones(3)})
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")  # the device fills up after a few bytes
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(Pix2RepError, match="no space left on the device.*previous version is left intact"):
        save_checkpoint(path, {"config": {}, "epoch": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    payload, _ = load_checkpoint(path)
    assert payload["epoch"] == 1 and payload["w"].tolist() == [1.0, 1.0, 1.0]
    assert _no_temporary_files(tmp_path) == []


def test_disk_full_during_a_metrics_write_keeps_the_previous_rows(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path / "metrics.csv", ["epoch", "loss"])
    log.append({"epoch": 1, "loss": 0.5})
    before = (tmp_path / "metrics.csv").read_bytes()

    class FullFile:
        def __init__(self, *a, **k):
            self.f = open(*a, **k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:5])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pix2rep.atomic.open", FullFile, raising=False)
    with pytest.raises(Pix2RepError, match="metrics.csv: could not write"):
        log.append({"epoch": 2, "loss": 0.4})
    monkeypatch.undo()
    assert (tmp_path / "metrics.csv").read_bytes() == before
    assert _no_temporary_files(tmp_path) == []
    atomic_write_bytes(tmp_path / "metrics.csv", b"epoch,loss\n")  # and the folder is still writable
    assert (tmp_path / "metrics.csv").read_bytes() == b"epoch,loss\n"


# -- kill and resume ------------------------------------------------------------------------------


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path))) if path.exists() else []


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill:\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


@pytest.mark.slow
def test_pretraining_killed_with_sigkill_resumes_from_the_last_checkpoint(synthetic_root, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(synthetic_root), "--preset", "tiny", "--epochs", "3", "--out", str(out), "--no-progress"]
    proc = _cli(args, tmp_path / "cache")
    _wait_for(lambda: len(_rows(out / "metrics.csv")) >= 1, proc)
    time.sleep(random.Random(0).uniform(0.0, 1.0))  # somewhere inside epoch 2 (or while it saves)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(_rows(out / "metrics.csv"))
    assert done_at_kill >= 1

    resumed = _cli(args[:-3] + ["--out", str(out), "--no-progress", "--resume"], tmp_path / "cache")
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    resumed_after = int(log.split("resuming after epoch ")[1].split()[0])
    assert resumed_after >= done_at_kill  # at most the epoch in progress is lost
    assert [r["epoch"] for r in _rows(out / "metrics.csv")] == ["1", "2", "3"]
    last, _ = load_checkpoint(out / "last.pt")
    best, _ = load_checkpoint(out / "best.pt")
    assert last["epoch"] == 3 and 1 <= best["epoch"] <= 3
    assert _no_temporary_files(out) == []


def test_resume_removes_temporary_files_of_dead_processes_only(tmp_path):
    from pix2rep.runs import prepare_run_dir

    run = prepare_run_dir(tmp_path / "run")
    (run / "config.yaml").write_text("{}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = run / "cells" / f".tmp-{dead.pid}-baseline-N1-s0.json"  # a run killed mid-write left it
    live = run / f".tmp-{os.getpid()}-REPORT.md"  # a sibling process writing right now
    stale.parent.mkdir()
    stale.write_text("{")
    live.write_text("#")
    prepare_run_dir(run, resume=True)
    assert not stale.exists() and live.exists()


@pytest.mark.slow
def test_benchmark_killed_with_sigkill_never_recomputes_a_finished_cell(synthetic_root, tmp_path):
    from pix2rep.data.synthetic import write_synthetic_dataset

    held_out = write_synthetic_dataset(tmp_path / "eval", n_patients=2, seed=5)
    out = tmp_path / "study"
    args = ["benchmark", "--data", str(synthetic_root), "--eval-data", str(held_out), "--preset", "tiny", "--epochs", "1",
            "--methods", "baseline,pix2rep-lp", "--n", "1,2", "--seeds", "0", "--no-full-pool", "--steps", "15",
            "--out", str(out), "--no-progress"]
    proc = _cli(args, tmp_path / "cache")
    _wait_for(lambda: len(list((out / "cells").glob("*.json"))) >= 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    for p in (out / "cells").glob("*.json"):
        json.loads(p.read_text())  # every stored cell is complete

    resumed = _cli(args + ["--resume"], tmp_path / "cache")
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    cells = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert len(cells) == 4
    assert all(cells[name] == mtime for name, mtime in finished.items())
    report = (out / "REPORT.md").read_text()
    assert "continued with" in report and "SYNTHETIC" in report
    # each invocation records the commit it ran (a resume may run later code)
    invocations = [json.loads(line) for line in (out / "invocations.jsonl").read_text().splitlines()]
    assert len(invocations) == 2 and all(inv["commit"] for inv in invocations)
    assert f"commit `{invocations[1]['commit']}`" in report
    assert _no_temporary_files(out) == []


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _finished_cells(study: Path) -> dict[str, int]:
    """Stored cells (not the temporary files of a write in progress) and their modification times."""
    return {p.name: p.stat().st_mtime_ns for p in (study / "cells").glob("*.json") if not p.name.startswith(".tmp-")}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a process's children from Linux's /proc")
def test_a_study_stopped_with_sigterm_ends_its_worker_processes_and_keeps_their_cells(synthetic_root, tmp_path):
    from pix2rep.data.synthetic import write_synthetic_dataset

    held_out = write_synthetic_dataset(tmp_path / "eval", n_patients=2, seed=5)
    out = tmp_path / "study"
    args = ["benchmark", "--data", str(synthetic_root), "--eval-data", str(held_out), "--preset", "tiny",
            "--methods", "baseline", "--n", "1,2", "--seeds", "0,1", "--no-full-pool", "--steps", "20",
            "--set", "study.workers=2", "--out", str(out), "--no-progress"]
    proc = _cli(args, tmp_path / "cache")
    _wait_for(lambda: len(_children(proc.pid)) >= 2, proc)  # the two workers (and multiprocessing's helpers)
    _wait_for(lambda: len(_finished_cells(out)) >= 1, proc)
    children = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, log
    deadline = time.time() + 15.0  # multiprocessing's resource tracker exits after the study's process, on its own
    while any(_alive(pid) for pid in children) and time.time() < deadline:
        time.sleep(0.1)
    assert [pid for pid in children if _alive(pid)] == [], log
    finished = _finished_cells(out)
    assert 1 <= len(finished) < 4

    resumed = _cli(args + ["--resume"], tmp_path / "cache")
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    cells = _finished_cells(out)
    assert sorted(cells) == ["baseline-N1-s0.json", "baseline-N1-s1.json", "baseline-N2-s0.json", "baseline-N2-s1.json"]
    assert all(cells[name] == mtime for name, mtime in finished.items())
    assert _no_temporary_files(out) == []


# -- determinism ----------------------------------------------------------------------------------

TIMING_COLUMNS = {"samples_per_s", "seconds"}


@pytest.mark.slow
def test_the_same_command_twice_gives_bit_identical_metrics(synthetic_root, tmp_path):
    for run in ("a", "b"):
        assert main(["pretrain", "--data", str(synthetic_root), "--preset", "tiny", "--epochs", "1",
                     "--out", str(tmp_path / run / "pre"), "--no-progress"]) == 0
        assert main(["finetune", "--data", str(synthetic_root), "-m", str(tmp_path / run / "pre"), "--patients", "2",
                     "--seed", "1", "--steps", "20", "--out", str(tmp_path / run / "ft"), "--no-progress"]) == 0
        assert main(["evaluate", "--data", str(synthetic_root), "-m", str(tmp_path / run / "ft"),
                     "--out", str(tmp_path / run / "eval")]) == 0
    for rel in ("pre/metrics.csv", "ft/metrics.csv", "eval/per_case.csv"):
        a, b = _rows(tmp_path / "a" / rel), _rows(tmp_path / "b" / rel)
        assert len(a) == len(b) > 0, rel
        for ra, rb in zip(a, b):
            for column in set(ra) - TIMING_COLUMNS:
                assert ra[column] == rb[column], (rel, column)


# -- numerics -------------------------------------------------------------------------------------


def test_a_non_finite_loss_stops_pretraining_naming_epoch_and_step(synthetic_root, tmp_path, monkeypatch, capsys):
    import pix2rep.training.pretrain as pretrain_module

    out = tmp_path / "pre"
    real = pretrain_module.pretrain_loss

    def loss_that_explodes_in_epoch_2(*args, **kwargs):
        loss = real(*args, **kwargs)
        training = args[0].training  # the backbone: validation runs in eval mode
        return loss * float("nan") if training and (out / "last.pt").exists() else loss

    monkeypatch.setattr(pretrain_module, "pretrain_loss", loss_that_explodes_in_epoch_2)
    code = main(["pretrain", "--data", str(synthetic_root), "--preset", "tiny", "--epochs", "3", "--out", str(out), "--no-progress"])
    assert code != 0
    assert "non-finite loss (nan) at epoch 2, step 1" in capsys.readouterr().err
    last, _ = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 1  # the last good checkpoint is kept
    assert [r["epoch"] for r in _rows(out / "metrics.csv")] == ["1"]


def test_gradient_clipping_is_a_config_option():
    from pix2rep.config import DownstreamConfig, PretrainConfig

    assert PretrainConfig(grad_clip=1.0).grad_clip == 1.0 and DownstreamConfig().grad_clip is None
    with pytest.raises(ValueError, match="grad_clip must be a positive number"):
        PretrainConfig(grad_clip=0.0)


# -- fuzzed inputs --------------------------------------------------------------------------------


def _mutations(data: bytes, rng: random.Random, n: int) -> list[tuple[str, bytes]]:
    """Truncations, garbled bytes and adversarial header values of one valid file."""
    cases = [("empty", b""), ("one byte", data[:1]), ("header only", data[:348]), ("half", data[: len(data) // 2]),
             ("one byte short", data[:-1])]
    for k in range(n):
        garbled = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            garbled[rng.randrange(0, min(len(garbled), 352))] = rng.randrange(256)
        cases.append((f"garbled header {k}", bytes(garbled)))
    for offset, value in ((40, np.array([3, -5, 64, 64, 1, 1, 1, 1], np.int16)),  # negative dimension
                          (40, np.array([3, 30000, 30000, 30000, 1, 1, 1, 1], np.int16)),  # absurdly large
                          (70, np.array([255], np.int16)),  # unknown datatype
                          (76, np.array([1, np.nan, np.inf, 0, 1, 1, 1, 1], np.float32))):  # NaN / Inf / 0 spacing
        adversarial = bytearray(data)
        raw = value.tobytes()
        adversarial[offset : offset + len(raw)] = raw
        cases.append((f"header field at byte {offset} set to {value.tolist()}", bytes(adversarial)))
    return cases


class _Timeout(Exception):
    pass


def _within(seconds: int):
    def handler(signum, frame):
        raise _Timeout()

    signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)


def _read_never_crashes(read, path: Path, what: str) -> None:
    _within(20)
    try:
        read(path)
    except DataError as exc:
        assert str(path.name) in str(exc) or str(path.parent.name) in str(exc), (what, str(exc))
    except _Timeout:
        raise AssertionError(f"{what}: the reader hung")
    except Exception as exc:  # anything else is a crash
        raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from exc
    finally:
        signal.alarm(0)


def test_fuzzed_nifti_files_end_in_a_clear_data_error(tmp_path):
    from pix2rep.data.nifti import read_nifti_volume

    rng = np.random.default_rng(0)
    image = nib.Nifti1Image(rng.integers(0, 500, (32, 32, 6)).astype(np.int16), np.diag([1.5, 1.5, 8.0, 1.0]))
    valid = tmp_path / "valid.nii"
    nib.save(image, str(valid))
    data = valid.read_bytes()
    for k, (what, blob) in enumerate(_mutations(data, random.Random(0), 40)):
        for suffix, payload in ((".nii", blob), (".nii.gz", gzip.compress(blob))):
            path = tmp_path / f"case{k:03d}{suffix}"
            path.write_bytes(payload)
            _read_never_crashes(read_nifti_volume, path, f"{what} ({suffix})")
    broken_gzip = tmp_path / "broken.nii.gz"
    broken_gzip.write_bytes(gzip.compress(data)[:-20])
    _read_never_crashes(read_nifti_volume, broken_gzip, "truncated gzip stream")


def test_fuzzed_info_cfg_files_end_in_a_clear_data_error(tmp_path, synthetic_root):
    import shutil

    from pix2rep.data.acdc import read_acdc_patient

    source = synthetic_root / "patient001"
    text = (source / "Info.cfg").read_text()
    rng = random.Random(1)
    variants = ["", "\x00\xff\xfe garbage", text.replace("ED:", "EX:"), text.replace("ES: ", "ES: twelve "),
                text.replace("ED: ", "ED: -4 "), text.replace("ED: ", "ED: 999"), "ED ES Group\n" * 50]
    variants += ["".join(rng.choice([c, chr(rng.randrange(32, 127))]) for c in text) for _ in range(20)]
    for k, content in enumerate(variants):
        folder = tmp_path / f"case{k:02d}" / "patient001"
        shutil.copytree(source, folder)
        (folder / "Info.cfg").write_text(content, errors="ignore")
        _read_never_crashes(read_acdc_patient, folder, f"Info.cfg variant {k}")


def test_fuzzed_dicom_files_end_in_a_clear_data_error(tmp_path):
    import shutil

    from test_dicom import write_series

    from pix2rep.data.dicom import read_dicom_folder

    source = tmp_path / "valid"
    write_series(source, n_phases=2, n_slices=4)
    files = sorted(p for p in source.rglob("IM*") if p.is_file())
    rng = random.Random(2)
    for k in range(30):
        case = tmp_path / f"case{k:02d}"
        shutil.copytree(source, case)
        victim = case / files[rng.randrange(len(files))].relative_to(source)
        data = bytearray(victim.read_bytes())
        if k % 3 == 0:
            data = data[: rng.randrange(0, len(data))]  # truncated
        else:
            for _ in range(rng.randint(1, 30)):  # garbled, mostly in the header
                data[rng.randrange(128, min(len(data), 800 if k % 3 == 1 else len(data)))] = rng.randrange(256)
        victim.write_bytes(bytes(data))
        _read_never_crashes(read_dicom_folder, case, f"DICOM case {k} ({victim.name})")


# -- bounded memory -------------------------------------------------------------------------------

MEMORY_PROBE = r"""
import resource, sys
from pix2rep.cli import main
code = main(["predict", "-i", sys.argv[1], "-o", sys.argv[2], "-m", sys.argv[3]])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "CODE", code)
"""


@pytest.mark.slow
def test_predict_over_200_volumes_keeps_memory_bounded(tmp_path):
    from pix2rep.config import preset_config
    from pix2rep.models import SegmentationModel, UNet
    from pix2rep.training.downstream import save_segmentation_checkpoint

    cfg = preset_config("tiny")
    torch.manual_seed(0)
    model_path = tmp_path / "model.pt"
    save_segmentation_checkpoint(model_path, SegmentationModel(UNet(cfg.model), cfg.model.num_classes), cfg, {})
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 800, (192, 192, 8)).astype(np.int16)  # 1.2 MB as float32 in memory
    affine = np.diag([1.4, 1.4, 10.0, 1.0])
    peaks = {}
    for n in (20, 200):
        folder = tmp_path / f"in{n}"
        folder.mkdir()
        for k in range(n):
            nib.save(nib.Nifti1Image(volume, affine), str(folder / f"case{k:03d}.nii"))
        env = {**os.environ, "PYTHONPATH": SRC, "PIX2REP_CACHE": str(tmp_path / "cache")}
        res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder), str(tmp_path / f"out{n}"), str(model_path)],
                             env=env, capture_output=True, text=True, timeout=900)
        assert "CODE 0" in res.stdout, res.stdout + res.stderr
        peaks[n] = int(res.stdout.split("PEAK_KB")[1].split()[0]) / 1024
        assert len(list((tmp_path / f"out{n}").glob("*.nii.gz"))) == n
    # holding 200 volumes (images, probabilities, labels) would add several hundred MB
    assert peaks[200] - peaks[20] < 100, peaks
