"""The typed results of the Python API (sdtool.api): frozen dataclasses with the key numbers as attributes.

Each result keeps the full report its command prints with `--json` as `.raw` (`.to_json()` returns a
JSON-safe copy), so a script reads `result.top1` or `result.exits[0].macs` instead of digging through
dicts, and can still reach every detail. Accuracies are percent, costs are MACs (fvcore: one
multiply-add counts once) and parameters; exits are numbered from 1, shallow to deep. No torch here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JSON = dict[str, Any]


class _Result:
    """`.to_json()`: the report as plain JSON (paths and other objects as strings)."""

    raw: JSON

    def to_json(self) -> JSON:
        return json.loads(json.dumps(self.raw, default=str))


def _opt_path(p: Any) -> Path | None:
    return Path(p) if p else None


@dataclass(frozen=True)
class Accuracy:
    """One exit's (or the ensemble's, `exit` None) top-1 and top-5 accuracy and mean cross-entropy."""

    exit: int | None
    top1: float
    top5: float
    loss: float

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], exit: int | None) -> Accuracy:  # noqa: A002 - the report's name
        return cls(exit, float(raw["top1"]), float(raw["top5"]), float(raw["loss"]))


@dataclass(frozen=True)
class EvalResult(_Result):
    """Per-exit and ensemble accuracy of `checkpoint` on `n` images of a split (`sdtool eval --json`).

    `top1` is the deepest exit's; `exit_top1` every exit's, shallow to deep."""

    checkpoint: Path
    data: str | None
    split: str
    n: int
    exits: tuple[Accuracy, ...]
    ensemble: Accuracy | None
    raw: JSON = field(repr=False, compare=False)

    @property
    def top1(self) -> float:
        return self.exits[-1].top1

    @property
    def exit_top1(self) -> tuple[float, ...]:
        return tuple(e.top1 for e in self.exits)

    @classmethod
    def from_json(cls, raw: JSON, split: str | None = None, data: str | None = None) -> EvalResult:
        ens = raw.get("ensemble")
        return cls(
            checkpoint=Path(raw["checkpoint"]),
            data=raw.get("data", data),
            split=raw.get("split", split or "test"),
            n=int(raw["n"]),
            exits=tuple(Accuracy.from_json(e, int(e["exit"])) for e in raw["exits"]),
            ensemble=Accuracy.from_json(ens, None) if ens else None,
            raw=raw,
        )


@dataclass(frozen=True)
class TrainResult(_Result):
    """A finished training (or distillation) run: its folder, checkpoints and test accuracy.

    `checkpoint` is the one to use next: `best` (chosen on the validation split) when the recipe holds
    one out, else `last`; `test` is its accuracy on the test split (reported, never used to select)."""

    run_dir: Path
    checkpoint: Path
    best: Path | None
    last: Path
    epochs: int
    test: EvalResult | None
    history: tuple[JSON, ...] = field(repr=False)
    raw: JSON = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, raw: JSON, data: str | None = None) -> TrainResult:
        best, last = _opt_path(raw.get("best")), Path(raw["last"])
        test = raw.get("test")
        return cls(
            run_dir=Path(raw["run_dir"]),
            checkpoint=best or last,
            best=best,
            last=last,
            epochs=len(raw.get("epochs") or []),
            test=EvalResult.from_json(test, "test", data) if test else None,
            history=tuple(raw.get("epochs") or []),
            raw=raw,
        )


@dataclass(frozen=True)
class ExitCost:
    """What exit `exit` costs alone (the stages up to it and its own head) and with every shallower
    head computed too (`cumulative_*`), and its share of the reference cost (the deepest exit alone).
    `latency_ms` (profile with latency only): median milliseconds per batch, by batch size."""

    exit: int
    params: int
    macs: int
    cumulative_params: int
    cumulative_macs: int
    share_of_reference: float | None
    latency_ms: Mapping[int, float] | None = None


@dataclass(frozen=True)
class Costs:
    """Parameters and MACs of a multi-exit network (`sdtool.profile.exit_costs`): `params` and `macs`
    of the whole net with every exit computed, `reference_macs` of the deepest exit alone, per exit."""

    params: int
    macs: int
    reference_macs: int
    exits: tuple[ExitCost, ...]

    @classmethod
    def from_json(cls, raw: JSON, latency: JSON | None = None) -> Costs:
        rows = (latency or {}).get("exits") or [None] * len(raw["exits"])
        return cls(
            params=int(raw["full"]["params"]),
            macs=int(raw["full"]["macs"]),
            reference_macs=int(raw["reference"]["macs"]),
            exits=tuple(
                ExitCost(
                    exit=int(e["exit"]),
                    params=int(e["params"]),
                    macs=int(e["macs"]),
                    cumulative_params=int(e.get("cumulative_params", e["params"])),
                    cumulative_macs=int(e.get("cumulative_macs", e["macs"])),
                    share_of_reference=e.get("share_of_reference"),
                    latency_ms=_by_batch(row["latency_ms"]) if row else None,
                )
                for e, row in zip(raw["exits"], rows, strict=False)
            ),
        )


def _by_batch(ms: Mapping[str, float]) -> dict[int, float]:
    return {int(b): float(v) for b, v in ms.items()}


@dataclass(frozen=True)
class ProfileResult(_Result):
    """`sdtool profile --json`: costs per exit and of the whole net, and latency when measured
    (`latency_ms`: the whole net's median milliseconds per batch, by batch size; details in `.raw`)."""

    target: Path
    kind: str
    num_classes: int
    costs: Costs
    latency_ms: Mapping[int, float] | None
    raw: JSON = field(repr=False, compare=False)

    @property
    def params(self) -> int:
        return self.costs.params

    @property
    def macs(self) -> int:
        return self.costs.macs

    @property
    def exits(self) -> tuple[ExitCost, ...]:
        return self.costs.exits

    @classmethod
    def from_json(cls, raw: JSON) -> ProfileResult:
        lat = raw.get("latency")
        return cls(
            target=Path(raw["target"]),
            kind=raw.get("kind", "checkpoint"),
            num_classes=int(raw["num_classes"]),
            costs=Costs.from_json(raw, lat),
            latency_ms=_by_batch(lat["full"]["latency_ms"]) if lat else None,
            raw=raw,
        )


@dataclass(frozen=True)
class PruneResult(_Result):
    """`sdtool prune --json`: the pruned checkpoint `out` and what pruning removed.

    `macs_fraction`, `params_fraction`: kept fractions of the whole multi-exit net; `ratio`: the channel
    ratio used (found by the search for `target_macs`); `accuracy_before`/`_after` with `evaluate=True`."""

    checkpoint: Path
    out: Path
    sha256: str | None
    ratio: float
    macs_fraction: float
    params_fraction: float
    before: Costs
    after: Costs
    accuracy_before: EvalResult | None
    accuracy_after: EvalResult | None
    seconds: float
    raw: JSON = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, raw: JSON) -> PruneResult:
        acc = raw.get("accuracy") or {}

        def ev(which: str, path: str) -> EvalResult | None:
            rep = acc.get(which)
            return EvalResult.from_json({"checkpoint": path, **rep}, acc.get("split"), acc.get("data")) if rep else None

        return cls(
            checkpoint=Path(raw["checkpoint"]),
            out=Path(raw["out"]),
            sha256=raw.get("sha256"),
            ratio=float(raw["ratio"]),
            macs_fraction=float(raw["macs_fraction"]),
            params_fraction=float(raw["params_fraction"]),
            before=Costs.from_json(raw["before"]),
            after=Costs.from_json(raw["after"]),
            accuracy_before=ev("before", raw["checkpoint"]),
            accuracy_after=ev("after", raw["out"]),
            seconds=float(raw["seconds"]),
            raw=raw,
        )


