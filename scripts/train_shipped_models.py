"""Train, export and describe the models that ship with pix2rep (issue 19).

  python scripts/train_shipped_models.py --data ../shared/data/acdc/training --work runs/shipped

One command, each stage resumable (rerun it after an interruption):

1. ``pix2rep pretrain``: the `cpu` preset, label-free protocol, on the images of the 80-patient
   development pool (labels never read); the checkpoint with the lowest validation loss is kept.
2. ``pix2rep finetune`` of that backbone on all 80 pool patients (``--steps``, cosine decay).
3. Both are exported, weights only, to ``src/pix2rep/weights/`` and listed with their SHA-256
   in ``weights/models.json``.
4. ``pix2rep evaluate`` of the SHIPPED segmentation file, by name, on the 20 development
   evaluation patients, in fp32 (so that any CPU reproduces the figures; tests check three
   patients against the card), then MODEL_CARD.md is written from that evaluation.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from pix2rep.provenance import git_commit
from pix2rep.shipped import REGISTRY, WEIGHTS_DIR, file_sha256

ROOT = Path(__file__).resolve().parents[1]
BACKBONE, SEGMENTATION = "pix2rep-acdc-backbone", "pix2rep-acdc-seg"
# What each shipped file keeps of its run's checkpoint: weights, configuration, provenance.
KEEP = {"backbone": ("kind", "config", "versions", "backbone", "pretrained_prefixes", "pretraining_patients", "epoch"),
        "segmentation": ("kind", "config", "versions", "backbone", "segmentation_head", "summary")}


def run(argv: list[str]) -> str:
    command = shlex.join(["pix2rep", *(a for a in argv if a != "--resume")])  # as recorded in the card
    print(f"$ {command}", flush=True)
    subprocess.run([sys.executable, "-m", "pix2rep", *argv], check=True)
    return command


def resumable(folder: Path) -> list[str]:
    return ["--resume"] if folder.exists() else []


def export(checkpoint: Path, kind: str, name: str) -> dict:
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    slim = {k: payload[k] for k in KEEP[kind] if k in payload}
    for key in ("backbone", "segmentation_head"):
        if key in slim:
            slim[key] = {k: v.detach().float().contiguous() if v.is_floating_point() else v for k, v in slim[key].items()}
    path = WEIGHTS_DIR / f"{name}.pt"
    WEIGHTS_DIR.mkdir(exist_ok=True)
    # torch.save names the archive inside the file after the file, so checkpoints.save_checkpoint
    # (a temporary name, then rename) would give other bytes; saving under the final name keeps
    # the SHA-256 reproducible from the same weights
    torch.save(slim, path)
    return {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="ACDC training folder (100 patients)")
    ap.add_argument("--work", required=True, help="folder for the runs (resumable)")
    ap.add_argument("--steps", type=int, default=4000, help="fine-tuning steps on the 80 pool patients")
    ap.add_argument("--max-minutes", type=float, default=28.0, help="pretraining time cap")
    ap.add_argument("--pretraining-note", default="", help="a sentence for the card about how the pretraining ran "
                                                             "(e.g. where an earlier run of the same command was resumed)")
    args = ap.parse_args()
    work, data = Path(args.work), args.data
    pre, seg, ev = work / "backbone", work / "segmentation", work / "evaluation"

    commit = git_commit()
    pretrain_cmd = run(["pretrain", "--data", data, "--preset", "cpu", "--protocol", "label-free", "--split", "dev-pool",
                        "--max-minutes", str(args.max_minutes), "--out", str(pre), "--no-progress", *resumable(pre)])
    finetune_cmd = run(["finetune", "-m", str(pre), "--data", data, "--patients", "80", "--split", "dev-pool",
                        "--steps", str(args.steps), "--lr-schedule", "cosine", "--out", str(seg), "--no-progress",
                        *resumable(seg)])

    entries = []
    common = {"preset": "cpu", "protocol": "label-free", "commit": commit}
    files = {BACKBONE: export(pre / "best.pt", "backbone", BACKBONE),
             SEGMENTATION: export(seg / "model.pt", "segmentation", SEGMENTATION)}
    entries.append({"name": BACKBONE, "file": files[BACKBONE]["file"], "sha256": files[BACKBONE]["sha256"],
                    "kind": "backbone", **common,
                    "description": "Pix2Rep backbone (U-Net 16..256, D = 64), pretrained without labels; "
                                   "fine-tune it with `pix2rep finetune -m` on your few annotated patients",
                    "training_data": "images of the 80 ACDC development-pool patients (all cine frames), no labels",
                    "command": pretrain_cmd})
    entries.append({"name": SEGMENTATION, "file": files[SEGMENTATION]["file"], "sha256": files[SEGMENTATION]["sha256"],
                    "kind": "segmentation", **common,
                    "description": f"Short-axis cine cardiac MRI segmentation (RV, MYO, LV): {BACKBONE} fine-tuned on "
                                   f"80 annotated patients",
                    "training_data": "ED and ES frames with labels of the 80 ACDC development-pool patients",
                    "command": finetune_cmd})
    REGISTRY.write_text(json.dumps({"models": entries}, indent=2) + "\n")
    print(f"wrote {REGISTRY}")

    evaluate_cmd = run(["evaluate", "-m", SEGMENTATION, "--data", data, "--split", "dev-eval", "--set", "bf16=false",
                        "--out", str(ev), "--no-progress", *(["--overwrite"] if ev.exists() else [])])
    write_model_card(entries, files, ev, pre, seg, evaluate_cmd, args)


def _f(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def write_model_card(entries, files, ev: Path, pre: Path, seg: Path, evaluate_cmd: str, args) -> None:
    summary = json.loads((ev / "summary.json").read_text())
    rows, pre_rows, seg_rows = (list(csv.DictReader(f.read_text().splitlines()))
                                for f in (ev / "per_case.csv", pre / "metrics.csv", seg / "metrics.csv"))
    best = min(pre_rows, key=lambda r: float(r["val_loss"]))
    seg_summary = torch.load(seg / "model.pt", map_location="cpu", weights_only=True)["summary"]
    b, s = entries
    lines = [
        "# Model card: pix2rep's shipped models",
        "",
        "Written by `python scripts/train_shipped_models.py "
        f"--data {args.data} --work {args.work} --steps {args.steps}` at commit {b['commit']}; every figure below "
        "comes from the files that command wrote. **Research use only: not a medical device, not for clinical "
        "decisions.**",
        "",
        "| name | kind | file | size | SHA-256 |",
        "|---|---|---|---|---|",
        *[f"| `{e['name']}` | {e['kind']} | `src/pix2rep/weights/{e['file']}` | {files[e['name']]['bytes'] / 1e6:.1f} MB "
          f"| `{e['sha256']}` |" for e in entries],
        "",
        "Use them by name wherever `-m/--model` is accepted (`pix2rep models` lists them); the hash is checked "
        "when a file is loaded.",
        "",
        "## Data",
        "",
        "ACDC (Automated Cardiac Diagnosis Challenge) training set: short-axis cine MRI of 100 patients from the "
        "University Hospital of Dijon, 1.5 T and 3 T Siemens scanners, 5 groups of 20 (normal, previous myocardial "
        "infarction, dilated and hypertrophic cardiomyopathy, abnormal right ventricle); labels of RV, myocardium "
        "and LV at end-diastole and end-systole. Cite: O. Bernard et al., \"Deep Learning Techniques for Automatic "
        "MRI Cardiac Multi-structures Segmentation and Diagnosis: Is the Problem Solved?\", IEEE TMI 37(11): "
        "2514-2525, 2018. The data's terms allow research use only; so do these models'.",
        "",
        "The 100 patients are split as in README (\"Development split\"): an 80-patient pool for training and 20 "
        "held-out evaluation patients (4 per group), never used to train or choose either model.",
        "",
        "## Preprocessing and protocol",
        "",
        "`label-free` protocol: per volume, clip to the 1st-99th percentiles and rescale to [0, 1]; a 220 mm field "
        "of view around the heart found without labels; every slice resized to 128 x 128. `pix2rep predict` does "
        "the same and writes the labels back on the scan's own grid (0 background, 1 RV, 2 MYO, 3 LV). The models "
        "are 2D: each short-axis slice is segmented on its own.",
        "",
        f"## `{b['name']}`",
        "",
        f"{b['description']}. U-Net of the `cpu` preset (widths 16..256, 64-dimensional per-pixel features). "
        f"Trained on: {b['training_data']}.",
        "",
        f"- Command: `{b['command']}`",
        f"- Pretraining: Pix2Rep (pixel-level NT-Xent between an intensity-augmented view and a spatially warped "
        f"one), {len(pre_rows)} epochs, {sum(float(r['seconds']) for r in pre_rows) / 60:.1f} minutes on a 2-core CPU; the shipped "
        f"weights are the epoch with the lowest validation loss (epoch {best['epoch']}, {float(best['val_loss']):.4f}, "
        f"on 8 pool patients held out of pretraining).{' ' + args.pretraining_note if args.pretraining_note else ''}",
        "- No segmentation head: it is a starting point. `pix2rep finetune -m pix2rep-acdc-backbone --data YOURS "
        "--patients N --out DIR` fine-tunes it.",
        "",
        f"## `{s['name']}`",
        "",
        f"{s['description']}. Trained on: {s['training_data']}.",
        "",
        f"- Command: `{s['command']}`",
        f"- Fine-tuning: {int(seg_summary['steps'])} Adam steps of batch 16 (backbone 5e-5, head 1e-2, cosine decay "
        f"to 0), Dice + cross-entropy, intensity augmentation, last model kept; "
        f"{float(seg_rows[-1]['seconds']) / 60:.1f} minutes on a 2-core CPU. This is the longest schedule "
        "this machine affords, not a schedule shown to converge (issue 17 chooses that).",
        "",
        "### Metrics on the 20 development evaluation patients",
        "",
        f"`{evaluate_cmd}` (fp32), on the shipped file, 40 volumes (ED and ES), at the scan's native resolution.",
        "",
        "| | RV | MYO | LV | mean |",
        "|---|---|---|---|---|",
        "| Dice, mean ± std | " + " | ".join(
            f"{summary[f'dice_{c}_mean']:.3f} ± {summary[f'dice_{c}_std']:.3f}" for c in ("RV", "MYO", "LV", "mean")) + " |",
        "| HD95 (mm), mean ± std | " + " | ".join(
            f"{_f(summary[f'hd95_{c}_mean'], 1)} ± {_f(summary[f'hd95_{c}_std'], 1)}" for c in ("RV", "MYO", "LV")) + " | |",
        "",
        "Clinical indices (per patient, from ED and ES volumes): error = prediction - ground truth.",
        "",
        "| index | mean absolute error | bias | Pearson r | patients |",
        "|---|---|---|---|---|",
        *[f"| {name} | {_f(c['mae'], 2)} | {_f(c['bias'], 2)} | {_f(c['pearson_r'])} | {c['n']} |"
          for name, c in summary["clinical"].items()],
        "",
        "(volumes in mL, EF in %, myocardial mass in g at 1.05 g/mL.)",
        "",
        "Per volume (tests/test_shipped_models.py recomputes three patients and compares them with this table):",
        "",
        "| patient | group | phase | RV | MYO | LV | mean |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['patient']} | {r['group']} | {r['phase']} | " + " | ".join(
            f"{float(r[f'dice_{c}']):.4f}" for c in ("RV", "MYO", "LV", "mean")) + " |" for r in rows],
        "",
        "## Known limits",
        "",
        "- Short-axis cine cardiac MRI only, at ACDC-like contrast (bSSFP); other sequences, views and organs are "
        "outside what these models saw.",
        "- ACDC comes from one centre and Siemens scanners; other vendors and centres are untested.",
        "- 2D slice by slice: no 3D consistency. Mean Dice by slice position in the evaluation above: " + ", ".join(
            f"{region} " + "/".join(_f(summary['by_region'][region][c]) for c in ("RV", "MYO", "LV"))
            for region in ("basal", "mid", "apical")) + " (RV/MYO/LV).",
        "- The heart region is found without labels; where it misses the heart, so does the segmentation "
        "(198/200 ACDC training volumes contain the whole heart).",
        "- Trained with a small CPU preset and budget: below the ~0.92 Dice of nnU-Net on ACDC.",
        "- Not for clinical use.",
        "",
    ]
    (ROOT / "MODEL_CARD.md").write_text("\n".join(lines))
    print(f"wrote {ROOT / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
