"""Run scripts/demo_pool_validation.py on a synthetic pool whose tissue contrast varies by patient.

An experiment of issue 18 (docs/demo_diagnosis): would one-shot fine-tuning gain on the baseline
if synthetic patients differed more in appearance than the generator makes them? Each patient's
tissue signal levels (blood, myocardium, fat, lung, muscle, soft tissue, liver) are scaled by
factors drawn from the patient's seed, by patching the generator's module constants while that
patient is drawn. Give it its own cache, so that the demo's cached data sets are left alone:

  PIX2REP_CACHE=/tmp/cache-varied python scripts/varied_contrast_pool.py PRETRAIN_DIR MODE [...]

The arguments are demo_pool_validation.py's.
"""

import runpy
import sys
from pathlib import Path

import numpy as np

import pix2rep.data.synthetic as synthetic

# Ranges of the per-patient factor of each tissue's level.
FACTORS = {"_BLOOD": (0.75, 1.25), "_MYO": (0.75, 1.35), "_FAT": (0.6, 1.3), "_LUNG": (0.5, 2.0),
           "_MUSCLE": (0.7, 1.4), "_SOFT": (0.7, 1.4), "_LIVER": (0.7, 1.4)}
LEVELS = {name: getattr(synthetic, name) for name in FACTORS}
draw_patient = synthetic.make_synthetic_patient


def patient_with_varied_contrast(seed: int, group: str) -> dict:
    rng = np.random.default_rng([seed, 7])  # apart from the patient's own random streams
    for name, (low, high) in FACTORS.items():
        setattr(synthetic, name, LEVELS[name] * rng.uniform(low, high))
    try:
        return draw_patient(seed, group)
    finally:
        for name, level in LEVELS.items():
            setattr(synthetic, name, level)


synthetic.make_synthetic_patient = patient_with_varied_contrast
validation = Path(__file__).with_name("demo_pool_validation.py")
sys.argv = [str(validation)] + sys.argv[1:]
runpy.run_path(str(validation), run_name="__main__")
