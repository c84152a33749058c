"""The typed metadata of an sdtool checkpoint, read and checked before any model is built.

A checkpoint's `__metadata__["sdtool"]` is a JSON document; `CheckpointMeta.from_json` turns it into these
dataclasses and refuses, in one line naming the field, a document whose fields have the wrong type, or
whose sizes are not positive, exceed a hard cap or contradict each other (class names, per-channel
normalisation, the builder's num_classes, conv groups), so that nothing downstream reads a string key,
guesses at a type or hands a builder -4 (the memory a structure needs is checked by `sdtool.checkpoint`,
on the meta device). `to_json` writes the same document back: files written by earlier versions load
unchanged, and fields this version does not know are kept (`extra`) rather than dropped.

    meta = CheckpointMeta.from_json(raw, where="runs/sd/best.safetensors")
    meta.model.name, meta.input_size, meta.thresholds.values, meta.lineage[-1].command
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sdtool.errors import SdtoolError

T = TypeVar("T")
JSON = dict[str, Any]

# Hard caps (docs/checkpoint.md, "Limits"). Everything else that sizes a tensor is bounded by the memory
# the model it describes would take (sdtool.checkpoint), which never refuses a network this machine can hold.
MAX_INPUT_SIZE = 8192  # pixels a side: 16x the 512 px of the largest usual inputs; one 3x8192^2 image is 0.8 GB
MAX_CHANNELS = 1024  # input channels: images have 1-4, multispectral ones a few hundred


class _Reader:
    """Typed access to one JSON object; a wrong type names the field (`input.size`) and the file."""

    def __init__(self, raw: Any, where: str, prefix: str = ""):
        self.where, self.prefix = where, prefix
        if not isinstance(raw, dict):
            self.fail(prefix.rstrip(".") or "metadata", "an object", raw)
        self.raw: JSON = raw

    def fail(self, key: str, what: str, value: Any) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise SdtoolError(
            f"{self.where}: metadata field {key} must be {what}, not {shown}; the file is damaged or was edited"
        )

    def get(self, key: str, check: Callable[[Any], bool], what: str, default: Any = None) -> Any:
        value = self.raw.get(key, default)
        if value is not None and not check(value):
            self.fail(self.prefix + key, what, value)
        return value

    def required(self, key: str, check: Callable[[Any], bool], what: str) -> Any:
        if self.raw.get(key) is None:
            raise SdtoolError(f"{self.where}: the sdtool metadata lacks {self.prefix + key!r}; the file is damaged")
        return self.get(key, check, what)

    def positive(self, key: str, at_most: int) -> Any:
        """An integer from 1 to `at_most`: a field that sizes a tensor."""
        return self.get(key, lambda v: _is_pos_int(v) and v <= at_most, f"a positive integer of at most {at_most}")

    def sub(self, key: str) -> _Reader | None:
        value = self.raw.get(key)
        return None if value is None else _Reader(value, self.where, f"{self.prefix}{key}.")

    def rest(self, known: set[str]) -> JSON:
        return {k: v for k, v in self.raw.items() if k not in known}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _is_pos_int(v: Any) -> bool:
    return _is_int(v) and v >= 1


def _is_finite(v: Any) -> bool:
    return _is_num(v) and math.isfinite(v)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _known(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"extra"}


# Builder arguments that size tensors or choose the structure, checked before any builder runs: a builder
# handed "four" or -4 fails with a traceback (or, for a huge width, after allocating). Names no builder
# takes are left to create_model, which names them; `null` means the builder's default where one exists.
_BUILDER_ARGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_classes": (_is_pos_int, "a positive integer"),
    "width": (_is_pos_int, "a positive integer"),
    "width_mult": (lambda v: _is_finite(v) and v > 0, "a positive number"),
    "input_size": (lambda v: _is_pos_int(v) and v <= MAX_INPUT_SIZE, f"a positive integer of at most {MAX_INPUT_SIZE}"),
    "exit": (_is_pos_int, "a positive integer (an exit number)"),
    # Tuples too: `save` checks the spec of a model built from Python (`create_model(..., exits=(1, 2))`).
    "exits": (lambda v: _list_of(_is_pos_int)(list(v) if isinstance(v, tuple) else v), "a list of positive integers"),
    "exits_after": (lambda v: _list_of(_is_str)(list(v) if isinstance(v, tuple) else v), "a list of module names"),
    "attention": (lambda v: isinstance(v, bool), "true or false"),
    "split_layer1": (lambda v: isinstance(v, bool), "true or false"),
    "base_args": (_is_dict, "an object of builder arguments"),
    **{k: (_is_str, "a string") for k in ("arch", "base", "stem", "head")},
}
_NULLABLE_ARGS = {"exits", "exits_after"}


def _check_builder_args(args: JSON, where: str, prefix: str, num_classes: int | None) -> None:
    r = _Reader(args, where, prefix)
    for key, (check, what) in _BUILDER_ARGS.items():
        if key in args and not (args[key] is None and key in _NULLABLE_ARGS) and not check(args[key]):
            r.fail(prefix + key, what, args[key])
    if num_classes is not None and args.get("num_classes", num_classes) != num_classes:
        r.fail(prefix + "num_classes", f"the checkpoint's num_classes ({num_classes})", args["num_classes"])
    if "base_args" in args:  # truncated(base, base_args, exit): the base model's own arguments
        _check_builder_args(args["base_args"], where, prefix + "base_args.", num_classes)


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds the network: a registered builder's name and its JSON arguments."""

    name: str
    args: JSON = field(default_factory=dict)
    stages: list[str] | None = None  # wrapped models: where each stage starts and ends (informational)

    @classmethod
    def from_json(cls, raw: Any, where: str, prefix: str = "model.", num_classes: int | None = None) -> ModelSpec:
        """`num_classes`: the checkpoint's, which every `num_classes` among the arguments must equal."""
        r = _Reader(raw, where, prefix)
        name = r.required("name", _is_str, "a builder name (a string)")
        args = r.get("args", _is_dict, "an object of builder arguments") or {}
        _check_builder_args(args, where, prefix + "args.", num_classes)
        return cls(name=name, args=args, stages=r.get("stages", _list_of(_is_str), "a list of strings"))

    def to_json(self) -> JSON:
        out: JSON = {"name": self.name, "args": self.args}
        if self.stages is not None:
            out["stages"] = self.stages
        return out


