"""The U-Net backbone whose full-resolution output IS the pixel representation, and its heads.

Architecture (METHOD section 4): ``len(widths)`` levels of double 3x3 conv + BatchNorm + ReLU
blocks, 2x2 max-pooling down, 2x2 transposed-conv up with skip concatenation. The last
decoder block outputs ``out_channels`` (D) channels at the input resolution; there is no
classifier. With widths 64..2048 and D = 1024 this is the paper's 134.9M-parameter network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModelConfig:
    """Backbone and head sizes. ``widths`` has one entry per level (len(widths) - 1 poolings)."""

    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    out_channels: int = 64  # D, the size of each pixel's representation
    in_channels: int = 1
    norm: str = "batch"  # "batch", "instance" or "none"
    projection_hidden: int = 256
    projection_out: int = 256
    num_classes: int = 4

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) < 2:
            raise ValueError(f"a U-Net needs at least 2 levels, got widths={self.widths}")
        if self.norm not in ("batch", "instance", "none"):
            raise ValueError(f"norm must be 'batch', 'instance' or 'none', got {self.norm!r}")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) twice; with ``groups`` G, G independent copies side by side
    (G x cin channels in, G x cout out, grouped convolutions)."""

    def __init__(self, cin: int, cout: int, norm: str, groups: int = 1):
        g = groups
        super().__init__(
            nn.Conv2d(g * cin, g * cout, 3, padding=1, groups=g),
            _norm(norm, g * cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(g * cout, g * cout, 3, padding=1, groups=g),
            _norm(norm, g * cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """2D U-Net mapping ``(B, in_channels, H, W)`` to ``(B, D, H, W)`` pixel features.

    H and W must be divisible by ``2 ** (len(widths) - 1)``.

    ``groups`` G > 1 builds G independent U-Nets as one module (grouped convolutions,
    per-channel BatchNorm): ``(B, G x in_channels, H, W)`` to ``(B, G x D, H, W)``, network g
    reading and writing the g-th block of channels. It trains several cells of a study at once
    (:func:`stack_segmentation_models`); its state is the G networks' states concatenated.
    """

    def __init__(self, cfg: ModelConfig, groups: int = 1):
        super().__init__()
        w, g = cfg.widths, groups
        self.depth, self.groups = len(w), groups
        self.encoders = nn.ModuleList([DoubleConv(cfg.in_channels, w[0], cfg.norm, g)])
        self.encoders.extend(DoubleConv(w[i - 1], w[i], cfg.norm, g) for i in range(1, len(w)))
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(g * w[i + 1], g * w[i], 2, stride=2, groups=g) for i in range(len(w) - 1))
        # The shallowest decoder block outputs D channels: it is the representation.
        dec_out = [cfg.out_channels] + list(w[1:-1])
        self.decoders = nn.ModuleList(DoubleConv(2 * w[i], dec_out[i], cfg.norm, g) for i in range(len(w) - 1))
        self.out_channels = cfg.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (self.depth - 1)
        if x.ndim != 4 or x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(
                f"expected input (B, C, H, W) with H and W divisible by {factor}, got {tuple(x.shape)}"
            )
        skips = self._encode(x)
        x = skips.pop()
        for i in reversed(range(self.depth - 1)):
            x = self.decoders[i](_cat_channels(skips[i], self.ups[i](x), self.groups))
        return x

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        return skips

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder alone: the deepest feature map ``(B, widths[-1], H / 2^(L-1), W / 2^(L-1))``."""
        return self._encode(x)[-1]

    ENCODER_PREFIXES = ("encoders.",)
    """Parameter-name prefixes of the encoder (what image-level pretraining trains)."""


def _cat_channels(a: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    """``a`` and ``b`` concatenated along channels, within each of ``groups`` channel blocks
    (group g: a's g-th block, then b's). In channels-last memory the reshapes are views."""
    if groups == 1:
        return torch.cat([a, b], dim=1)
    (n, ca, h, w), cb = a.shape, b.shape[1]
    blocks = [t.permute(0, 2, 3, 1).reshape(n, h, w, groups, -1) for t in (a, b)]
    return torch.cat(blocks, dim=4).reshape(n, h, w, ca + cb).permute(0, 3, 1, 2)


class ProjectionHead(nn.Module):
    """Pixel-wise projection g: D -> hidden (BatchNorm, ReLU) -> out, on feature VECTORS.

    Applying it to ``(N, D)`` vectors is the same as a 1x1-conv head on feature maps, but it
    lets training evaluate the head only at the sampled pixels.
    """

    def __init__(self, in_dim: int, hidden: int = 256, out_dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.net(vectors)


class SegmentationModel(nn.Module):
    """Backbone plus a 1x1-conv classifier head (D -> num_classes) giving per-pixel logits
    (with a grouped backbone, G heads: G x num_classes logits)."""

    def __init__(self, backbone: UNet, num_classes: int = 4):
        super().__init__()
        self.backbone = backbone
        g = getattr(backbone, "groups", 1)
        self.head = nn.Conv2d(g * backbone.out_channels, g * num_classes, 1, groups=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def stack_segmentation_models(models: list[SegmentationModel], cfg: ModelConfig) -> SegmentationModel:
    """One grouped model (``UNet(cfg, groups=len(models))``) computing the given models side by
    side: every parameter and buffer is theirs concatenated along its first dimension (which
    is the output-channel one of every grouped layer; BatchNorm's step counter is the first
    model's)."""
    stacked = SegmentationModel(UNet(cfg, groups=len(models)), cfg.num_classes)
    states = [m.state_dict() for m in models]
    stacked.load_state_dict({key: value if key.endswith("num_batches_tracked") else torch.cat([s[key] for s in states])
                             for key, value in states[0].items()})
    return stacked


def unstack_segmentation_model(stacked: SegmentationModel, cfg: ModelConfig) -> list[SegmentationModel]:
    """The models that :func:`stack_segmentation_models` stacked, as ordinary ones (a copy)."""
    g = stacked.backbone.groups
    models = [SegmentationModel(UNet(cfg), cfg.num_classes) for _ in range(g)]
    state = stacked.state_dict()
    for i, model in enumerate(models):
        model.load_state_dict({key: value.clone() if key.endswith("num_batches_tracked") else value.chunk(g)[i].clone()
                               for key, value in state.items()})
    return models


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout of images and feature maps: channels_last (``RunConfig.channels_last``), the
    faster one for convolutions on CPU and on tensor cores, or PyTorch's default."""
    return torch.channels_last if channels_last else torch.contiguous_format


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
