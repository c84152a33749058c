"""Helpers shared by the backbone builders (CIFAR ResNets, WRN, VGG, MobileNetV2, ShuffleNetV2)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sdtool.errors import SdtoolError
from sdtool.models.multi_exit import MultiExitNet


class FixedWidth(nn.Module):
    """A layer whose channel count must not change under pruning, such as a fixed channel permutation.

    Subclasses set `channels`. The pruner treats every subclass as a boundary it never prunes through
    (sdtool.prune_rules), so a backbone can bring such layers without the pruner knowing the backbone.
    """

    channels: int


def fixed_width_types() -> list[type[FixedWidth]]:
    """Every FixedWidth subclass defined so far (the pruner dispatches on exact classes)."""
    out, todo = [], list(FixedWidth.__subclasses__())
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def check_classes(num_classes: int) -> None:
    if num_classes is None or num_classes < 1:
        raise SdtoolError("model.num_classes must be a positive integer (or null to take the data set's)")


def check_width(name: str, value, what: str = "width") -> None:
    if value is None or value <= 0:
        raise SdtoolError(f"model.{what} of {name} must be positive, got {value!r}")


def check_stem(name: str, stem: str) -> None:
    if stem not in ("cifar", "imagenet"):
        raise SdtoolError(f"unknown stem {stem!r} for {name}; valid stems: cifar, imagenet")


def init_weights(net: nn.Module) -> None:
    """The initialisation torchvision and the CIFAR ports use: Kaiming (fan-out) convs, BN 1/0,
    Linear N(0, 0.01) with zero bias."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def multi_exit(
    stages: Sequence[nn.Module],
    widths: list[int],
    strides: list[int],
    names: list[str],
    num_classes: int,
    head: str,
    attention: bool,
    exits: list[int] | None,
) -> MultiExitNet:
    """A MultiExitNet over `stages`, initialised as above (exits and heads included)."""
    net = MultiExitNet(
        stages, widths, num_classes, exits=exits, head=head, attention=attention, strides=strides, stage_names=names
    )
    init_weights(net)
    return net


def split_point(n_blocks: int) -> int:
    """Where a stage of n blocks is cut in two for a fourth exit: after n // 2 blocks (0 = the stem alone)."""
    return n_blocks // 2