@dataclass(frozen=True)
class InputSpec:
    """The input the network expects: a square `size`, `channels`, and the normalisation it was trained with."""

    size: int = 32
    channels: int = 3
    mean: list[float] | None = None
    std: list[float] | None = None

    @classmethod
    def from_json(cls, raw: Any, where: str) -> InputSpec:
        r = _Reader(raw, where, "input.")
        channels = r.positive("channels", MAX_CHANNELS) or 3
        per_channel = (lambda v: _list_of(_is_num)(v) and len(v) == channels, f"a list of {channels} numbers")
        return cls(
            size=r.positive("size", MAX_INPUT_SIZE) or 32,
            channels=channels,
            mean=r.get("mean", *per_channel),
            std=r.get("std", *per_channel),
        )

    def to_json(self) -> JSON:
        return {"size": self.size, "channels": self.channels, "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class DataRef:
    """The data set the network was trained on (its recipe's data section says how it was read)."""

    name: str
    root: str | None = None
    train_file: str | None = None
    test_file: str | None = None
    extra: JSON = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any, where: str) -> DataRef:
        r = _Reader(raw, where, "data.")
        return cls(
            name=r.required("name", _is_str, "a data set name (a string)"),
            root=r.get("root", _is_str, "a string"),
            train_file=r.get("train_file", _is_str, "a string"),
            test_file=r.get("test_file", _is_str, "a string"),
            extra=r.rest(_known(cls)),
        )

    def to_json(self) -> JSON:
        return {
            "name": self.name,
            "root": self.root,
            "train_file": self.train_file,
            "test_file": self.test_file,
            **self.extra,
        }


@dataclass(frozen=True)
class ValSplit:
    """The held-out validation split: `size` images of `of`, drawn with `seed`; `fingerprint` hashes the
    chosen indices with their labels, so a later run can tell that it cut the same images (files from
    before the fingerprint lack `of` and `fingerprint`)."""

    size: int
    seed: int
    of: int | None = None
    fingerprint: str | None = None

    @classmethod
    def from_json(cls, raw: Any, where: str) -> ValSplit:
        r = _Reader(raw, where, "val_split.")
        return cls(
            size=r.required("size", _is_int, "an integer"),
            seed=r.required("seed", _is_int, "an integer"),
            of=r.get("of", _is_int, "an integer"),
            fingerprint=r.get("fingerprint", _is_str, "a string"),
        )

    def to_json(self) -> JSON:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Thresholds:
    """Fitted early-exit thresholds: one per shallow exit in the policy's unit (None: that exit never
    answers), who answers the rest, and the report of the fit that chose them."""

    policy: str
    values: list[float | None]
    fallback: str = "deepest"
    fitted_on: JSON | None = None

    @classmethod
    def from_json(cls, raw: Any, where: str) -> Thresholds:
        r = _Reader(raw, where, "thresholds.")
        return cls(
            policy=r.required("policy", _is_str, "a policy name (a string)"),
            values=r.get("values", _list_of(lambda v: v is None or _is_num(v)), "a list of numbers or nulls") or [],
            fallback=r.get("fallback", _is_str, "a string") or "deepest",
            fitted_on=r.get("fitted_on", _is_dict, "an object"),
        )

    def to_json(self) -> JSON:
        return {
            "policy": self.policy,
            "values": list(self.values),
            "fallback": self.fallback,
            "fitted_on": self.fitted_on,
        }


