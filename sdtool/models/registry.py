"""Backbone registry: one decorator registers a builder under its function name.

`create_model(name, **args)` fails loudly with the valid names, and every model carries its spec
(`model.spec`: registry name and arguments), which is what checkpoints store to rebuild it.

Installed packages add builders through the entry-point group `sdtool.models` (`name = "pkg.mod:builder"`,
or a module whose import registers builders with `@register_model`). They are loaded lazily, on the first
lookup of a name that is not registered or when listing, so a broken plugin costs nothing to commands that
use built-in models; each failure is kept as one line (`plugin_errors`), never raised as a traceback.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
from collections.abc import Callable
from typing import Any, overload

from torch import nn

from sdtool.errors import SdtoolError

Builder = Callable[..., nn.Module]
ENTRY_POINT_GROUP = "sdtool.models"

_REGISTRY: dict[str, Builder] = {}
# Builders behind a prefix or a spec (`torchvision:ARCH`, `timm:NAME`, a truncated exit): users name them
# through the prefix or get them from a checkpoint, so listings and error messages leave them out. Their
# modules register them with a plain `@register_model`; `register_model(internal=True)` adds one too.
_INTERNAL: set[str] = {"torchvision_wrapped", "truncated", "timm_wrapped"}
# `PREFIX:VALUE` names a family of models: VALUE is the first argument of the internal builder.
_PREFIXES: dict[str, str] = {"torchvision:": "torchvision_wrapped", "timm:": "timm_wrapped"}
_PLUGIN_OF: dict[str, str] = {}  # model name -> the distribution whose entry point registered it
_plugins: dict[str, Any] = {"loaded": False, "errors": []}


@overload
def register_model(fn: Builder, *, name: str | None = None, internal: bool = False) -> Builder: ...
@overload
def register_model(
    fn: None = None, *, name: str | None = None, internal: bool = False
) -> Callable[[Builder], Builder]: ...
def register_model(
    fn: Builder | None = None, *, name: str | None = None, internal: bool = False
) -> Builder | Callable[[Builder], Builder]:
    """`@register_model` or `@register_model(name=..., internal=True)`; internal builders are not listed."""

    def add(f: Builder) -> Builder:
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key} registered twice")
        _REGISTRY[key] = f
        if internal:
            _INTERNAL.add(key)
        return f

    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    """Every builder registered in this process, internal ones included (plugins are not loaded here)."""
    return sorted(_REGISTRY)


def public_models() -> list[str]:
    """The names a user can give: registered builders but internal ones, plugins included."""
    load_plugins()
    return sorted(n for n in _REGISTRY if n not in _INTERNAL)


def _public_builders() -> list[tuple[str, Builder]]:
    return [(n, _REGISTRY[n]) for n in public_models()]


def _describe(name: str, fn: Builder) -> str:
    line = (inspect.getdoc(fn) or "").strip().splitlines()[:1]
    text = line[0] if line else ""
    return text[len(name) + 2 :] if text.startswith(f"{name}: ") else text


def _source(name: str, fn: Builder) -> str:
    if name in _PLUGIN_OF:
        return f"plugin {_PLUGIN_OF[name]}"
    module = getattr(fn, "__module__", "") or ""
    return "built-in" if module.split(".")[0] == "sdtool" else f"python module {module}"


def model_entries() -> list[dict[str, str]]:
    """`sdtool models`: name, source (built-in, torchvision, timm, plugin DIST) and description of each model
    a user can name, prefixes (`torchvision:ARCH`) included where their builder is registered."""
    out = [{"name": n, "source": _source(n, fn), "description": _describe(n, fn)} for n, fn in _public_builders()]
    for prefix, builder in sorted(_PREFIXES.items()):
        fn = _REGISTRY.get(builder)
        if fn is not None:
            first = next(iter(inspect.signature(fn).parameters), "NAME").upper()
            out.append({"name": f"{prefix}{first}", "source": prefix[:-1], "description": _describe(builder, fn)})
    return out


def plugin_errors() -> list[str]:
    """One line per `sdtool.models` entry point that failed to load (after `load_plugins`)."""
    return list(_plugins["errors"])


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> None:
    dist = ep.dist.name if ep.dist is not None else "an unknown distribution"
    where = f"plugin {dist} (entry point {ep.name} = {ep.value} in group {ENTRY_POINT_GROUP})"
    before = set(_REGISTRY)
    try:
        obj = ep.load()
        if inspect.ismodule(obj):  # importing it registered its builders
            pass
        elif not callable(obj):
            raise TypeError(f"{ep.value} is a {type(obj).__name__}, not a builder function")
        elif _REGISTRY.get(ep.name) is not obj:
            register_model(obj, name=ep.name)
    except Exception as e:  # noqa: BLE001 - any failure of foreign code is reported, never raised
        first = (str(e).strip().splitlines() or [""])[0][:200]
        _plugins["errors"].append(
            f"{where} failed to load ({type(e).__name__}: {first}); fix or uninstall {dist} to use its models"
        )
    for n in set(_REGISTRY) - before:
        _PLUGIN_OF[n] = dist


def load_plugins() -> None:
    """Register the builders of installed `sdtool.models` entry points (once per process)."""
    if _plugins["loaded"]:
        return
    _plugins["loaded"] = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _load_entry_point(ep)


def _resolve(name: str, args: dict) -> tuple[str, dict]:
    """(builder name, arguments) for a user's name: `torchvision:ARCH` -> torchvision_wrapped(arch=ARCH, ...)."""
    for prefix, builder in _PREFIXES.items():
        if name.startswith(prefix) and builder in _REGISTRY:
            first = next(iter(inspect.signature(_REGISTRY[builder]).parameters))
            return builder, {first: name[len(prefix) :], **args}
    return name, args


