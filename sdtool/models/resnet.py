"""ResNet family as multi-exit networks (stages = layer1..layer4, the stem folded into stage 1).

`stem='cifar'` is the official self-distillation code's: 3x3 stride-1 conv, BN, ReLU, no max-pool.
`stem='imagenet'` is torchvision's 7x7/2 conv + max-pool. `width` scales every stage (64 = standard).
Blocks are torchvision's own, so state-dict layouts inside a stage match torchvision's ResNets.

`split_layer1=True` cuts the first stage in two at a block boundary, as the CIFAR ResNets do
(`split_point`: after len(layer1) // 2 blocks, one for every ResNet here), for an exit that sits
before the whole full-resolution stage has run (with the CIFAR stem, stem + layer1 of resnet18 are 28 %
of the deepest exit's MACs). Five stages, strides 1, 1, 2, 2, 2:
  stage 1 = stem + layer1[:h]   (state-dict names as unsplit: stages.0.0 = stem, stages.0.1.0 = layer1[0])
  stage 2 = layer1[h:]          (same resolution: the byot head's first SepConv has stride 1)
  stages 3-5 = layer2, layer3, layer4
`model.spec["stages"]` names them; the default (no split) is the paper's four-stage layout, unchanged.
"""

from __future__ import annotations

from typing import cast

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from sdtool.errors import SdtoolError
from sdtool.models.common import split_point
from sdtool.models.multi_exit import MultiExitNet
from sdtool.models.registry import register_model


def _stem(kind: str, c: int) -> nn.Sequential:
    if kind == "cifar":
        return nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
    if kind == "imagenet":
        return nn.Sequential(
            nn.Conv2d(3, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
    raise SdtoolError(f"unknown stem {kind!r}; valid stems: cifar, imagenet")


def _layer(block, inplanes: int, planes: int, blocks: int, stride: int, groups: int, base_width: int):
    downsample = None
    out = planes * block.expansion
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    kw = {} if block is BasicBlock else {"groups": groups, "base_width": base_width}
    layers = [block(inplanes, planes, stride, downsample, **kw)]
    layers += [block(out, planes, **kw) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out


def _split_first(stages: list[nn.Module], widths: list[int], n_blocks: int):
    """Cut stage 1 (stem, layer1) after split_point(n_blocks) blocks: (stages, widths, strides, names)."""
    stem, layer1 = cast(nn.Sequential, stages[0])  # Sequential(stem, layer1), as build_resnet makes it
    layer1 = cast(nn.Sequential, layer1)
    h = split_point(n_blocks)
    first = nn.Sequential(stem, nn.Sequential(*layer1[:h]))  # keeps the unsplit names stages.0.0 / 0.1.0
    names = [f"stem+layer1[:{h}]", f"layer1[{h}:]"] + [f"layer{i + 2}" for i in range(len(stages) - 1)]
    return (
        [first, nn.Sequential(*layer1[h:]), *stages[1:]],
        widths[:1] + widths,
        [1, 1] + [2] * (len(stages) - 1),
        names,
    )


def build_resnet(
    block,
    depths: list[int],
    num_classes: int,
    stem: str,
    width: int,
    head: str,
    attention: bool,
    exits: list[int] | None,
    groups: int = 1,
    base_width: int = 64,
    split_layer1: bool = False,
):
    if num_classes is None or num_classes < 1:
        raise SdtoolError("model.num_classes must be a positive integer (or null to take the data set's)")
    if not isinstance(split_layer1, bool):
        raise SdtoolError(f"model.split_layer1 must be true or false, got {split_layer1!r}")
    stages, widths = [], []
    c = width
    for i, depth in enumerate(depths):
        layer, c_out = _layer(block, c, width * 2**i, depth, 1 if i == 0 else 2, groups, base_width)
        stages.append(nn.Sequential(_stem(stem, width), layer) if i == 0 else layer)
        widths.append(c_out)
        c = c_out
    strides = names = None  # the paper's layout: 4 stages, strides 1, 2, 2, 2, no names in the spec
    if split_layer1:
        stages, widths, strides, names = _split_first(stages, widths, depths[0])
    net = MultiExitNet(
        stages, widths, num_classes, exits=exits, head=head, attention=attention, strides=strides, stage_names=names
    )
    for m in net.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def _register(name: str, block, depths: list[int], groups: int = 1, base_width: int = 64):
    def builder(
        num_classes: int = 100,
        stem: str = "cifar",
        width: int = 64,
        head: str = "byot",
        attention: bool = True,
        exits: list[int] | None = None,
        split_layer1: bool = False,
    ):
        return build_resnet(
            block, depths, num_classes, stem, width, head, attention, exits, groups, base_width, split_layer1
        )

    builder.__name__ = name
    builder.__doc__ = (
        f"{name}: ResNet with {depths} blocks, multi-exit (exits after stages 1-4 by default; "
        f"split_layer1: 5 stages, layer1 cut after {split_point(depths[0])} block(s))."
    )
    register_model(builder)


_register("resnet18", BasicBlock, [2, 2, 2, 2])
_register("resnet34", BasicBlock, [3, 4, 6, 3])
_register("resnet50", Bottleneck, [3, 4, 6, 3])
_register("resnet101", Bottleneck, [3, 4, 23, 3])
_register("resnet152", Bottleneck, [3, 8, 36, 3])
_register("wide_resnet50_2", Bottleneck, [3, 4, 6, 3], base_width=128)
_register("resnext50_32x4d", Bottleneck, [3, 4, 6, 3], groups=32, base_width=4)
