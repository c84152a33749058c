"""A recipe's model section as builder arguments: what `sdtool train` and `sdtool profile RECIPE` build."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from sdtool.models.registry import select_args

if TYPE_CHECKING:
    from sdtool.recipe import Recipe


def model_args(recipe: Recipe, num_classes: int, input_size: int | None = None) -> dict[str, Any]:
    """Builder arguments from the model section: null keys are left to the builder's defaults, and keys a
    builder does not take (e.g. `stem` of the CIFAR ResNets) are dropped while they keep their defaults."""
    from sdtool.recipe import ModelConfig

    m = recipe.model
    args = {
        "num_classes": num_classes,
        "stem": m.stem,
        "width": m.width,
        "width_mult": m.width_mult,
        "head": m.head,
        "attention": m.attention,
        "exits": m.exits,
        "exits_after": m.exits_after,
        "split_layer1": m.split_layer1,
        "input_size": input_size,
    }
    if recipe.sd.mode == "plain":  # the paper's baseline: the backbone alone with its own classifier
        args.update(exits=[], attention=False)
    return select_args(m.name, args, dataclasses.asdict(ModelConfig()))
