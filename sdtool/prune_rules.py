"""What sdtool tells Torch-Pruning: importance criteria by name and pruners for its own layer types."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn

from sdtool.errors import SdtoolError
from sdtool.models.common import FixedWidth, fixed_width_types
from sdtool.prune_options import CRITERIA


def make_importance(name: str) -> tp.importance.Importance:
    """Torch-Pruning importance estimator by criterion name (group importance, mean-normalised)."""
    imp = tp.importance
    table: dict[str, Callable[[], tp.importance.Importance]] = {
        "l1": lambda: imp.MagnitudeImportance(p=1),
        "l2": lambda: imp.MagnitudeImportance(p=2),
        "taylor": lambda: imp.TaylorImportance(),  # needs .grad on the weights (see sdtool.prune._taylor_grads)
        "bn_scale": lambda: imp.BNScaleImportance(),
        "fpgm": lambda: imp.FPGMImportance(),
        "lamp": lambda: imp.LAMPImportance(),
        "random": lambda: imp.RandomImportance(),
    }
    if name not in table:
        raise SdtoolError(f"unknown criterion {name!r}; valid criteria: {', '.join(CRITERIA)}")
    return table[name]()


class TieBreak(tp.importance.Importance):
    """Adds a jitter a millionth of the largest score, so that equal scores (BN scales of an untrained
    net are all 1) do not all fall under a global threshold at once, which makes Torch-Pruning skip
    those groups whole. Deterministic: pruning runs under a fixed seed."""

    def __init__(self, inner: tp.importance.Importance):
        self.inner = inner

    def __call__(self, group):
        imp = self.inner(group)
        if imp is None:
            return None
        return imp + (imp.abs().max() * 1e-6 + 1e-12) * torch.rand(imp.shape, device=imp.device)


class _FixedWidth(tp.pruner.function.BasePruningFunc):
    """Pruner for a layer whose width is fixed (`sdtool.models.common.FixedWidth`, e.g. ShuffleNet's shuffle).

    Separate in- and out-channel functions make it a boundary in the dependency graph, like a
    convolution, instead of something channels are mapped through. `sdtool.prune._plan` keeps every group that
    reaches it unpruned, so these functions are never asked to remove a channel.
    """

    TARGET_MODULES = (FixedWidth,)

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        if len(idxs):
            raise AssertionError("a channel shuffle's widths are fixed")
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        return self.prune_out_channels(layer, idxs)

    def get_out_channels(self, layer: FixedWidth) -> int:
        return layer.channels

    get_in_channels = get_out_channels


def custom_pruners() -> dict[type[nn.Module], tp.pruner.function.BasePruningFunc]:
    """Torch-Pruning's pruners for sdtool's own layer types, by exact class (as Torch-Pruning looks them up)."""
    fixed = _FixedWidth()
    return {cls: fixed for cls in fixed_width_types()}
