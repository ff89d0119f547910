"""Choose the downstream schedule from curves on POOL patients only (issue 17).

  python scripts/downstream_schedule_study.py --data ../shared/data/acdc/training \
      -m pix2rep-acdc-backbone --out docs/schedule [--methods baseline,pix2rep-ft] [--n 1,5,80] \
      [--steps 250,500,1000,2000,4000] [--seeds 0,1,2] [--device auto]

Ten patients of the 80-patient development pool (two per group, a fixed draw) are set aside as
a VALIDATION set; few-shot sets are drawn, with the study's stratified sampler, from the 70
others (N = 80 means all 70). The 20 evaluation patients are never loaded. For each method, N,
seed and number of optimiser steps, one run with the cosine learning-rate decay is scored by 3D
Dice (mean over RV, MYO, LV) on the validation patients.

Writes, into --out (resumable: finished runs are kept in the CSV and skipped):
- ``schedule_curves.csv``: one row per run (method, N, seed, steps, validation Dice, seconds);
- ``schedule_curves.png``: validation Dice against steps, per method and N;
- ``schedule_summary.md``: per method and N, the change of the mean Dice when the steps double,
  and the smallest tried S from which every tried doubling moves it by less than 0.01 (the criterion).

The backbone (``-m``) must be pretrained on pool patients only (the shipped
``pix2rep-acdc-backbone`` is): fine-tuning reads it, the baseline ignores it.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from pix2rep.atomic import atomic_write_bytes, save_figure
from pix2rep.checkpoints import load_pretrained_backbone_weights
from pix2rep.config import apply_overrides, parse_assignment
from pix2rep.data.dataset import load_patients
from pix2rep.data.sampling import resolve_split, sample_few_shot_patients
from pix2rep.evaluation.evaluate import evaluate_patients
from pix2rep.evaluation.report import write_csv
from pix2rep.runtime import resolve_device
from pix2rep.training.downstream import train_segmentation

METHODS = {"baseline": "scratch", "pix2rep-ft": "finetune", "pix2rep-lp": "probe"}
COLUMNS = ("method", "N", "train_patients", "seed", "steps", "val_dice", "val_RV", "val_MYO", "val_LV", "seconds")
CRITERION = 0.01
VALIDATION_PER_GROUP = 2


def validation_split(pool: list, seed: int = 1234) -> tuple[list, list]:
    """(validation, rest): VALIDATION_PER_GROUP patients of each group, a fixed draw."""
    rng = np.random.default_rng(seed)
    validation = []
    for group in sorted({p.group for p in pool}, key=str):
        members = sorted((p for p in pool if p.group == group), key=lambda p: p.id)
        validation += [members[i] for i in rng.permutation(len(members))[:VALIDATION_PER_GROUP]]
    ids = {p.id for p in validation}
    return validation, [p for p in pool if p.id not in ids]


def read_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines())) if path.exists() else []


def summarise(rows: list[dict]) -> dict:
    """(method, N) -> {steps: mean validation Dice over seeds}."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["method"], int(r["N"])), {}).setdefault(int(r["steps"]), []).append(float(r["val_dice"]))
    return {k: {s: float(np.mean(v)) for s, v in sorted(by.items())} for k, by in out.items()}


def recorded_commands(out: Path, command: str) -> list[str]:
    """Every invocation that wrote into ``out``, oldest first: the CSV merges their runs."""
    path = out / "schedule_commands.txt"
    commands = path.read_text().splitlines() if path.exists() else []
    if command not in commands:
        commands.append(command)
        atomic_write_bytes(path, ("\n".join(commands) + "\n").encode())
    return commands


def converged_from(by: dict) -> int | None:
    """The smallest tried S from which EVERY tried doubling moves the Dice by less than CRITERION.

    One flat doubling is not enough: a baseline can plateau (300 -> 600) and then rise again
    (600 -> 1200), so a single small step would pick a schedule that is not converged.
    """
    doublings = [s for s in sorted(by) if s * 2 in by]
    for s in doublings:
        if all(abs(by[t * 2] - by[t]) < CRITERION for t in doublings if t >= s):
            return s
    return None


