"""Why the linear probe on a random backbone reads 0: with and without the downstream
intensity augmentation, on this machine's CPU.

usage: python scripts/probe_floor_check.py

A random `cpu`-preset backbone (BatchNorm statistics calibrated on the training slices, as
the `random-lp` method does) and a 1x1 probe trained for 300 steps on the pool patient of
N = 1, seed 0 (`label-free` protocol), once with the study's intensity augmentation
(METHOD section 5: noise, blur, gamma, bias field, inversion with p 0.35) and once without.
Prints the mean 3D Dice over the first 8 held-out development patients and the fraction of
the probe's own training pixels it assigns to each class (background, RV, MYO, LV).
Data: ../shared/data/acdc/training (run from the repository root).
"""

import time

import numpy as np
import torch

from pix2rep.config import preset_config
from pix2rep.data.dataset import prepare_dataset, stack_slices
from pix2rep.data.sampling import sample_few_shot_patients, split_development
from pix2rep.evaluation.evaluate import evaluate_patients
from pix2rep.training.downstream import train_segmentation

torch.set_num_threads(2)
base = preset_config("cpu")
base.preprocess.protocol = "label-free"
pool, evaluation = split_development(prepare_dataset("../shared/data/acdc/training", base.preprocess))
chosen = sample_few_shot_patients(pool, 1, 0)
train = stack_slices(chosen)
for augment in (True, False):
    cfg = preset_config("cpu")
    cfg.preprocess.protocol, cfg.device = "label-free", "cpu"
    cfg.downstream.mode, cfg.downstream.seed, cfg.downstream.augment = "random-probe", 0, augment
    t = time.time()
    model, _ = train_segmentation(cfg, chosen, None, progress=False, log=print)
    rows, _, _ = evaluate_patients(model, evaluation[:8], torch.device("cpu"), False)
    with torch.no_grad():
        predicted = model.eval()(train.images).argmax(1)
    fractions = torch.bincount(predicted.flatten(), minlength=4).double() / predicted.numel()
    print(f"augment={augment}: dice {np.mean([r['dice_mean'] for r in rows]):.3f}; "
          f"training pixels predicted as background/RV/MYO/LV: {', '.join(f'{f:.3f}' for f in fractions)} "
          f"({time.time() - t:.0f} s)", flush=True)
