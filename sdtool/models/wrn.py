"""Wide ResNets (Zagoruyko & Komodakis 2016) for CIFAR: wrn_16_2, wrn_40_2, wrn_28_10.

Layout as in the CRD code base (RepDistiller `models/wrn.py`): 3x3 stem with `width` (16) channels,
three groups of n = (depth - 4) / 6 pre-activation blocks (BN-ReLU-conv-BN-ReLU-conv) with widths
width*k, 2*width*k, 4*width*k at 32, 16 and 8 pixels, a final BN-ReLU, global pooling and a Linear
layer. `width` scales the base width (16 = the paper's network); the widening factor k is in the name.

Exits: as the CIFAR ResNets, the first group is cut in two for a fourth exit:
  stage 1 = stem + the first n // 2 blocks of group 1, stage 2 = the rest of group 1,
  stage 3 = group 2, stage 4 = group 3 + the final BN-ReLU.
Shallow exits see a group's raw (pre-activation) output; the byot head's SepConv starts with its own
convolutions and BN, so no extra normalisation is added.
"""

from __future__ import annotations

import torch
from torch import nn

from sdtool.models.common import check_classes, check_width, multi_exit, split_point
from sdtool.models.registry import register_model


class WideBlock(nn.Module):
    """Pre-activation basic block; the shortcut is a 1x1 conv of the activated input where shapes change."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.equal = c_in == c_out and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


def build_wrn(
    name: str, depth: int, k: int, num_classes: int, width: int, head: str, attention: bool, exits: list[int] | None
):
    check_classes(num_classes)
    check_width(name, width)
    n = (depth - 4) // 6
    stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    groups, c = [], width
    for i in range(3):
        w = width * k * 2**i
        groups.append([WideBlock(c if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(n)])
        c = w
    h = split_point(n)
    final = [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
    stages = [
        nn.Sequential(stem, *groups[0][:h]),
        nn.Sequential(*groups[0][h:]),
        nn.Sequential(*groups[1]),
        nn.Sequential(*groups[2], *final),
    ]
    widths = [width if h == 0 else width * k, width * k, 2 * width * k, 4 * width * k]
    names = ["stem" if h == 0 else f"stem+group1[:{h}]", f"group1[{h}:]", "group2", "group3+bn+relu"]
    return multi_exit(stages, widths, [1, 1, 2, 2], names, num_classes, head, attention, exits)


def _register(depth: int, k: int) -> None:
    name = f"wrn_{depth}_{k}"

    def builder(
        num_classes: int = 100,
        width: int = 16,
        head: str = "byot",
        attention: bool = True,
        exits: list[int] | None = None,
    ):
        return build_wrn(name, depth, k, num_classes, width, head, attention, exits)

    builder.__name__ = name
    builder.__doc__ = (
        f"{name}: Wide ResNet, depth {depth}, widening {k}, 3 groups of {(depth - 4) // 6} "
        "pre-activation blocks; 4 exits (group 1 cut in two)."
    )
    register_model(builder)


_register(16, 2)
_register(40, 2)
_register(28, 10)
