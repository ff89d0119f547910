"""Tune a downstream learning rate without ever looking at the 20 evaluation patients:
one-shot training on a pool patient, validation on ten other pool patients.

Usage:
  python scripts/tune_baseline_lr.py --data ../shared/data/acdc/training [--lrs 3e-4 1e-3 3e-3 1e-2]
  python scripts/tune_baseline_lr.py --data ... --mode finetune -m RUN --lrs 5e-5 5e-4 3e-3   (backbone rate)
"""

import argparse

import numpy as np

from pix2rep.config import RunConfig, preset_config
from pix2rep.data.dataset import prepare_dataset
from pix2rep.data.sampling import sample_few_shot_patients, split_development
from pix2rep.evaluation.evaluate import evaluate_patients
from pix2rep.checkpoints import load_checkpoint
from pix2rep.training.downstream import train_segmentation

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True)
parser.add_argument("--mode", choices=("scratch", "finetune"), default="scratch")
parser.add_argument("-m", "--model", default=None, help="pretrained run (finetune)")
parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--seeds", type=int, nargs="+", default=[0])
args = parser.parse_args()

state = None
if args.mode == "finetune":
    payload, _ = load_checkpoint(args.model)
    cfg, state = RunConfig.from_dict(payload["config"]), payload["backbone"]
else:
    cfg = preset_config("cpu")
pool, _ = split_development(prepare_dataset(args.data, cfg.preprocess))
for seed in args.seeds:
    train = sample_few_shot_patients(pool, 1, seed)
    others = [p for p in sample_few_shot_patients(pool, len(pool), 1000 + seed) if p.id not in {t.id for t in train}][:10]
    for lr in args.lrs:
        cfg.downstream.mode, cfg.downstream.steps, cfg.downstream.seed = args.mode, args.steps, seed
        if args.mode == "scratch":
            cfg.downstream.lr_scratch = lr
        else:
            cfg.downstream.lr_backbone = lr
        model, _ = train_segmentation(cfg, train, backbone_state=state, progress=False, log=lambda s: None)
        rows, _, _ = evaluate_patients(model, others)
        print(f"{args.mode}, seed {seed}, train {train[0].id}, lr {lr:g}: mean Dice on 10 other pool patients "
              f"{np.mean([r['dice_mean'] for r in rows]):.3f}", flush=True)
