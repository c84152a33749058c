"""Typed dataclasses from plain data: the small walk behind recipe loading and the recipe reference.

`build(cls, data)` turns nested dicts (YAML) into nested dataclasses, coercing each value to its field's
type and refusing unknown keys with a suggestion; `reference_markdown(cls)` renders the fields' types,
defaults and `help` metadata as Markdown tables. Hand-written (no pydantic) because the error messages
are the product: every one names the dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union, cast

import yaml

from sdtool.errors import SdtoolError


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:  # booleans as YAML spells them
        return "one of " + ", ".join(str(a).lower() if isinstance(a, bool) else repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list ({_type_name(typing.get_args(tp)[0])} each)"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    bad = SdtoolError(f"{key}: expected {_type_name(tp)}, got {value!r}; fix the recipe or the --set value")
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:  # Optional[X]: X's own message is the precise one
            return _coerce(value, args[0], key)
        for a in args:
            try:
                return _coerce(value, a, key)
            except SdtoolError:
                pass
        raise bad
    if origin is Literal:
        # Compare types too: 1 == True, so `in` alone would let 1 or 0.0 through a Literal of booleans.
        if not any(type(value) is type(a) and value == a for a in typing.get_args(tp)):
            raise SdtoolError(f"{key}: {value!r} is not allowed; use {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SdtoolError(f"{prefix or 'recipe'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = (
                f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?"
                if close
                else (f"; valid keys: {', '.join(names)}")
            )
            raise SdtoolError(f"unknown key {dotted}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(cast(type, tp), value, dotted)  # a section: the dataclass itself, not an instance
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def build(cls: type, data: Any) -> Any:
    """An instance of the dataclass `cls` from `data` (nested dicts), checked field by field."""
    return _build(cls, data, "")


def reference_markdown(root: type) -> str:
    """Markdown tables of the fields of `root` and its nested sections: key, type, default, help."""
    out = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows = []
        nested = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                nested.append((f, cast(type, tp)))  # a section: the dataclass itself, not an instance
                continue
            # Every field has a default or a default factory (see _f).
            default = (
                f.default if f.default is not dataclasses.MISSING else cast(Callable[[], Any], f.default_factory)()
            )
            shown = yaml.safe_dump(default).strip().removesuffix("...").strip()
            rows.append(f"| `{prefix}{f.name}` | {_type_name(tp)} | `{shown}` | {f.metadata.get('help', '')} |")
        if rows:
            out.append(f"\n### `{prefix.rstrip('.') or 'recipe'}`\n")
            out.append("| key | type | default | meaning |\n|---|---|---|---|")
            out.extend(rows)
        for f, tp in nested:
            walk(tp, f"{prefix}{f.name}.")

    walk(root, "")
    return "\n".join(out) + "\n"
