"""VGG with batch norm (Simonyan & Zisserman 2015): vgg11_bn, vgg16_bn, vgg19_bn.

Five blocks of 3x3 conv-BN-ReLU layers, widths w, 2w, 4w, 8w, 8w (`width` w = 64 is the paper's).
  stem 'cifar' (default): the CIFAR variant of the CRD code base (RepDistiller `models/vgg.py`):
      max-pool after blocks 1-3 only, so blocks 4 and 5 both run at 4x4 on 32x32 inputs.
  stem 'imagenet': torchvision's `features` layout: max-pool after every block (224 -> 7).
Both end with global average pooling and one Linear layer; torchvision's 4096-wide two-layer
classifier is not used (the CIFAR variants drop it too). Convs keep their bias, as both sources do.

Exits after blocks 2, 3, 4 and 5 (stage 1 = blocks 1-2: an exit after block 1 would see a single conv).
Each stage starts with the max-pool that precedes its block, so exits see full-resolution maps.
"""

from __future__ import annotations

from torch import nn

from sdtool.models.common import check_classes, check_stem, check_width, multi_exit
from sdtool.models.registry import register_model

CONFIGS = {  # convs per block
    "vgg11_bn": [1, 1, 2, 2, 2],
    "vgg16_bn": [2, 2, 3, 3, 3],
    "vgg19_bn": [2, 2, 4, 4, 4],
}


def _block(c_in: int, c_out: int, convs: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [
            nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
    return layers


def build_vgg(name: str, num_classes: int, stem: str, width: int, head: str, attention: bool, exits: list[int] | None):
    check_classes(num_classes)
    check_stem(name, stem)
    check_width(name, width)
    widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
    blocks, c = [], 3
    for w, convs in zip(widths, CONFIGS[name], strict=True):
        blocks.append(_block(c, w, convs))
        c = w

    def pool() -> nn.MaxPool2d:
        return nn.MaxPool2d(2, 2)

    if stem == "cifar":
        stages = [
            nn.Sequential(*blocks[0], pool(), *blocks[1]),
            nn.Sequential(pool(), *blocks[2]),
            nn.Sequential(pool(), *blocks[3]),
            nn.Sequential(*blocks[4]),
        ]
        strides, names = [2, 2, 2, 1], ["block1+pool+block2", "pool+block3", "pool+block4", "block5"]
    else:
        stages = [
            nn.Sequential(*blocks[0], pool(), *blocks[1]),
            nn.Sequential(pool(), *blocks[2]),
            nn.Sequential(pool(), *blocks[3]),
            nn.Sequential(pool(), *blocks[4], pool()),
        ]
        strides, names = [2, 2, 2, 4], ["block1+pool+block2", "pool+block3", "pool+block4", "pool+block5+pool"]
    return multi_exit(stages, widths[1:], strides, names, num_classes, head, attention, exits)


def _register(name: str) -> None:
    def builder(
        num_classes: int = 100,
        stem: str = "cifar",
        width: int = 64,
        head: str = "byot",
        attention: bool = True,
        exits: list[int] | None = None,
    ):
        return build_vgg(name, num_classes, stem, width, head, attention, exits)

    builder.__name__ = name
    builder.__doc__ = f"{name}: VGG with BN, convs per block {CONFIGS[name]}; 4 exits (after blocks 2-5)."
    register_model(builder)


for _name in CONFIGS:
    _register(_name)
