"""A recipe's model section as builder arguments: what `sdtool train` and `sdtool profile RECIPE` build."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from sdtool.errors import SdtoolError
from sdtool.models.registry import builder, model_parameters, select_args, takes

if TYPE_CHECKING:
    from sdtool.recipe import Recipe

# The recipe's `model.<key>` settings that become builder arguments of the same name (num_classes and
# input_size come from the data, not from the user's model section).
_RECIPE_KEYS = ("stem", "width", "width_mult", "head", "attention", "exits", "exits_after", "split_layer1")


def model_args(recipe: Recipe, num_classes: int, input_size: int | None = None) -> dict[str, Any]:
    """Builder arguments from the model section: null keys are left to the builder's defaults, and keys a
    builder does not take (e.g. `stem` of the CIFAR ResNets) are dropped while they keep their defaults."""
    from sdtool.recipe import ModelConfig

    m = recipe.model
    args: dict[str, Any] = {"num_classes": num_classes, **{k: getattr(m, k) for k in _RECIPE_KEYS}}
    args["input_size"] = input_size
    if recipe.sd.mode == "plain":  # the paper's baseline: the backbone alone with its own classifier
        args.update(exits=[], attention=False)
    out = select_args(m.name, args, dataclasses.asdict(ModelConfig()))
    _check_recipe_keys(recipe, out)
    return out


def _check_recipe_keys(recipe: Recipe, args: dict[str, Any]) -> None:
    """A recipe key the builder does not take fails here, named as the user wrote it (`model.width`), not as
    the internal builder's argument that `create_model` would name (`torchvision_wrapped ... 'width'`)."""
    from sdtool.recipe import ModelConfig

    name = recipe.model.name
    fn = builder(name)
    if fn is None:
        return  # an unknown name: create_model says so, with the valid names
    for key in (k for k in _RECIPE_KEYS if k in args and not takes(fn, k)):
        if recipe.sd.mode == "plain" and key in ("exits", "attention"):
            raise SdtoolError(
                f"sd.mode plain trains {name} without its exits, but its builder takes no {key} argument; "
                "use another sd.mode, or a builder that takes exits and attention"
            )
        default = getattr(ModelConfig(), key)  # the fix in the recipe's words: null, true, cifar
        shown = default if isinstance(default, str) else json.dumps(default)
        raise SdtoolError(
            f"model.{key} does not apply to {name} ({_why(key, name)}); remove model.{key} from the recipe or "
            f"set it to {shown}"
        )


def _why(key: str, name: str) -> str:
    applies = [f"model.{k}" for k in _RECIPE_KEYS if k in model_parameters(name)]
    if key in ("width", "width_mult"):
        other = "width_mult" if key == "width" else "width"
        if other in model_parameters(name):
            return f"it takes model.{other} instead"
        return "its width is fixed by the architecture"
    takes = f"; its settings are {', '.join(applies)}" if applies else ""
    return f"it has no argument {key!r}{takes}"
