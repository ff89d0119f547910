"""Throughput of one Pix2Rep pretraining step for candidate `cpu` presets (a benchmark, not a test).

Usage: python scripts/bench_pretrain_step.py [--d 32 64 128] [--steps 6]
Prints slices/s (a slice = two views) of the full step (augmentation, warp, backbone forward and
backward on both views, head, loss, Adam) at 128 x 128, batch 8, bf16 autocast, channels_last.
"""

import argparse
import time

import torch

from pix2rep.config import preset_config
from pix2rep.models import count_parameters
from pix2rep.training.pretrain import PretrainNet, build_pretraining_modules, pretrain_step

parser = argparse.ArgumentParser()
parser.add_argument("--d", type=int, nargs="+", default=[32, 64, 128])
parser.add_argument("--steps", type=int, default=6)
args = parser.parse_args()
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
for d in args.d:
    cfg = preset_config("cpu", model={"out_channels": d})
    backbone, head = build_pretraining_modules(cfg)
    backbone = backbone.to(memory_format=torch.channels_last)
    net = PretrainNet(backbone, head, cfg, amp=True)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=cfg.pretrain.lr)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(cfg.pretrain.batch_size, 1, 128, 128)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        pretrain_step(net, opt, x, gen, params, cfg.pretrain.grad_clip)
        times.append(time.perf_counter() - t0)
    best = min(times[1:])
    print(f"widths {cfg.model.widths}, D={d}: {count_parameters(backbone) / 1e6:.2f}M parameters, "
          f"{best:.3f} s/step, {cfg.pretrain.batch_size / best:.1f} slices/s")
