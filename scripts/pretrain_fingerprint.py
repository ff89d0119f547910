"""Fingerprint of pretraining: three Adam steps of the `cpu` preset on fixed random slices.

Prints each step's loss (float.hex) and a hash of every parameter and buffer after the steps.
Run it on two checkouts to check that a change (a speed-up, a refactoring) leaves training
bit-identical:

  PYTHONPATH=src python scripts/pretrain_fingerprint.py infonce
  PYTHONPATH=/path/to/other/checkout/src python scripts/pretrain_fingerprint.py infonce

The loss is `infonce` (Pix2Rep, default) or `barlow` (Pix2Rep-v2).
"""

import hashlib
import sys

import torch

from pix2rep.config import preset_config
from pix2rep.training.pretrain import PretrainNet, build_pretraining_modules, pretrain_step

loss_kind = sys.argv[1] if len(sys.argv) > 1 else "infonce"
torch.manual_seed(0)
cfg = preset_config("cpu", pretrain={"loss": loss_kind})
# The committed studies' flip probabilities (before the fix of issue 17), so that the
# fingerprints recorded in README compare across that change.
cfg.spatial.flip_probs = (0.45, 0.32, 0.23)
backbone, head = build_pretraining_modules(cfg)
backbone.to(memory_format=torch.channels_last).train()
head.train()
net = PretrainNet(backbone, head, cfg, amp=True)
params = list(backbone.parameters()) + list(head.parameters())
optimizer = torch.optim.Adam(params, lr=cfg.pretrain.lr)
generator = torch.Generator().manual_seed(0)
batches = torch.rand(3, 8, 1, 128, 128, generator=torch.Generator().manual_seed(1))
for step, x in enumerate(batches):
    loss = pretrain_step(net, optimizer, x, generator, params, cfg.pretrain.grad_clip)  # the training loop's step
    print(f"step {step}: loss {loss.item().hex()}")
digest = hashlib.sha256()
for tensor in list(backbone.state_dict().values()) + list(head.state_dict().values()):
    digest.update(tensor.detach().float().contiguous().numpy().tobytes())
print(f"parameters and buffers: {digest.hexdigest()[:16]}")
