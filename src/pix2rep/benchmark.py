"""The label-efficiency study: Dice versus number of annotated patients, per method.

Grid (``RunConfig.study``, a :class:`~pix2rep.config.StudyPlan`): methods x N annotated
patients (stratified, nested) x seeds. Each finished cell (method, N, seed) is stored
atomically as ``cells/<method>-N<n>-s<seed>.json`` and never recomputed on ``--resume``. Every
method gets the same downstream budget (steps, batch size, stopping rule); only learning rates
differ, as METHOD section 5 prescribes. Statistics and the report: :mod:`pix2rep.evaluation.study`.

Running the study is training: this module calls the two training entry points
(:func:`~pix2rep.training.pretrain.pretrain`, :func:`~pix2rep.training.downstream.train_segmentation`)
and nothing else of training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .atomic import atomic_write_bytes
from .checkpoints import PretrainedBackbone, load_checkpoint, load_pretrained_backbone_weights
from .config import RunConfig
from .data.dataset import PreparedPatient, load_patients
from .data.sampling import sample_few_shot_patients, split_development
from .data.synthetic import is_synthetic_dataset
from .errors import ConfigError, Pix2RepError
from .evaluation.evaluate import evaluate_patients
from .evaluation.study import load_cells, write_report
from .provenance import log_invocation, machine_meta
from .runs import check_run_dir, prepare_run_dir
from .runtime import resolve_device
from .speed import fit_model_size_for_run
from .training.downstream import cells_at_once_refusal, train_segmentation, train_segmentation_cells
from .training.pretrain import pretrain

# method name -> (downstream mode, the pretraining it starts from, or None for a random start)
METHODS: dict[str, tuple[str, Optional[str]]] = {
    "baseline": ("scratch", None),
    "pix2rep-lp": ("probe", "pix2rep"),
    "pix2rep-ft": ("finetune", "pix2rep"),
    "random-lp": ("random-probe", None),
    "pix2rep-v2-lp": ("probe", "pix2rep-v2"),
    "pix2rep-v2-ft": ("finetune", "pix2rep-v2"),
    "pix2rep-mt": ("mean-teacher", "pix2rep"),
    "baseline-mt": ("mean-teacher", None),
    "simclr-lp": ("probe", "simclr"),
    "simclr-ft": ("finetune", "simclr"),
    "invariance-lp": ("probe", "invariance"),
    "invariance-ft": ("finetune", "invariance"),
}
# pretraining kind -> (its run folder inside the study folder, what changes from the preset's pretraining)
PRETRAININGS: dict[str, tuple[str, dict]] = {
    "pix2rep": ("pretrain", {}),
    "pix2rep-v2": ("pretrain-v2", {"pretrain": {"loss": "barlow"}}),
    "simclr": ("pretrain-simclr", {"pretrain": {"loss": "simclr", "batch_size": 32}}),
    "invariance": ("pretrain-invariance", {"spatial": {"enabled": False}}),
}


def pretraining_config(cfg: RunConfig, kind: str) -> RunConfig:
    """The study's configuration with the changes of one pretraining kind."""
    data = cfg.to_dict()
    for section, changes in PRETRAININGS[kind][1].items():
        data[section] = {**data[section], **changes}
    return RunConfig.from_dict(data)


def cell_name(method: str, n: int, seed: int) -> str:
    return f"{method}-N{n}-s{seed}"


def cell_config(cfg: RunConfig, method: str, n: int, seed: int, pool: Sequence[PreparedPatient]
                ) -> tuple[RunConfig, list[PreparedPatient]]:
    """The configuration of one cell (its mode, seed and steps) and its N sampled patients."""
    cell_cfg = RunConfig.from_dict(cfg.to_dict())
    cell_cfg.downstream.mode = METHODS[method][0]
    cell_cfg.downstream.seed = seed
    cell_cfg.downstream.steps = cfg.study.steps_for(n, cfg.downstream.steps)
    chosen = sample_few_shot_patients(pool, n, seed)
    cell_cfg.patients = [p.id for p in chosen]
    return cell_cfg, chosen


def evaluated_cell(cfg: RunConfig, method: str, n: int, seed: int, patients: list[str], model, steps: int,
                   train_seconds: float, evaluation: Sequence[PreparedPatient]) -> dict:
    """A trained cell's JSON payload: its Dice and clinical rows on the evaluation patients."""
    t0 = time.time()
    rows, clinical_rows, _ = evaluate_patients(model, evaluation, resolve_device(cfg.device), cfg.bf16,
                                               postprocess=cfg.downstream.postprocess)
    return {"method": method, "n": n, "seed": seed, "patients": patients, "train_seconds": train_seconds,
            "eval_seconds": time.time() - t0, "steps": steps, "rows": rows, "clinical": clinical_rows}


