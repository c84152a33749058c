"""ResNet family as multi-exit networks (stages = layer1..layer4, the stem folded into stage 1).

`stem='cifar'` is the official self-distillation code's: 3x3 stride-1 conv, BN, ReLU, no max-pool.
`stem='imagenet'` is torchvision's 7x7/2 conv + max-pool. `width` scales every stage (64 = standard).
Blocks are torchvision's own, so state-dict layouts inside a stage match torchvision's ResNets.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from sdtool.errors import SdtoolError
from sdtool.models.multi_exit import MultiExitNet
from sdtool.models.registry import register_model


def _stem(kind: str, c: int) -> nn.Sequential:
    if kind == "cifar":
        return nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
    if kind == "imagenet":
        return nn.Sequential(nn.Conv2d(3, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                             nn.MaxPool2d(3, 2, 1))
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


def build_resnet(block, depths: list[int], num_classes: int, stem: str, width: int, head: str,
                 attention: bool, exits: list[int] | None, groups: int = 1, base_width: int = 64):
    if num_classes is None or num_classes < 1:
        raise SdtoolError("model.num_classes must be a positive integer (or null to take the data set's)")
    stages, widths = [], []
    c = width
    for i, depth in enumerate(depths):
        layer, c_out = _layer(block, c, width * 2**i, depth, 1 if i == 0 else 2, groups, base_width)
        stages.append(nn.Sequential(_stem(stem, width), layer) if i == 0 else layer)
        widths.append(c_out)
        c = c_out
    net = MultiExitNet(stages, widths, num_classes, exits=exits, head=head, attention=attention)
    for m in net.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def _register(name: str, block, depths: list[int], groups: int = 1, base_width: int = 64):
    def builder(num_classes: int = 100, stem: str = "cifar", width: int = 64, head: str = "byot",
                attention: bool = True, exits: list[int] | None = None):
        return build_resnet(block, depths, num_classes, stem, width, head, attention, exits, groups, base_width)

    builder.__name__ = name
    builder.__doc__ = f"{name}: ResNet with {depths} blocks, multi-exit (exits after stages 1-4 by default)."
    register_model(builder)


_register("resnet18", BasicBlock, [2, 2, 2, 2])
_register("resnet34", BasicBlock, [3, 4, 6, 3])
_register("resnet50", Bottleneck, [3, 4, 6, 3])
_register("resnet101", Bottleneck, [3, 4, 23, 3])
_register("resnet152", Bottleneck, [3, 8, 36, 3])
_register("wide_resnet50_2", Bottleneck, [3, 4, 6, 3], base_width=128)
_register("resnext50_32x4d", Bottleneck, [3, 4, 6, 3], groups=32, base_width=4)
