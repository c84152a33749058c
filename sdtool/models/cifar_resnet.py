"""CIFAR ResNets (He et al. 2016, section 4.2): resnet20/32/56/110 and the KD benchmarks' resnet8x4/32x4.

Layout as in the CRD code base (RepDistiller `models/resnet.py`), which the KD literature's tables use:
3x3 stem, three stages of n BasicBlocks (depth = 6n + 2) at 32x32, 16x16 and 8x8, a 1x1-conv
projection shortcut where shape changes, global pooling and one Linear layer.
  resnet20/32/56/110: widths 16 (stem), 16, 32, 64          (`width` = 16, the first stage's)
  resnet8x4/32x4:     widths 32 (stem), 64, 128, 256       (`width` = 64; the stem has width / 2)

Exits. Three stages give three natural exit points; to have the four exits of the paper's networks,
the first stage is cut in two at a block boundary:
  stage 1 = stem + the first n // 2 blocks of layer1     (resnet8x4, n = 1: the stem alone)
  stage 2 = the rest of layer1        (same resolution: the byot head's first SepConv has stride 1)
  stage 3 = layer2,  stage 4 = layer3 (+ global pooling and the classifier in the final exit)
`model.spec["stages"]` spells this out for every built model.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock

from sdtool.models.common import check_classes, check_width, multi_exit, split_point
from sdtool.models.registry import register_model


def _block(inplanes: int, planes: int, stride: int) -> BasicBlock:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
    return BasicBlock(inplanes, planes, stride, downsample)


def build_cifar_resnet(
    name: str,
    n: int,
    width: int,
    stem_width: int,
    num_classes: int,
    head: str,
    attention: bool,
    exits: list[int] | None,
):
    check_classes(num_classes)
    check_width(name, width)
    stem = nn.Sequential(
        nn.Conv2d(3, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True)
    )
    layers, c = [], stem_width
    for i in range(3):
        w = width * 2**i
        layers.append([_block(c if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(n)])
        c = w
    h = split_point(n)
    stages = [
        nn.Sequential(stem, *layers[0][:h]),
        nn.Sequential(*layers[0][h:]),
        nn.Sequential(*layers[1]),
        nn.Sequential(*layers[2]),
    ]
    widths = [stem_width if h == 0 else width, width, 2 * width, 4 * width]
    names = ["stem", "layer1"] if h == 0 else [f"stem+layer1[:{h}]", f"layer1[{h}:]"]
    names += ["layer2", "layer3"]
    return multi_exit(stages, widths, [1, 1, 2, 2], names, num_classes, head, attention, exits)


def _register(name: str, depth: int, default_width: int, stem_ratio: float) -> None:
    n = (depth - 2) // 6

    def builder(
        num_classes: int = 100,
        width: int = default_width,
        head: str = "byot",
        attention: bool = True,
        exits: list[int] | None = None,
    ):
        stem_width = max(1, int(width * stem_ratio))
        return build_cifar_resnet(name, n, width, stem_width, num_classes, head, attention, exits)

    builder.__name__ = name
    builder.__doc__ = (
        f"{name}: CIFAR ResNet, 3 stages of {n} BasicBlocks, widths "
        f"{int(default_width * stem_ratio)}/{default_width}/{2 * default_width}/{4 * default_width}; "
        f"4 exits (layer1 cut after {split_point(n)} blocks)."
    )
    register_model(builder)


_register("resnet20", 20, 16, 1.0)
_register("resnet32", 32, 16, 1.0)
_register("resnet56", 56, 16, 1.0)
_register("resnet110", 110, 16, 1.0)
_register("resnet8x4", 8, 64, 0.5)
_register("resnet32x4", 32, 64, 0.5)
