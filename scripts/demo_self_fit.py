"""Does a one-shot model of `pix2rep demo` fit its own annotated patient? (issue 18 diagnosis)

Trains MODE on ONE demo pool patient with the demo plan and the given settings, then prints, per
class, the recall on that patient's own annotated slices (a class at 0 here is a training failure,
not a generalisation one) and the 3D Dice on 8 other pool patients (the demo's evaluation set stays
untouched). With a pretrained backbone it first prints how far apart its features put the class
means of that patient, in units of the within-class spread.

  python scripts/demo_self_fit.py PRETRAIN_DIR PATIENT "MODE [KEY=VALUE ...]" ["MODE ..." ...]

e.g. ``python scripts/demo_self_fit.py DEMO/pretrain patient015 "finetune downstream.seed=3"
"scratch downstream.seed=3"``. PRETRAIN_DIR is the `pretrain` folder of a `pix2rep demo` run.
"""

import argparse

import numpy as np
import torch

from pix2rep.checkpoints import load_checkpoint
from pix2rep.config import apply_overrides, parse_assignment, preset_config, study_plan_config
from pix2rep.data.dataset import load_patients, stack_slices
from pix2rep.data.synthetic import write_demo_datasets
from pix2rep.evaluation.evaluate import evaluate_patients
from pix2rep.inference import predict_probabilities
from pix2rep.models import UNet
from pix2rep.runtime import resolve_device
from pix2rep.training.downstream import train_segmentation

CLASSES = ("RV", "MYO", "LV")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("pretrain_dir")
parser.add_argument("patient", help="a demo pool patient id, e.g. patient015")
parser.add_argument("runs", nargs="+", metavar='"MODE [KEY=VALUE ...]"')
args = parser.parse_args()

quiet = lambda *_: None  # noqa: E731
cfg = apply_overrides(study_plan_config(preset_config("tiny"), "demo"), {"preprocess.size": 96})
pool = load_patients(write_demo_datasets()[0], cfg, log=quiet)
chosen = [p for p in pool if p.id == args.patient]
if not chosen:
    parser.error(f"{args.patient!r} is not a demo pool patient ({pool[0].id} .. {pool[-1].id})")
held_out = [p for p in pool if p.id != args.patient][:8]
device = resolve_device(cfg.device)
own = stack_slices(chosen)
truth = own.masks.numpy()
backbone_state = load_checkpoint(f"{args.pretrain_dir}/best.pt")[0]["backbone"]

backbone = UNet(cfg.model)
backbone.load_state_dict(backbone_state)
backbone.eval()
with torch.no_grad():
    features = backbone(own.images).permute(0, 2, 3, 1).reshape(-1, cfg.model.out_channels).numpy()
labels = truth.ravel()
means = {c: features[labels == k].mean(0) for k, c in enumerate(CLASSES, start=1)}
spread = np.mean([features[labels == k].std(0).mean() for k in range(1, 4)])
print(f"{args.patient} ({chosen[0].group}), pretrained features: distance of class means / mean within-class std: "
      + ", ".join(f"{a}-{b} {np.linalg.norm(means[a] - means[b]) / spread:.2f}"
                  for a, b in (("LV", "MYO"), ("LV", "RV"), ("RV", "MYO"))))

for spec in args.runs:
    mode, *settings = spec.split()
    run = apply_overrides(cfg, {**dict(parse_assignment(s) for s in settings), "downstream.mode": mode})
    state = None if mode in ("scratch", "random-probe") else backbone_state
    model, _ = train_segmentation(run, chosen, None, backbone_state=state, progress=False, log=quiet,
                                  pretrained_prefixes=None if state is None else [""])
    predicted = predict_probabilities(model, own.images[:, 0].numpy(), device, run.bf16).argmax(1).numpy()
    recall = [float((predicted[truth == k] == k).mean()) for k in range(1, 4)]
    rows, _, _ = evaluate_patients(model, held_out, device, run.bf16)
    dice = np.array([[r[f"dice_{c}"] for c in CLASSES] for r in rows]).mean(0)
    print(f"{spec}: recall on its own slices " + " ".join(f"{c} {r:.3f}" for c, r in zip(CLASSES, recall))
          + "; Dice on 8 other pool patients " + " ".join(f"{c} {d:.3f}" for c, d in zip(CLASSES, dice))
          + f", mean {dice.mean():.3f}", flush=True)
