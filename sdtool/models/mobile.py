"""Lightweight backbones from torchvision's own blocks: mobilenet_v2 and shufflenet_v2_x1_0.

`stem: imagenet` is torchvision's layout exactly (its `features` / conv1..conv5 modules, in order);
`stem: cifar` (default) makes the stride changes of the common CIFAR ports (kuangliu/pytorch-cifar):
  mobilenet_v2:       first conv stride 1 (not 2) and the first 24-channel block stride 1 (not 2):
                      32 -> 32 -> 16 -> 8 -> 4 instead of 224 -> 112 -> 56 -> 28 -> 14 -> 7.
  shufflenet_v2_x1_0: first conv stride 1 and no max-pool: 32 -> 16 -> 8 -> 4 over stages 2-4.
`width_mult` scales every width (mobilenet_v2: as torchvision's `width_mult`, rounded to multiples of
8, the last 1x1 conv keeps 1280 channels unless width_mult > 1; shufflenet: all five widths, rounded to
even numbers, so width_mult=1 is torchvision's x1_0). The final exit is global pooling and one Linear
layer (torchvision's MobileNetV2 adds dropout 0.2 before it; not used here).

Exits (4), at resolution changes:
  mobilenet_v2:  stage 1 = features[0:4] (24 ch), stage 2 = features[4:7] (32 ch),
                 stage 3 = features[7:14] (96 ch), stage 4 = features[14:19] (1280 ch)
  shufflenet:    stage 1 = conv1 (+ maxpool) + stage2 (116 ch), stage 2 = stage3[:4], stage 3 = stage3[4:]
                 (232 ch, the same resolution: the byot head's SepConv there has stride 1),
                 stage 4 = stage4 + conv5 (1024 ch)

The ShuffleNet blocks are torchvision's with one change that leaves outputs and weights identical:
the channel shuffle is a module (`ChannelShuffle`) doing one gather instead of view/transpose/view,
so that the pruner can see it as a single fixed permutation (see sdtool/prune.py).
"""

from __future__ import annotations

from itertools import pairwise
from typing import cast

import torch
from torch import nn
from torchvision.models._utils import _make_divisible
from torchvision.models.mobilenetv2 import InvertedResidual as MBBlock
from torchvision.models.shufflenetv2 import InvertedResidual
from torchvision.ops.misc import Conv2dNormActivation

from sdtool.models.common import FixedWidth, check_classes, check_stem, check_width, multi_exit
from sdtool.models.registry import register_model

MB_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]  # torchvision's (expansion t, channels c, blocks n, stride s)


@register_model
def mobilenet_v2(
    num_classes: int = 100,
    stem: str = "cifar",
    width_mult: float = 1.0,
    head: str = "byot",
    attention: bool = True,
    exits: list[int] | None = None,
):
    """mobilenet_v2: MobileNetV2 (torchvision blocks); 4 exits at 24, 32, 96 and 1280 channels."""
    check_classes(num_classes)
    check_stem("mobilenet_v2", stem)
    check_width("mobilenet_v2", width_mult, "width_mult")
    cifar = stem == "cifar"
    c_in = _make_divisible(32 * width_mult, 8)
    last = _make_divisible(1280 * max(1.0, width_mult), 8)
    features: list[nn.Module] = [Conv2dNormActivation(3, c_in, stride=1 if cifar else 2, activation_layer=nn.ReLU6)]
    for t, c, n, s in MB_SETTING:
        c_out = _make_divisible(c * width_mult, 8)
        if cifar and c == 24:
            s = 1
        for i in range(n):
            features.append(MBBlock(c_in, c_out, s if i == 0 else 1, expand_ratio=t))
            c_in = c_out
    features.append(Conv2dNormActivation(c_in, last, kernel_size=1, activation_layer=nn.ReLU6))
    cuts = [0, 4, 7, 14, 19]
    stages = [nn.Sequential(*features[a:b]) for a, b in pairwise(cuts)]
    widths = [_make_divisible(c * width_mult, 8) for c in (24, 32, 96)] + [last]
    strides = [1, 2, 2, 2] if cifar else [4, 2, 2, 2]
    names = [f"features[{a}:{b}]" for a, b in pairwise(cuts)]
    return multi_exit(stages, widths, strides, names, num_classes, head, attention, exits)


