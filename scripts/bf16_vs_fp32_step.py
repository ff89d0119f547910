"""Is bf16 autocast worth it on THIS CPU? One `cpu`-preset pretraining step in each precision.

pix2rep uses bf16 autocast only where the device computes bf16 natively
(`runtime.bf16_is_native`: AVX-512-BF16 or AMX on x86). This script forces each
precision in turn, whatever the CPU, and prints what the choice is worth here:

  python scripts/bf16_vs_fp32_step.py [--repeats 3]

It prints the matmul throughput in both precisions (bf16 at 512^3, so that an emulating CPU
answers in seconds), then the median seconds of a whole pretraining step (augmentation, both
views through the backbone forward and backward, head, loss, Adam; batch 8, 128 px,
channels_last). A benchmark, not a test.
"""

import argparse
import platform
import time

import numpy as np
import torch

from pix2rep.config import preset_config
from pix2rep.provenance import cpu_model_name
from pix2rep.speed import _pretraining_parts, matmul_peak_flops
from pix2rep import runtime as common

parser = argparse.ArgumentParser()
parser.add_argument("--repeats", type=int, default=3, help="timed steps per precision (after one warm-up)")
args = parser.parse_args()

common.keep_freed_memory()
device = torch.device("cpu")
print(f"{cpu_model_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}")
print(f"native bf16 (mkldnn): {common.bf16_is_native(device)}; pix2rep trains in "
      f"{'bf16 autocast' if common.use_bf16(True, device) else 'fp32'} here")
print(f"matmul bf16 512^3:  {matmul_peak_flops(device, torch.bfloat16, n=512, repeats=1) / 1e9:8.2f} GFLOP/s")
print(f"matmul fp32 2048^3: {matmul_peak_flops(device, torch.float32, n=2048, repeats=3) / 1e9:8.2f} GFLOP/s")

cfg = preset_config("cpu")
for amp in (False, True):
    common.bf16_is_native = lambda _device: True  # let autocast run bf16 even on a CPU that emulates it
    torch.manual_seed(0)
    _, _, full_step, _ = _pretraining_parts(cfg, device, amp)
    full_step()  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        full_step()
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    print(f"pretraining step, {'bf16 autocast' if amp else 'fp32         '}: {seconds:6.2f} s "
          f"({cfg.pretrain.batch_size / seconds:.2f} samples/s, median of {args.repeats})")
