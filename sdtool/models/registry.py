"""Backbone registry: one decorator registers a builder under its function name.

`create_model(name, **args)` fails loudly with the valid names, and every model carries its spec
(`model.spec`: registry name and arguments), which is what checkpoints store to rebuild it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

from torch import nn

from sdtool.errors import SdtoolError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__} registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **args) -> nn.Module:
    """Build a registered model; `model.spec` records name and arguments for rebuilding.

    `torchvision:ARCH` is shorthand for `torchvision_wrapped(arch=ARCH, ...)` (sdtool/models/wrap.py).
    """
    if name.startswith("torchvision:"):
        name, args = "torchvision_wrapped", {"arch": name.split(":", 1)[1], **args}
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list_models(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SdtoolError(f"unknown model {name!r}{hint}; valid models: {', '.join(list_models())}")
    fn = _REGISTRY[name]
    params = inspect.signature(fn).parameters
    unknown = [k for k in args if k not in params]
    if unknown:
        raise SdtoolError(f"model {name} has no argument {unknown[0]!r}; valid: {', '.join(params)}")
    model = fn(**args)
    spec: dict[str, object] = {"name": name, "args": dict(args)}
    # A plain attribute; nn.Module.__setattr__ is annotated for tensors and modules only.
    model.spec = spec  # type: ignore[assignment]
    stage_names = getattr(model, "stage_names", None)
    if stage_names:  # backbones cut other than at their stages say where
        spec["stages"] = list(stage_names)
    return model


def model_parameters(name: str) -> list[str]:
    """Names of the arguments the builder of `name` takes ([] for an unknown name)."""
    if name.startswith("torchvision:"):
        name = "torchvision_wrapped"
    fn = _REGISTRY.get(name)
    return list(inspect.signature(fn).parameters) if fn is not None else []


def select_args(name: str, args: dict, defaults: dict) -> dict:
    """The arguments of `args` to pass to the builder of `name`.

    None means "the builder's default" and is dropped. A key the builder does not take is dropped while
    it equals `defaults` (e.g. the recipe's `stem: cifar` for a CIFAR ResNet, which has no other stem) and
    kept otherwise, so `create_model` reports it instead of ignoring a user's setting.
    """
    params = model_parameters(name)
    out = {}
    for k, v in args.items():
        if v is None:
            continue
        if params and k not in params and (k not in defaults or v == defaults[k]):
            continue
        out[k] = v
    return out
