"""Fingerprint of downstream training: a few steps of every downstream mode on fixed random slices.

Trains the `cpu` preset for 4 optimiser steps in each mode (scratch, random-probe, probe,
finetune, mean-teacher) on synthetic prepared slices and prints, per mode, a hash of every
parameter and buffer of the returned model. Run it on two checkouts to check that a change
(a refactoring) leaves downstream training bit-identical:

  PYTHONPATH=src python scripts/downstream_fingerprint.py
  PYTHONPATH=/path/to/other/checkout/src python scripts/downstream_fingerprint.py
"""

import hashlib

import numpy as np
import torch

from pix2rep.config import preset_config
from pix2rep.data.dataset import PreparedPatient
from pix2rep.data.preprocess import PreparedVolume
from pix2rep.models import UNet
from pix2rep.training.downstream import train_segmentation

torch.manual_seed(0)
rng = np.random.default_rng(0)


def patient(k: int, labeled: bool = True) -> PreparedPatient:
    images = rng.random((6, 128, 128), dtype=np.float32)
    masks = rng.integers(0, 4, (6, 128, 128)).astype(np.uint8) if labeled else None
    vol = PreparedVolume(images, masks, np.arange(6), (0, 128, 0, 128), (6, 128, 128), (10.0, 1.5, 1.5), f"p{k}", "ED")
    return PreparedPatient(f"p{k}", "NOR", [vol])


labeled = [patient(0), patient(1)]
unlabeled = [patient(k, labeled=False) for k in range(2, 4)]
base = preset_config("cpu")
pretrained = {k: v.clone() for k, v in UNet(base.model).state_dict().items()}
for mode in ("scratch", "random-probe", "probe", "finetune", "mean-teacher"):
    cfg = preset_config("cpu")
    cfg.device = "cpu"
    cfg.downstream.mode, cfg.downstream.steps, cfg.downstream.seed = mode, 4, 0
    state = None if mode in ("scratch", "random-probe") else pretrained
    model, _ = train_segmentation(cfg, labeled, None, backbone_state=state, progress=False,
                                  pretrained_prefixes=None if state is None else [""],
                                  unlabeled_patients=unlabeled if mode == "mean-teacher" else ())
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    print(f"{mode}: {digest.hexdigest()[:16]}")