class ChannelShuffle(FixedWidth):
    """torchvision's `channel_shuffle(x, groups)` as one `index_select`.

    Output channel j is input channel (j % groups) * (C / groups) + j // groups, exactly what the
    5-D view/transpose/view computes. One gather is one node in an autograd trace, which the pruner
    can treat as a boundary; the reshapes are not something Torch-Pruning can map channels through.
    """

    def __init__(self, channels: int, groups: int = 2):
        super().__init__()
        self.channels, self.groups = channels, groups  # channels: for the pruner's bookkeeping

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        order = torch.arange(c, device=x.device).view(self.groups, c // self.groups).t().reshape(-1)
        return x.index_select(1, order)


class ShuffleBlock(InvertedResidual):
    """torchvision's ShuffleNetV2 block (same modules, same state dict) with a `ChannelShuffle` module."""

    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__(inp, oup, stride)
        self.shuffle = ChannelShuffle(oup, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return self.shuffle(out)


def prunable_shuffles(module: nn.Module) -> nn.Module:
    """Turn torchvision's ShuffleNetV2 blocks inside `module` into `ShuffleBlock`s, in place.

    Same parameters, buffers and outputs; only the shuffle becomes a module, so that a wrapped
    `torchvision:shufflenet_v2_*` can be pruned like the built-in backbone.
    """
    for m in module.modules():
        if type(m) is InvertedResidual:
            m.__class__ = ShuffleBlock
            m.shuffle = ChannelShuffle(2 * cast(ShuffleBlock, m).branch2[-3].out_channels, 2)
    return module


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


@register_model
def shufflenet_v2_x1_0(
    num_classes: int = 100,
    stem: str = "cifar",
    width_mult: float = 1.0,
    head: str = "byot",
    attention: bool = True,
    exits: list[int] | None = None,
):
    """shufflenet_v2_x1_0: ShuffleNetV2 1.0x (torchvision blocks); 4 exits (stage3 cut in two)."""
    check_classes(num_classes)
    check_stem("shufflenet_v2_x1_0", stem)
    check_width("shufflenet_v2_x1_0", width_mult, "width_mult")
    cifar = stem == "cifar"
    w = [_even(c * width_mult) for c in (24, 116, 232, 464, 1024)]
    conv1 = nn.Sequential(
        nn.Conv2d(3, w[0], 3, 1 if cifar else 2, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True)
    )
    head_layers = [conv1] if cifar else [conv1, nn.MaxPool2d(3, 2, 1)]
    blocks, c = [], w[0]
    for repeats, c_out in zip((4, 8, 4), w[1:4], strict=True):
        blocks.append([ShuffleBlock(c, c_out, 2)] + [ShuffleBlock(c_out, c_out, 1) for _ in range(repeats - 1)])
        c = c_out
    conv5 = nn.Sequential(nn.Conv2d(c, w[4], 1, 1, 0, bias=False), nn.BatchNorm2d(w[4]), nn.ReLU(inplace=True))
    stages = [
        nn.Sequential(*head_layers, *blocks[0]),
        nn.Sequential(*blocks[1][:4]),
        nn.Sequential(*blocks[1][4:]),
        nn.Sequential(*blocks[2], conv5),
    ]
    strides = [2, 2, 1, 2] if cifar else [8, 2, 1, 2]
    names = ["conv1+stage2" if cifar else "conv1+maxpool+stage2", "stage3[:4]", "stage3[4:]", "stage4+conv5"]
    return multi_exit(stages, [w[1], w[2], w[2], w[4]], strides, names, num_classes, head, attention, exits)