def write_summary(out: Path, rows: list[dict], commands: list[str]) -> None:
    lines = ["# Downstream schedule: validation Dice on pool patients", "",
             "Commands (each resumes the same CSV; together they produced every row):", "",
             *(f"    {c}" for c in commands), "",
             "Mean over seeds of the validation Dice (10 pool patients, never the evaluation patients). "
             f"Criterion: doubling the steps moves it by less than {CRITERION}.", "",
             "| method | N | steps: Dice (change from half the steps) | converged from S (every later doubling < criterion) |", "|---|---|---|---|"]
    for (method, n), by in sorted(summarise(rows).items()):
        steps = sorted(by)
        cells = []
        for i, s in enumerate(steps):
            change = f" ({by[s] - by[steps[i - 1]]:+.3f})" if i and steps[i - 1] * 2 == s else ""
            cells.append(f"{s}: {by[s]:.3f}{change}")
        chosen = converged_from(by)
        seeds = len({r["seed"] for r in rows if r["method"] == method and int(r["N"]) == n})
        lines.append(f"| {method} | {n} | {'; '.join(cells)} | {chosen if chosen else 'none of those tried'} "
                     f"({seeds} seed{'s' if seeds != 1 else ''}) |")
    atomic_write_bytes(out / "schedule_summary.md", ("\n".join(lines) + "\n").encode())


def plot(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, n), by in sorted(summarise(rows).items()):
        ax.plot(list(by), list(by.values()), marker="o", label=f"{method}, N = {n}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("optimiser steps (cosine decay)")
    ax.set_ylabel("validation Dice (pool patients)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "schedule_curves.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("-m", "--model", required=True, help="backbone pretrained on pool patients (run, file or shipped name)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default="baseline,pix2rep-ft")
    ap.add_argument("--n", default="1,5,80")
    ap.add_argument("--steps", default="250,500,1000,2000,4000")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--device", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other setting, e.g. downstream.probe_features=cached (recorded in the summary's command)")
    ap.add_argument("--label", default="", help="a suffix of the method name in the CSV, for a variant given by --set")
    args = ap.parse_args()
    command = shlex.join(["python", "scripts/downstream_schedule_study.py", *sys.argv[1:]])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commands = recorded_commands(out, command)
    weights = load_pretrained_backbone_weights(args.model)
    base = apply_overrides(weights.config, dict(parse_assignment(a) for a in args.set))
    if args.device:
        base.device = args.device
    quiet = lambda *_: None  # noqa: E731
    pool = resolve_split(load_patients(args.data, base, log=quiet), "dev-pool", "training", where=args.data)
    validation, rest = validation_split(pool)
    leaked = sorted(set(weights.patients) - {p.id for p in pool})  # labels unused, but images are images
    if leaked:
        raise SystemExit(f"{args.model}: pretrained on patients outside the development pool: {leaked}")
    device = resolve_device(base.device)
    rows = read_rows(out / "schedule_curves.csv")
    done = {(r["method"], r["N"], r["seed"], r["steps"]) for r in rows}
    for method in args.methods.split(","):
        name = method + args.label
        for n in (int(k) for k in args.n.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                chosen = sample_few_shot_patients(rest, min(n, len(rest)), seed)
                for steps in (int(s) for s in args.steps.split(",")):
                    if (name, str(n), str(seed), str(steps)) in done:
                        continue
                    cfg = apply_overrides(base, {"downstream.mode": METHODS[method], "downstream.seed": seed,
                                                 "downstream.steps": steps, "downstream.lr_schedule": "cosine"})
                    state = weights.state if method != "baseline" else None
                    t0 = time.time()
                    model, _ = train_segmentation(cfg, chosen, None, backbone_state=state, progress=False, log=quiet,
                                                  pretrained_prefixes=weights.prefixes if state is not None else None)
                    scored, _, _ = evaluate_patients(model, validation, device, cfg.bf16)
                    per_class = {c: float(np.mean([r[f"dice_{c}"] for r in scored])) for c in ("RV", "MYO", "LV")}
                    # as text, like the rows read back from the CSV, so both kinds group alike
                    rows.append({"method": name, "N": str(n), "train_patients": str(len(chosen)), "seed": str(seed),
                                 "steps": str(steps),
                                 "val_dice": f"{np.mean(list(per_class.values())):.5f}",
                                 **{f"val_{c}": f"{v:.5f}" for c, v in per_class.items()},
                                 "seconds": f"{time.time() - t0:.1f}"})
                    write_csv(out / "schedule_curves.csv", [{k: r[k] for k in COLUMNS} for r in rows])
                    print(f"{name} N={n} seed={seed} steps={steps}: validation Dice {rows[-1]['val_dice']} "
                          f"({rows[-1]['seconds']} s)", flush=True)
                    write_summary(out, rows, commands)
                    plot(out, rows)
    write_summary(out, rows, commands)
    plot(out, rows)
    print(f"wrote {out / 'schedule_summary.md'}")


if __name__ == "__main__":
    main()
