"""The pruning options, stated once: names, defaults, help and range checks (no torch here).

`PruneSettings` holds what a recipe's `prune` section and `sdtool prune` share. `PruneOptions` (what the
pruner runs with) adds the command's own knobs; the recipe's `PruneConfig` adds the pipeline's. The CLI
takes its help text from these fields, and `check` is the only place their ranges are enforced, naming
each setting the way the user wrote it (`--ratio` on the command line, `prune.ratio` in a recipe).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from sdtool.errors import SdtoolError

CRITERIA = ("l1", "l2", "taylor", "bn_scale", "fpgm", "lamp", "random")

# How each setting is spelled on the command line, where it differs from the field name.
_CLI_NAMES: dict[str, str] = {}  # settings whose flag is not --<name with dashes>


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def help_of(cls: type, name: str) -> str:
    """The help text of field `name` of a settings dataclass (for the CLI's options)."""
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


@dataclass
class PruneSettings:
    criterion: str = _f("l2", "Channel importance: " + ", ".join(CRITERIA) + ".")
    ratio: float | None = _f(None, "Fraction of channels to remove, in (0, 1).")
    target_macs: float | None = _f(None, "Fraction of the full multi-exit MACs to keep, in (0, 1); reached within 2%.")
    global_pruning: bool = _f(False, "Rank channels across all layers instead of pruning each layer by the same ratio.")
    iterative_steps: int = _f(1, "Reach the ratio in this many pruning steps.")
    round_to: int | None = _f(None, "Keep channel counts multiples of this.")
    protect_exits: bool = _f(
        True,
        "Keep the shallow exits' own widths (head blocks, attention inner width); classifiers always keep "
        "their classes.",
    )

    def _name(self, key: str, style: Literal["cli", "recipe"]) -> str:
        if style == "recipe":
            return f"prune.{key}"
        return _CLI_NAMES.get(key, "--" + key.replace("_", "-"))

    def check(self, style: Literal["cli", "recipe"] = "cli") -> None:
        """Raise SdtoolError for the first setting out of range, named as the user wrote it."""
        n = lambda key: self._name(key, style)  # noqa: E731 - a one-line naming helper
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise SdtoolError(f"{n('ratio')} must be in (0, 1) (the fraction of channels to remove), got {self.ratio}")
        if self.target_macs is not None and not 0 < self.target_macs < 1:
            raise SdtoolError(
                f"{n('target_macs')} must be in (0, 1) (the fraction of MACs to keep), got {self.target_macs}"
            )
        if self.iterative_steps < 1:
            raise SdtoolError(f"{n('iterative_steps')} must be at least 1, got {self.iterative_steps}")
        if self.round_to is not None and self.round_to < 1:
            raise SdtoolError(f"{n('round_to')} must be at least 1, got {self.round_to}")


@dataclass
class PruneOptions(PruneSettings):
    """What to prune and how: the settings plus `sdtool prune`'s own knobs."""

    taylor_batches: int = _f(4, "taylor: training batches whose gradients rank the channels.")
    seed: int = _f(0, "Seed of the batches taylor draws.")

    def check(self, style: Literal["cli", "recipe"] = "cli") -> None:
        """Also: a known criterion, exactly one target, and at least one taylor batch."""
        if self.criterion not in CRITERIA:
            raise SdtoolError(f"unknown criterion {self.criterion!r}; valid criteria: {', '.join(CRITERIA)}")
        super().check(style)
        if (self.ratio is None) == (self.target_macs is None):
            raise SdtoolError(
                "give exactly one of --ratio R (fraction of channels to remove) or "
                "--target-macs F (fraction of MACs to keep)"
            )
        if self.taylor_batches < 1:
            raise SdtoolError(f"--taylor-batches must be at least 1, got {self.taylor_batches}")

    @classmethod
    def from_settings(cls, p: PruneSettings) -> PruneOptions:
        """From a recipe's `prune` section: `ratio` when set, otherwise `target_macs`."""
        shared = {f.name: getattr(p, f.name) for f in dataclasses.fields(PruneSettings)}
        if p.ratio is not None:
            shared["target_macs"] = None
        return cls(**shared)

    from_recipe = from_settings  # the name callers used before the settings were shared
