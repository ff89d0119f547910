"""Rerun cells of a finished `pix2rep demo` study with changed settings, to diagnose it (issue 18).

  python scripts/demo_cell.py DEMO_DIR METHOD N SEEDS [KEY=VALUE ...]
  e.g. python scripts/demo_cell.py pix2rep-demo pix2rep-ft 1 0 downstream.lr_backbone=1e-3

Starts from DEMO_DIR/config.yaml and DEMO_DIR/pretrain, trains METHOD on the study's draw of N
pool patients for each seed (comma-separated), and prints 3D Dice per class on the demo's
evaluation set, exactly as the study scores a cell. Diagnosis only: choosing settings by these
numbers would tune on the evaluation set; scripts/demo_pool_validation.py scores on the pool.
"""

import sys

import numpy as np

from pix2rep.benchmark import run_cell
from pix2rep.checkpoints import load_pretrained_backbone_weights
from pix2rep.config import RunConfig, apply_overrides, parse_assignment
from pix2rep.data.dataset import load_patients
from pix2rep.data.synthetic import write_demo_datasets

demo, method, n, seeds = sys.argv[1], sys.argv[2], int(sys.argv[3]), [int(s) for s in sys.argv[4].split(",")]
settings = dict(parse_assignment(s) for s in sys.argv[5:])
cfg = apply_overrides(RunConfig.load(f"{demo}/config.yaml"), settings)
quiet = lambda *_: None  # noqa: E731
pool_dir, eval_dir = write_demo_datasets()
pool, evaluation = load_patients(pool_dir, cfg, log=quiet), load_patients(eval_dir, cfg, log=quiet)
weights = load_pretrained_backbone_weights(f"{demo}/pretrain")
for seed in seeds:
    cell = run_cell(cfg, method, n, seed, pool, evaluation, {"pix2rep": (weights.state, weights.prefixes)}, log=quiet)
    dice = {c: np.mean([r[f"dice_{c}"] for r in cell["rows"]]) for c in ("RV", "MYO", "LV", "mean")}
    print(f"{method} N={n} seed {seed} {settings or 'demo settings'}: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
          + f" ({cell['train_seconds']:.0f} s training)", flush=True)
