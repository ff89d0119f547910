"""Score downstream settings of `pix2rep demo` on its synthetic POOL only (never its evaluation set).

Pretrains the demo's backbone (the `tiny` preset with the `demo` plan) into PRETRAIN_DIR unless
that folder already holds one, then, for each seed, draws N annotated pool patients with the
study's sampler, trains MODE on them with the given settings, and scores 3D Dice per class on
8 other pool patients. Used to diagnose why the demo's fine-tuning scored below the baseline
(issue 18); the evaluation patients of the demo stay untouched.

  python scripts/demo_pool_validation.py PRETRAIN_DIR MODE [KEY=VALUE ...] [--n 1] [--seeds 0,1,2]
      [--pretrain-epochs E] [--base KEY=VALUE ...] [--csv FILE] [--pool-size P]

``--base`` settings apply to everything, pretraining included (e.g. preprocess.size=96); the
positional ones to the downstream run only. ``--csv`` appends one row per seed.

MODE is scratch, finetune, probe or random-probe; KEY=VALUE as `--set` (downstream.lr_backbone=1e-3,
intensity.invert_p=0, downstream.augment=false, ...).
"""

import argparse
import csv
from pathlib import Path

import numpy as np

from pix2rep.checkpoints import load_checkpoint
from pix2rep.config import apply_overrides, parse_assignment, preset_config, study_plan_config
from pix2rep.data.dataset import default_cache_dir, load_patients
from pix2rep.data.sampling import sample_few_shot_patients
from pix2rep.data.synthetic import write_demo_datasets, write_synthetic_dataset
from pix2rep.evaluation.evaluate import evaluate_patients
from pix2rep.runtime import resolve_device
from pix2rep.training.downstream import train_segmentation
from pix2rep.training.pretrain import pretrain

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("pretrain_dir")
parser.add_argument("mode", choices=("scratch", "finetune", "probe", "random-probe"))
parser.add_argument("settings", nargs="*", metavar="KEY=VALUE")
parser.add_argument("--n", type=int, default=1)
parser.add_argument("--seeds", default="0,1,2")
parser.add_argument("--pretrain-epochs", type=int, default=None, help="instead of the demo plan's (when it pretrains)")
parser.add_argument("--base", nargs="*", default=[], metavar="KEY=VALUE", help="settings for pretraining and downstream")
parser.add_argument("--csv", default=None, help="append one row per seed to this CSV file")
parser.add_argument("--pool-size", type=int, default=None,
                    help="a synthetic pool of this many patients (seed 0, its first 20 are the demo's) instead of the demo's 20")
args = parser.parse_args()

quiet = lambda *_: None  # noqa: E731
cfg = apply_overrides(study_plan_config(preset_config("tiny"), "demo"), dict(parse_assignment(s) for s in args.base))
if args.pool_size is None:
    pool_dir = write_demo_datasets()[0]
else:
    pool_dir = write_synthetic_dataset(default_cache_dir() / "demo" / f"synthetic-pool-{args.pool_size}-seed0",
                                       n_patients=args.pool_size, seed=0)
pool = load_patients(pool_dir, cfg, log=quiet)
pre = Path(args.pretrain_dir)
if not (pre / "best.pt").exists():
    pre.mkdir(parents=True, exist_ok=True)
    pretrain(apply_overrides(cfg, {"pretrain.epochs": args.pretrain_epochs}), pool, pre, progress=False)
backbone = load_checkpoint(pre / "best.pt")[0]["backbone"]
settings = dict(parse_assignment(s) for s in args.settings)
device = resolve_device(cfg.device)
scores = []
for seed in (int(s) for s in args.seeds.split(",")):
    chosen = sample_few_shot_patients(pool, args.n, seed)
    held_out = [p for p in pool if p not in chosen][:8]
    run = apply_overrides(cfg, {**settings, "downstream.mode": args.mode, "downstream.seed": seed})
    state = None if args.mode in ("scratch", "random-probe") else backbone
    model, _ = train_segmentation(run, chosen, None, backbone_state=state, progress=False, log=quiet,
                                  pretrained_prefixes=None if state is None else [""])
    rows, _, _ = evaluate_patients(model, held_out, device, run.bf16)
    dice = np.array([[r[f"dice_{c}"] for c in ("RV", "MYO", "LV")] for r in rows]).mean(0)
    scores.append(dice)
    if args.csv:
        new = not Path(args.csv).exists()
        with open(args.csv, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["mode", "n", "seed", "base", "settings", "dice_RV", "dice_MYO", "dice_LV", "dice_mean"])
            writer.writerow([args.mode, args.n, seed, " ".join(args.base), " ".join(args.settings),
                             *(f"{v:.4f}" for v in dice), f"{dice.mean():.4f}"])
    print(f"  seed {seed} ({', '.join(p.id for p in chosen)}): RV {dice[0]:.3f} MYO {dice[1]:.3f} LV {dice[2]:.3f}", flush=True)
mean = np.mean(scores, axis=0)
print(f"{args.mode} N={args.n} {settings or 'demo settings'}: mean Dice {mean.mean():.3f} "
      f"(RV {mean[0]:.3f}, MYO {mean[1]:.3f}, LV {mean[2]:.3f}) over {len(scores)} seeds")