@dataclass(frozen=True)
class ExitUsage:
    """One exit under early exit: its threshold (None for the last), the samples it answered (count and
    fraction), their top-1, and the MACs a sample leaving there cost (`leave_macs`)."""

    exit: int
    threshold: float | None
    count: int
    fraction: float
    top1: float | None
    leave_macs: float


@dataclass(frozen=True)
class EarlyExitResult(_Result):
    """`sdtool eval --early-exit --json`: real early exit on a split, against the deepest exit alone.

    `accuracy_drop` is in points (deepest_top1 - top1); `macs_speedup` = reference / expected MACs;
    `speedup_batch_1` and `speedup_batch_n` are wall-clock ratios measured side by side in one run
    (batch 1 is None when `latency_images=0`). `fitted`: the thresholds were fitted on the validation
    split (else the checkpoint's stored ones ran); `out`: where the fitted checkpoint was written."""

    checkpoint: Path
    data: str
    split: str
    n: int
    policy: str
    fallback: str
    thresholds: tuple[float | None, ...]
    top1: float
    deepest_top1: float
    accuracy_drop: float
    expected_macs: float
    reference_macs: float
    macs_fraction: float
    macs_speedup: float
    speedup_batch_1: float | None
    speedup_batch_n: float
    exits: tuple[ExitUsage, ...]
    fitted: bool
    out: Path | None
    warnings: tuple[str, ...]
    raw: JSON = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, raw: JSON) -> EarlyExitResult:
        wall = raw.get("wall_clock_speedup") or {}
        keys = ("n", "top1", "deepest_top1", "accuracy_drop", "expected_macs", "reference_macs")
        n, top1, deep, drop, expected, ref = (raw[k] for k in keys)
        return cls(
            checkpoint=Path(raw["checkpoint"]),
            data=raw["data"],
            split=raw["split"],
            n=int(n),
            policy=raw["policy"],
            fallback=raw["fallback"],
            thresholds=tuple(raw["thresholds"]),
            top1=float(top1),
            deepest_top1=float(deep),
            accuracy_drop=float(drop),
            expected_macs=float(expected),
            reference_macs=float(ref),
            macs_fraction=float(raw["macs_fraction"]),
            macs_speedup=float(raw["macs_speedup"]),
            speedup_batch_1=wall.get("batch_1"),
            speedup_batch_n=float(wall["batch_n"]),
            exits=tuple(
                ExitUsage(e["exit"], e["threshold"], e["count"], e["fraction"], e["top1"], e["leave_macs"])
                for e in raw["exits"]
            ),
            fitted=raw.get("fit") is not None,
            out=_opt_path(raw.get("written")),
            warnings=tuple(raw.get("warnings") or []),
            raw=raw,
        )


@dataclass(frozen=True)
class ExportResult(_Result):
    """`sdtool export --json`: the written file, its format, the exit kept (None: every exit) and, when
    checked, the comparison with PyTorch (`check`, details as in docs/export.md)."""

    checkpoint: Path
    out: Path
    format: str
    exit: int | None
    exits: int
    parameters: int
    file_size: int
    check: JSON | None
    raw: JSON = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, raw: JSON) -> ExportResult:
        return cls(
            checkpoint=Path(raw["checkpoint"]),
            out=Path(raw["out"]),
            format=raw["format"],
            exit=raw.get("exit"),
            exits=int(raw["exits"]),
            parameters=int(raw["parameters"]),
            file_size=int(raw["file_size"]),
            check=raw.get("check"),
            raw=raw,
        )