def run_cell(
    cfg: RunConfig,
    method: str,
    n: int,
    seed: int,
    pool: Sequence[PreparedPatient],
    evaluation: Sequence[PreparedPatient],
    backbones: dict[str, tuple[dict, list[str]]],
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Train one method on N sampled patients and evaluate it: the cell's JSON payload.

    ``backbones`` maps a pretraining kind to (backbone state, pretrained name prefixes).
    Mean Teacher methods use the whole pool, unlabeled, as their unlabeled set."""
    mode, kind = METHODS[method]
    state, prefixes = backbones[kind] if kind else (None, None)
    cell_cfg, chosen = cell_config(cfg, method, n, seed, pool)
    t0 = time.time()
    model, summary = train_segmentation(
        cell_cfg, chosen, None, backbone_state=state, progress=progress, log=log, pretrained_prefixes=prefixes,
        unlabeled_patients=pool if mode == "mean-teacher" else (),
    )
    return evaluated_cell(cfg, method, n, seed, cell_cfg.patients, model, summary["steps"], time.time() - t0, evaluation)


def run_cells_at_once(cfg: RunConfig, method: str, n: int, seeds: Sequence[int], pool: Sequence[PreparedPatient],
                      evaluation: Sequence[PreparedPatient], backbones: dict[str, tuple[dict, list[str]]],
                      progress: bool = False) -> list[dict]:
    """The cells of ``seeds`` for one method and N, trained together
    (:func:`~pix2rep.training.downstream.train_segmentation_cells`) and evaluated one by one.
    Each cell's ``train_seconds`` is its share of the joint training; ``trained_with`` says how
    many cells shared it."""
    kind = METHODS[method][1]
    state, prefixes = backbones[kind] if kind else (None, None)
    configs = [cell_config(cfg, method, n, seed, pool) for seed in seeds]
    t0 = time.time()
    trained = train_segmentation_cells(configs[0][0], [(seed, chosen) for seed, (_, chosen) in zip(seeds, configs)],
                                       state, progress=progress, pretrained_prefixes=prefixes)
    share = (time.time() - t0) / len(seeds)
    return [{**evaluated_cell(cfg, method, n, seed, cell_cfg.patients, model, summary["steps"], share, evaluation),
             "trained_with": len(seeds)}
            for seed, (cell_cfg, _), (model, summary) in zip(seeds, configs, trained)]


_WORKER: dict = {}  # in a worker process of run_groups: what its cells train from (set by _start_worker)


def _start_worker(threads: int, cfg: RunConfig, pool, evaluation, backbones) -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the study's process, which ends its workers
    torch.set_num_threads(threads)
    _WORKER.update(cfg=cfg, pool=pool, evaluation=evaluation, backbones=backbones, progress=False, log=_quiet)


def _quiet(*_args, **_kwargs) -> None:
    pass


def _run_group(group: list[tuple[str, int, int]], cfg: RunConfig, pool, evaluation, backbones, progress: bool,
               log: Callable[[str], None]) -> list[dict]:
    """The cells of one group (one seed, or cells_at_once seeds of one method and N), trained and evaluated."""
    m, n = group[0][:2]
    if len(group) == 1:
        return [run_cell(cfg, m, n, group[0][2], pool, evaluation, backbones, progress=progress, log=log)]
    return run_cells_at_once(cfg, m, n, [s for _, _, s in group], pool, evaluation, backbones, progress=progress)


def _run_group_in_worker(group: list[tuple[str, int, int]]) -> list[dict]:
    return _run_group(group, **_WORKER)


def run_groups(groups: list[list[tuple[str, int, int]]], cfg: RunConfig, pool: Sequence[PreparedPatient],
               evaluation: Sequence[PreparedPatient], backbones: dict, workers: int, progress: bool,
               log: Callable[[str], None]) -> Iterator[list[dict]]:
    """The cells of each group, as the groups finish: in this process one after the other, or
    in ``workers`` processes (spawned, each with 1/workers of this process's threads), in the
    order they finish. Closing the iterator (an error, an interrupt) ends the workers at once;
    what finished was yielded."""
    if workers == 1 or len(groups) == 1:
        for group in groups:
            yield _run_group(group, cfg, pool, evaluation, backbones, progress, log)
        return
    import torch

    workers = min(workers, len(groups))
    threads = max(1, torch.get_num_threads() // workers)
    with multiprocessing.get_context("spawn").Pool(workers, _start_worker,
                                                   (threads, cfg, list(pool), list(evaluation), backbones)) as processes:
        yield from processes.imap_unordered(_run_group_in_worker, groups)  # an early exit terminates them
        processes.close()  # all done: let the workers exit on their own (terminating them could leak a semaphore)
        processes.join()


def _cell_groups(grid: list[tuple[str, int, int]], cells_dir: Path, at_once: int, cfg: RunConfig
                 ) -> list[list[tuple[str, int, int]]]:
    """The grid's missing cells in the order they run: one at a time, or, with ``at_once`` > 1
    and a mode that can, up to ``at_once`` seeds of one (method, N) together, placed where the
    first of them stood in the grid."""
    missing = [cell for cell in grid if not (cells_dir / f"{cell_name(*cell)}.json").exists()]
    groupable = {m for m in {cell[0] for cell in missing} if at_once > 1 and cells_at_once_refusal(
        dataclasses.replace(cfg, downstream=dataclasses.replace(cfg.downstream, mode=METHODS[m][0]))) is None}
    groups: dict[tuple, list] = {}
    for m, n, s in missing:
        together = m in groupable
        key = (m, n) if together else (m, n, s)
        if key in groups and len(groups[key][-1]) < at_once:
            groups[key][-1].append((m, n, s))
        else:
            groups.setdefault(key, []).append([(m, n, s)])
    return sorted((g for chunks in groups.values() for g in chunks), key=lambda g: missing.index(g[0]))


def check_no_evaluation_leak(weights: PretrainedBackbone, evaluation: Sequence[PreparedPatient], eval_root: Path) -> None:
    """Refuse a pretrained backbone that saw the study's evaluation patients.

    Pretraining uses no labels, but images of the evaluation patients seen in pretraining still
    inflate the study's figures. The checkpoint names its pretraining patients (or, before it
    did, its data folder and split); an overlap with the evaluation patients of the same
    dataset is refused, saying which."""
    recorded, _, split = weights.config.data.partition(" [")
    same_data = bool(recorded) and Path(recorded).resolve() == Path(eval_root).resolve()
    eval_ids = {p.id for p in evaluation}
    if weights.patients:
        leaked = sorted(eval_ids & set(weights.patients)) if same_data else []
    else:
        leaked = sorted(eval_ids) if same_data and split.rstrip("]") in ("", "all") else []
    if leaked:
        raise Pix2RepError(
            f"{weights.path}: pretrained on {len(leaked)} of this study's evaluation patients "
            f"({', '.join(leaked[:4])}{', ...' if len(leaked) > 4 else ''}) of {recorded}; its figures would be "
            "inflated. Pretrain on the pool only (`pix2rep pretrain --split dev-pool`), or let the study pretrain")


def run_study(cfg: RunConfig, data: str | Path, out: str | Path, *, model: Optional[str] = None, resume: bool = False,
              overwrite: bool = False, report_only: bool = False, cache=None, progress: bool = True,
              log: Callable[[str], None] = print) -> Path:
    """Run, continue (``resume``) or only re-report (``report_only``) the study of ``cfg.study`` on
    ``data``; write cells, REPORT.md, runs.csv, dice_vs_n.png, summary.json and config.yaml (which
    reruns it) into ``out``. ``model`` stands for the Pix2Rep pretraining."""
    plan = cfg.study
    unknown = [m for m in plan.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    if report_only and overwrite:
        raise ConfigError("--report-only rewrites the report of an existing study; it cannot take --overwrite")
    check_run_dir(out, resume or report_only, overwrite)
    cfg = RunConfig.from_dict(cfg.to_dict())  # the caller's stays as given
    backbones: dict = {}  # pretraining kind -> (backbone state, pretrained name prefixes)
    weights = load_pretrained_backbone_weights(model) if model else None
    if weights is not None:
        cfg.model, cfg.preprocess = weights.config.model, weights.config.preprocess
        cfg.pretrain.fit_sizes = ()  # the model is the given one's
        backbones["pix2rep"] = (weights.state, weights.prefixes)
        cfg.pretrained = str(weights.path.resolve())
    t_start = time.time()
    stage_seconds = {}
    patients = load_patients(data, cfg, cache, log=log)
    if plan.eval_data:
        pool, evaluation, eval_root = patients, load_patients(plan.eval_data, cfg, cache, log=log), plan.eval_data
        eval_desc = f"`{plan.eval_data}` ({len(evaluation)} patients)"
    else:
        (pool, evaluation), eval_root = split_development(patients), data
        if not evaluation:
            raise Pix2RepError(f"{data}: not the ACDC training set (no development patients); pass --eval-data")
        eval_desc = "the 20 held-out ACDC development patients (ED and ES)"
    if weights is not None:
        check_no_evaluation_leak(weights, evaluation, Path(eval_root))
    stage_seconds["data preparation (this invocation)"] = time.time() - t_start
    if weights is None:  # the baseline trains the model that pretraining will: fit it first
        cfg = fit_model_size_for_run(cfg, pool, out, resume or report_only, log)
    out = prepare_run_dir(out, resume or report_only, overwrite)
    log_invocation(out)
    cfg.data = str(Path(data).resolve())
    cfg.save(out / "config.yaml")
    cells_dir = out / "cells"
    cells_dir.mkdir(exist_ok=True)
    grid = [(m, n, s) for n in plan.n for s in plan.seeds_for(n) for m in plan.methods if n <= len(pool)]
    if plan.full_pool and len(pool) not in plan.n:
        grid += [(m, len(pool), plan.seeds[0]) for m in plan.methods]
    # Methods run grouped by the pretraining they start from, each pretraining just before its
    # first missing cell: an interrupted study keeps whole methods, and a resume whose cells all
    # exist pretrains nothing.
    grid.sort(key=lambda cell: -1 if METHODS[cell[0]][1] is None else list(PRETRAININGS).index(METHODS[cell[0]][1]))

    def pretrain_for_study(kind: str) -> tuple[dict, list[str]]:
        t0 = time.time()
        pre_dir = out / PRETRAININGS[kind][0]
        pre_dir.mkdir(exist_ok=True)
        log(f"pretraining: {kind} -> {pre_dir}")
        # pretrain() itself knows when a resumed run has nothing left to do (epochs or time spent)
        pretrain(pretraining_config(cfg, kind), pool, pre_dir, resume=(pre_dir / "last.pt").exists(), progress=progress, log=log)
        payload, _ = load_checkpoint(pre_dir / "best.pt")
        stage_seconds[f"pretraining {kind} (this invocation)"] = time.time() - t0
        return payload["backbone"], payload.get("pretrained_prefixes", [""])

    # --report-only trains nothing, so it runs anywhere: a GPU study's report can be rebuilt on a laptop
    device = None if report_only else resolve_device(cfg.device)
    meta = {**machine_meta(device), "data": cfg.data, "evaluation": eval_desc, "protocol": cfg.preprocess.protocol,
            "preset": cfg.preset, "pool_size": len(pool), "planned_seeds": Counter((m, n) for m, n, _ in grid),
            "pretraining_folders": {kind: folder for kind, (folder, _) in PRETRAININGS.items()},
            "budget": (f"{cfg.downstream.steps} optimiser steps" if not cfg.study.steps_by_n else
                       "optimiser steps by N (" + ", ".join(f"{v} from N = {k}" for k, v in cfg.study.steps_by_n) + ")")
                      + f" of batch {cfg.downstream.batch_size} for every method, learning rates "
                      f"{cfg.downstream.lr_schedule}, rule {cfg.downstream.stopping}, loss {cfg.downstream.loss}"}
    synthetic = is_synthetic_dataset(data)
    grid_seconds = 0.0
    groups = [] if report_only else _cell_groups(grid, cells_dir, plan.cells_at_once, cfg)

    def record(cells: list[dict]) -> None:
        for cell in cells:
            m, n = cell["method"], cell["n"]
            cell.update({key: meta[key] for key in ("machine", "torch", "commit")})  # where it ran, for the report
            if plan.workers > 1:
                cell["workers"] = plan.workers  # its train_seconds overlap other cells'
            atomic_write_bytes(cells_dir / f"{cell_name(m, n, cell['seed'])}.json", json.dumps(cell).encode())
            log(f"[{grid.index((m, n, cell['seed'])) + 1}/{len(grid)}] {cell_name(m, n, cell['seed'])}: Dice "
                f"{np.mean([r['dice_mean'] for r in cell['rows']]):.3f} ({cell['train_seconds']:.0f} s training"
                + (f", {len(cells)} cells at once)" if len(cells) > 1 else ")"))

    # the groups of one pretraining kind are consecutive (the grid is sorted by kind)
    for kind, kind_groups in itertools.groupby(groups, key=lambda group: METHODS[group[0][0]][1]):
        if kind is not None and kind not in backbones:
            backbones[kind] = pretrain_for_study(kind)
        t0 = time.time()
        # closed on any exit (an error, an interrupt), which ends the worker processes at once
        # (a generator left by an exception is otherwise closed only when it is collected)
        with contextlib.closing(run_groups(list(kind_groups), cfg, pool, evaluation, backbones, plan.workers,
                                           progress, log)) as finished:
            for cells in finished:
                record(cells)
                stage_seconds["downstream grid (this invocation)"] = grid_seconds + time.time() - t0
                write_report(out, load_cells(cells_dir), {**meta, "stage_seconds": stage_seconds}, synthetic)
        grid_seconds += time.time() - t0
    stage_seconds["downstream grid (this invocation)"] = grid_seconds
    summary = write_report(out, load_cells(cells_dir), {**meta, "stage_seconds": stage_seconds}, synthetic)
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2, default=str).encode())
    return out / "REPORT.md"
