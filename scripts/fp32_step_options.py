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
import time

import numpy as np
import torch

from pix2rep.config import apply_overrides, preset_config
from pix2rep.provenance import cpu_model_name
from pix2rep.runtime import bf16_is_native, keep_freed_memory
from pix2rep.speed import backbone_flops_per_sample, matmul_peak_flops
from pix2rep.models import memory_format
from pix2rep.training.pretrain import PretrainNet, build_pretraining_modules, pretrain_step

parser = argparse.ArgumentParser()
parser.add_argument("--repeats", type=int, default=3, help="timed steps per option (after the warm-up)")
parser.add_argument("--d", type=int, default=64, help="representation size D (model.out_channels)")
args = parser.parse_args()

keep_freed_memory()
device = torch.device("cpu")
threads = torch.get_num_threads()
print(f"{cpu_model_name()}, {threads} threads, torch {torch.__version__}, {platform.machine()}; "
      f"native bf16: {bf16_is_native(device)}")
peak = matmul_peak_flops(device, torch.float32, n=2048, repeats=3)
print(f"fp32 matmul peak (2048^3): {peak / 1e9:.1f} GFLOP/s")
base = apply_overrides(preset_config("cpu"), {"model.out_channels": args.d, "bf16": False})
flops = backbone_flops_per_sample(base, device)


def step_seconds(cfg, compile_backbone=False):
    backbone, head = build_pretraining_modules(cfg)
    backbone.to(device, memory_format=memory_format(cfg.channels_last)).train()
    head.train()
    if compile_backbone:
        backbone = torch.compile(backbone)
    net = PretrainNet(backbone, head, cfg, False)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=cfg.pretrain.lr)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(cfg.pretrain.batch_size, 1, cfg.preprocess.size, cfg.preprocess.size, generator=gen)
    for _ in range(2 if compile_backbone else 1):  # compilation happens in the first steps
        pretrain_step(net, opt, x, gen, params, None)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        pretrain_step(net, opt, x, gen, params, None)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


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
        s = step_seconds(cfg, extra.get("compile", False))
    except Exception as exc:  # a failed option is a result too
        print(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} | | |")
        continue
    finally:
        torch.set_num_threads(threads)
    rate = cfg.pretrain.batch_size / s
    print(f"| {name} | {s:.3f} | {rate:.2f} | {100 * flops * rate / peak:.1f} % |", flush=True)