@dataclass(frozen=True)
class LineageEntry:
    """One step of a checkpoint's history. `extra` holds what only some commands record (argv, world_size,
    prune options, the teacher, the exported exit)."""

    command: str
    sdtool_version: str | None = None
    recipe: JSON | None = None
    parent: str | None = None
    parent_sha256: str | None = None
    started: str | None = None
    ended: str | None = None
    metrics: JSON = field(default_factory=dict)
    extra: JSON = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any, where: str, i: int) -> LineageEntry:
        r = _Reader(raw, where, f"lineage[{i}].")
        return cls(
            command=r.required("command", _is_str, "a string"),
            sdtool_version=r.get("sdtool_version", _is_str, "a string"),
            recipe=r.get("recipe", _is_dict, "an object"),
            parent=r.get("parent", _is_str, "a string"),
            parent_sha256=r.get("parent_sha256", _is_str, "a string"),
            started=r.get("started", _is_str, "a string"),
            ended=r.get("ended", _is_str, "a string"),
            metrics=r.get("metrics", _is_dict, "an object") or {},
            extra=r.rest(_known(cls)),
        )

    def to_json(self) -> JSON:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **self.extra}


# The sizes `sdtool.models.shapes` records per module type (all positive; conv groups divide both channels).
_SHAPE_FIELDS = {
    "conv2d": ("in_channels", "out_channels", "groups"),
    "batchnorm2d": ("num_features",),
    "linear": ("in_features", "out_features"),
}


def _check_shape(raw: Any, where: str, prefix: str) -> None:
    r = _Reader(raw, where, prefix)
    kind = r.required("type", lambda v: isinstance(v, str) and v in _SHAPE_FIELDS, "conv2d, batchnorm2d or linear")
    sizes = {key: r.required(key, _is_pos_int, "a positive integer") for key in _SHAPE_FIELDS[kind]}
    if kind == "conv2d" and (sizes["in_channels"] % sizes["groups"] or sizes["out_channels"] % sizes["groups"]):
        what = f"a divisor of in_channels ({sizes['in_channels']}) and out_channels ({sizes['out_channels']})"
        r.fail(prefix + "groups", what, sizes["groups"])


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything a checkpoint says about itself besides its tensors.

    `model` and `shapes` describe the structure (`shapes`: modules whose sizes differ from a fresh build,
    e.g. after pruning); the rest describes the data, the early-exit setting and the history.
    """

    model: ModelSpec
    num_classes: int
    class_names: list[str] | None = None
    input: InputSpec | None = None
    shapes: dict[str, JSON] = field(default_factory=dict)
    data: DataRef | None = None
    val_split: ValSplit | None = None
    thresholds: Thresholds | None = None
    ensemble: str = "logits"
    mode: str | None = None
    metrics: JSON = field(default_factory=dict)
    lineage: list[LineageEntry] = field(default_factory=list)
    format_version: int | None = None  # filled in when saved
    sdtool_version: str | None = None
    extra: JSON = field(default_factory=dict)

    @property
    def input_size(self) -> int:
        """The square input side the network expects (32 when the file does not say)."""
        return self.input.size if self.input is not None else 32

    def recorded_recipe(self) -> JSON | None:
        """The resolved recipe of the latest lineage step that trained the checkpoint (prune steps have none)."""
        return next((e.recipe for e in reversed(self.lineage) if e.recipe), None)

    def replace(self, **changes: Any) -> CheckpointMeta:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_json(cls, raw: Any, where: str) -> CheckpointMeta:
        r = _Reader(raw, where)

        def opt(key: str, parse: Callable[[Any, str], T]) -> T | None:
            return None if r.raw.get(key) is None else parse(r.raw[key], where)

        lineage = r.get("lineage", lambda v: isinstance(v, list), "a list", default=[]) or []
        shapes = r.get("shapes", _is_dict, "an object", default={}) or {}
        for name, s in shapes.items():
            _check_shape(s, where, f"shapes.{name}.")
        num_classes = r.required("num_classes", _is_pos_int, "a positive integer")
        class_names = r.get("class_names", _list_of(lambda v: isinstance(v, (str, int))), "a list of names")
        if class_names is not None and len(class_names) != num_classes:
            r.fail("class_names", f"a list of num_classes ({num_classes}) names", class_names)
        return cls(
            model=ModelSpec.from_json(r.required("model", _is_dict, "an object"), where, num_classes=num_classes),
            num_classes=num_classes,
            class_names=class_names,
            input=opt("input", InputSpec.from_json),
            shapes=shapes,
            data=opt("data", DataRef.from_json),
            val_split=opt("val_split", ValSplit.from_json),
            thresholds=opt("thresholds", Thresholds.from_json),
            ensemble=r.get("ensemble", _is_str, "a string") or "logits",
            mode=r.get("mode", _is_str, "a string"),
            metrics=r.get("metrics", _is_dict, "an object") or {},
            lineage=[LineageEntry.from_json(e, where, i) for i, e in enumerate(lineage)],
            format_version=r.get("format_version", _is_int, "an integer"),
            sdtool_version=r.get("sdtool_version", _is_str, "a string"),
            extra=r.rest(_known(cls)),
        )

    def to_json(self) -> JSON:
        """The JSON document; every field is written (null where unset), fields of other versions after them."""

        def js(v: Any) -> Any:
            return v.to_json() if hasattr(v, "to_json") else v

        out: JSON = {f.name: js(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        out["lineage"] = [e.to_json() for e in self.lineage]
        return {**out, **self.extra}
