"""Building blocks of the multi-exit network, as in the official self-distillation code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdtool.errors import SdtoolError


class SepConv(nn.Sequential):
    """Depthwise-separable block used by the official heads and attention modules.

    depthwise 3x3 (stride s) -> 1x1 -> BN -> ReLU -> depthwise 3x3 -> 1x1 (c_in -> c_out) -> BN -> ReLU.
    Shapes: (N, c_in, H, W) -> (N, c_out, H/s, W/s).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 2):
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=False),
        )


class Upsample(nn.Module):
    """Bilinear upsampling back to the size of a reference tensor.

    The official module is `Upsample(scale_factor=2)`; resizing to the reference size gives the same
    numbers for even sizes and still lines up when a stage output has an odd size.
    """

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Attention(nn.Module):
    """Official attention: mask = sigmoid(up(relu(bn(SepConv_s2(x))))); returns x * mask (same shape as x)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = SepConv(channels, channels, stride=2)
        self.bn = nn.BatchNorm2d(channels)
        self.up = Upsample()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.relu(self.bn(self.conv(x)))
        return x * torch.sigmoid(self.up(mask, x.shape[-2:]))


class Pool(nn.Sequential):
    """Global average pooling to a flat feature: (N, C, H, W) -> (N, C)."""

    def __init__(self):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def make_head(
    kind: str, widths_after: list[int], c_in: int, strides_after: list[int] | None = None
) -> tuple[nn.Module, int]:
    """Head of a shallow exit and its output feature width.

    widths_after: channel widths of the stages that follow this exit's stage (shallow to deep);
    strides_after: their downsampling factors (None = 2 each, as every ResNet stage after the first).
    - byot (official): one SepConv per following stage, widths and strides following the backbone
      (ResNet18 after stage 1: 64->128->256->512, stride 2 each), then global pooling. Where the
      backbone does not downsample (a stage cut inside a resolution level) the SepConv has stride 1.
    - light: a single stride-2 SepConv straight to the last width, then pooling.
    - pool: global pooling of the stage output (cheapest; features keep the stage's width).
    """
    if strides_after is None:
        strides_after = [2] * len(widths_after)
    if kind == "byot":
        blocks, c = [], c_in
        for w, s in zip(widths_after, strides_after, strict=True):
            blocks.append(SepConv(c, w, stride=max(1, int(s))))
            c = w
        return nn.Sequential(*blocks, Pool()), c
    if kind == "light":
        c_out = widths_after[-1] if widths_after else c_in
        return nn.Sequential(SepConv(c_in, c_out), Pool()), c_out
    if kind == "pool":
        return nn.Sequential(Pool()), c_in
    raise SdtoolError(f"unknown head {kind!r}; valid heads: byot, light, pool")
