"""One DDP pretraining step per case, run under torchrun by tests/test_distributed.py.

Writes, from each rank, the loss and the (DDP-averaged) gradients to OUT/<case>-rank<r>.pt.
"""

import sys
from pathlib import Path

import torch

from pix2rep.config import preset_config
from pix2rep.training.distributed import init_from_env, wrap_ddp
from pix2rep.training.pretrain import PretrainNet, build_pretraining_modules

CASES = {"infonce-local": ("infonce", False), "infonce-gathered": ("infonce", True), "barlow": ("barlow", True)}


def case_config(loss: str, gather: bool):
    cfg = preset_config("tiny")
    cfg.pretrain.loss, cfg.pretrain.gather_negatives, cfg.pretrain.n_samples = loss, gather, 300
    return cfg


def global_batch() -> torch.Tensor:
    return torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(1))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.set_default_dtype(torch.float64)  # float64: the comparison measures the method, not rounding
    ctx = init_from_env("cpu")
    half = global_batch().chunk(ctx.world)[ctx.rank]
    for name, (loss_name, gather) in CASES.items():
        cfg = case_config(loss_name, gather)
        torch.manual_seed(0)
        backbone, head = build_pretraining_modules(cfg)
        net = wrap_ddp(PretrainNet(backbone, head, cfg, amp=False, ctx=ctx), ctx)
        loss = net(half, torch.Generator().manual_seed(100 + ctx.rank))
        loss.backward()
        grads = {f"backbone.{k}": p.grad.clone() for k, p in backbone.named_parameters()}
        grads.update({f"head.{k}": p.grad.clone() for k, p in head.named_parameters()})
        torch.save({"loss": loss.detach(), "grads": grads}, out / f"{name}-rank{ctx.rank}.pt")
