"""Mean Teacher against training from scratch on a few ACDC patients, on this machine's CPU.

usage: python scripts/mean_teacher_check.py PRESET N STEPS MODE [MODE ...]
  e.g. python scripts/mean_teacher_check.py cpu 1 300 mean-teacher scratch

Trains each MODE (a `downstream.mode`: scratch, mean-teacher, ...) from a random start on the
N pool patients of seed 0 (`label-free` protocol, the preset's settings, STEPS optimiser
steps) and prints the mean 3D Dice over the first 8 of the 20 held-out development patients
(ED and ES). For mean-teacher it also prints the Dice of the same teacher after its
BatchNorm statistics are recomputed with its own weights on every 4th pool slice: a large
difference means the statistics the teacher carried did not fit its weights. Data:
../shared/data/acdc/training (run from the repository root).
"""

import sys
import time

import numpy as np
import torch

from pix2rep.config import preset_config
from pix2rep.data.dataset import prepare_dataset, stack_slices
from pix2rep.data.sampling import sample_few_shot_patients, split_development
from pix2rep.evaluation.evaluate import evaluate_patients
from pix2rep.training.downstream import calibrate_batchnorm, train_segmentation

torch.set_num_threads(2)
preset, n, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def conf(mode):
    c = preset_config(preset)
    c.preprocess.protocol, c.device = "label-free", "cpu"
    c.downstream.mode, c.downstream.seed, c.downstream.steps = mode, 0, steps
    return c


c0 = preset_config("cpu")
c0.preprocess.protocol = "label-free"
pool, evaluation = split_development(prepare_dataset("../shared/data/acdc/training", c0.preprocess))
chosen = sample_few_shot_patients(pool, n, 0)
evaluation = evaluation[:8]


def dice(model):
    rows, _, _ = evaluate_patients(model, evaluation, torch.device("cpu"), False)
    return round(float(np.mean([r["dice_mean"] for r in rows])), 3)


for mode in sys.argv[4:]:
    t = time.time()
    model, _ = train_segmentation(conf(mode), chosen, None, progress=False, log=print, unlabeled_patients=pool)
    line = f"{mode}: dice {dice(model)} ({time.time() - t:.0f} s)"
    if mode == "mean-teacher":
        pool_slices = stack_slices(pool, labeled=False)
        calibrate_batchnorm(model.backbone, pool_slices.images[::4], torch.device("cpu"), False, torch.channels_last)
        line += f"; same teacher, BatchNorm statistics recomputed with its own weights: dice {dice(model)}"
    print(line, flush=True)
