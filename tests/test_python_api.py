"""The README's Python API block runs as written, on synthetic data with the tiny preset."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_block() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_api_block_runs(synthetic_root, tmp_path, monkeypatch):
    code = _api_block()
    scan = next(synthetic_root.glob("patient001/patient001_frame01.nii.gz"))
    # the same code, on the synthetic data, small and short: only paths, preset and budgets change
    replacements = {'"../shared/data/acdc/training"': repr(str(synthetic_root)), 'preset_config("cpu")': 'preset_config("tiny")',
                    "cfg.pretrain.epochs = 20": "cfg.pretrain.epochs = 1", 'split="dev-pool"': 'split="all"',
                    'ft.downstream.mode = "finetune"': 'ft.downstream.mode = "finetune"; ft.downstream.steps = 3',
                    '"scan.nii.gz"': repr(str(scan))}
    for old, new in replacements.items():
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    assert (tmp_path / "runs/pre/best.pt").is_file() and (tmp_path / "runs/ft-2/model.pt").is_file()
    seg = nib.load(tmp_path / "scan_seg.nii.gz")
    assert seg.shape == nib.load(scan).shape and set(map(int, seg.get_fdata().ravel())) <= {0, 1, 2, 3}
