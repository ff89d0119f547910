"""Choose the Barlow Twins off-diagonal weight lambda of Pix2Rep-v2 by measurement, without
ever looking at the 20 evaluation patients (METHOD section 3: with d = 256, lambda is to be
measured and recorded).

For each lambda: a short Pix2Rep-v2 pretraining on the 80-patient pool (the study's `cpu`
preset, fewer epochs), then a linear probe on 5 pool patients and a 1-shot fine-tuning on one
pool patient, both scored on 10 other pool patients. The probe is the criterion (it measures
the representation itself); the fine-tuning figure is reported beside it.

Usage:
  python scripts/choose_barlow_lambda.py --data ../shared/data/acdc/training --out /tmp/lambda \
      [--lambdas 0.001 0.0039 0.0156 0.0625] [--epochs 4]

Writes OUT/lambda_sweep.csv (one row per lambda) and prints the table.
"""

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from pix2rep.config import preset_config
from pix2rep.data.dataset import prepare_dataset
from pix2rep.data.sampling import sample_few_shot_patients, split_development
from pix2rep.evaluation.evaluate import evaluate_patients
from pix2rep.checkpoints import load_checkpoint
from pix2rep.training.downstream import train_segmentation
from pix2rep.training.pretrain import pretrain

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True)
parser.add_argument("--out", required=True, help="folder for the short pretrainings and the CSV")
parser.add_argument("--lambdas", type=float, nargs="+", default=[1e-3, 1 / 256, 1 / 64, 1 / 16])
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--steps", type=int, default=300, help="downstream optimiser steps")
args = parser.parse_args()

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
cfg = preset_config("cpu", pretrain={"loss": "barlow", "epochs": args.epochs, "max_minutes": None})
pool, _ = split_development(prepare_dataset(args.data, cfg.preprocess))
probe_train = sample_few_shot_patients(pool, 5, 0)
ft_train = sample_few_shot_patients(pool, 1, 0)
used = {p.id for p in probe_train} | {p.id for p in ft_train}
scored = [p for p in sample_few_shot_patients(pool, len(pool), 1000) if p.id not in used][:10]
print(f"probe on {[p.id for p in probe_train]}, 1-shot fine-tuning on {ft_train[0].id}, "
      f"scored on {[p.id for p in scored]}", flush=True)


def dice(model) -> float:
    rows, _, _ = evaluate_patients(model, scored)
    return float(np.mean([r["dice_mean"] for r in rows]))


results = []
for lam in args.lambdas:
    t0 = time.time()
    cfg.pretrain.barlow_lambda = lam
    run = out / f"lambda-{lam:.6g}"
    run.mkdir(exist_ok=True)
    summary = pretrain(cfg, pool, run, resume=(run / "last.pt").exists(), progress=False, log=lambda s: None)
    payload, _ = load_checkpoint(run / "best.pt")
    row = {"lambda": f"{lam:.6g}", "pretrain_epochs": summary["epochs"], "best_val_loss": f"{summary['best_val_loss']:.4f}"}
    for mode, train in (("probe", probe_train), ("finetune", ft_train)):
        cfg.downstream.mode, cfg.downstream.steps, cfg.downstream.seed = mode, args.steps, 0
        model, _ = train_segmentation(cfg, train, backbone_state=payload["backbone"], progress=False, log=lambda s: None)
        row[f"{mode}_dice"] = f"{dice(model):.4f}"
    row["minutes"] = f"{(time.time() - t0) / 60:.1f}"
    results.append(row)
    print(row, flush=True)
    with open(out / "lambda_sweep.csv", "w", newline="") as f:  # rewritten after each lambda
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerows(results)

best = max(results, key=lambda r: float(r["probe_dice"]))
print(f"highest probe Dice: lambda = {best['lambda']} ({best['probe_dice']}); table in {out / 'lambda_sweep.csv'}")
