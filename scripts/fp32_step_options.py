"""What raises the fp32 pretraining step's speed on a CPU without native bf16 (issue 18)?

Times one whole `cpu`-preset pretraining step in fp32 (augmentation, both views through the
backbone forward and backward, head, loss, Adam; 128 px) under each option in turn, and prints
samples/s and the utilisation of the fp32 matmul peak measured in the same run:

  python scripts/fp32_step_options.py [--repeats 3] [--d 64]

Options: the default (channels_last, batch 8, all threads); without channels_last; batch 16;
one thread; torch.compile of the backbone (inductor, C++ code generation). A benchmark, not a test.
To imitate an AVX2-only CPU on an AVX-512 one: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
"""

import argparse
import platform

import torch

from pix2rep.config import apply_overrides, preset_config
from pix2rep.provenance import cpu_model_name
from pix2rep.runtime import bf16_is_native
from pix2rep.speed import backbone_flops_per_sample, matmul_peak_flops, pretraining_step_seconds

parser = argparse.ArgumentParser()
parser.add_argument("--repeats", type=int, default=3, help="timed steps per option (after two warm-up steps)")
parser.add_argument("--d", type=int, default=64, help="representation size D (model.out_channels)")
args = parser.parse_args()

device = torch.device("cpu")
threads = torch.get_num_threads()
print(f"{cpu_model_name()}, {threads} threads, torch {torch.__version__}, {platform.machine()}; "
      f"native bf16: {bf16_is_native(device)}")
peak = matmul_peak_flops(device, torch.float32, n=2048, repeats=3)
print(f"fp32 matmul peak (2048^3): {peak / 1e9:.1f} GFLOP/s")
base = apply_overrides(preset_config("cpu"), {"model.out_channels": args.d, "bf16": False})
flops = backbone_flops_per_sample(base, device)


options = [
    ("default: channels_last, batch 8, %d threads" % threads, base, {}),
    ("no channels_last", apply_overrides(base, {"channels_last": False}), {}),
    ("batch 16", apply_overrides(base, {"pretrain.batch_size": 16}), {}),
    ("one thread", base, {"threads": 1}),
    ("torch.compile(backbone)", base, {"compile": True}),
]
print(f"| option (D = {args.d}, fp32) | step s | samples/s | utilisation of the fp32 peak |")
print("|---|---|---|---|")
for name, cfg, extra in options:
    torch.set_num_threads(extra.get("threads", threads))
    try:
        s = pretraining_step_seconds(cfg, args.repeats, compile_backbone=extra.get("compile", False))
    except Exception as exc:  # a failed option is a result too
        print(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} | | |")
        continue
    finally:
        torch.set_num_threads(threads)
    rate = cfg.pretrain.batch_size / s
    print(f"| {name} | {s:.3f} | {rate:.2f} | {100 * flops * rate / peak:.1f} % |", flush=True)