def _unknown(name: str) -> SdtoolError:
    valid = public_models()
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    failing = [e for e in plugin_errors() if f"(entry point {name} = " in e]
    if failing:  # the name is there but its plugin is broken: that failure is the answer
        return SdtoolError(f"model {name!r} cannot be built: {failing[0]}")
    n_broken = len(plugin_errors())
    broken = f"; {n_broken} plugin(s) failed to load (`sdtool models` names them)" if n_broken else ""
    return SdtoolError(
        f"unknown model {name!r}{hint}; valid models: {', '.join(valid)}; a model from a plugin package needs "
        f"that package installed (`sdtool models` lists the installed ones){broken}"
    )


def builder(name: str) -> Builder | None:
    """The builder registered as `name` (a prefix's internal builder for `PREFIX:VALUE`); plugins are loaded on
    the first name not registered yet. None when there is none."""
    key, _ = _resolve(name, {})
    if key not in _REGISTRY:
        load_plugins()
        key, _ = _resolve(name, {})
    return _REGISTRY.get(key)


def takes(fn: Builder, key: str) -> bool:
    params = inspect.signature(fn).parameters
    return key in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def create_model(name: str, **args) -> nn.Module:
    """Build a registered model; `model.spec` records name and arguments for rebuilding.

    `torchvision:ARCH` is shorthand for `torchvision_wrapped(arch=ARCH, ...)` (sdtool/models/wrap.py).
    """
    fn = builder(name)
    if fn is None:
        raise _unknown(name)
    key, args = _resolve(name, args)
    unknown = [k for k in args if not takes(fn, k)]
    if unknown:
        raise SdtoolError(f"model {name} has no argument {unknown[0]!r}; valid: {', '.join(model_parameters(name))}")
    model = fn(**args)
    spec: dict[str, object] = {"name": key, "args": dict(args)}
    # A plain attribute; nn.Module.__setattr__ is annotated for tensors and modules only.
    model.spec = spec  # type: ignore[assignment]
    stage_names = getattr(model, "stage_names", None)
    if stage_names:  # backbones cut other than at their stages say where
        spec["stages"] = list(stage_names)
    return model


def model_parameters(name: str) -> list[str]:
    """Names of the arguments the builder of `name` takes ([] for an unknown name); for `PREFIX:VALUE`, the
    prefix's own argument (torchvision's `arch`) is left out: the name gives it."""
    fn = builder(name)
    if fn is None:
        return []
    fixed = _resolve(name, {})[1]
    return [p for p in inspect.signature(fn).parameters if p not in fixed]


def select_args(name: str, args: dict, defaults: dict) -> dict:
    """The arguments of `args` to pass to the builder of `name`.

    None means "the builder's default" and is dropped. A key the builder does not take is dropped while
    it equals `defaults` (e.g. the recipe's `stem: cifar` for a CIFAR ResNet, which has no other stem) and
    kept otherwise, so `create_model` reports it instead of ignoring a user's setting.
    """
    fn = builder(name)
    out = {}
    for k, v in args.items():
        if v is None:
            continue
        if fn is not None and not takes(fn, k) and (k not in defaults or v == defaults[k]):
            continue
        out[k] = v
    return out
