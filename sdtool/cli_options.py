"""The CLI's shared option types: choice Enums and the options several commands take.

Each choice is a `str` Enum, so Typer lists its values in `--help` and refuses others with a usage
error (exit status 2) before a command runs. Where the library has a constant for the names, the Enum
takes its values from it (sdtool.choices), so the two cannot drift apart; the library still checks
them for Python callers.

No torch here (nor anything that imports it): `sdtool.cli.main` must call `cpu.configure()` before
torch is loaded.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sdtool.choices import COSTS, ENGINES, FALLBACKS, FORMATS, POLICIES, SPLITS

if TYPE_CHECKING:
    from sdtool.exit_fit import FitOptions

# Each Enum below unpacks the library's tuple into its members (name = value): a name added to the
# tuple without one here fails at import, and tests/test_cli_choices.py checks the values match.


class Engine(str, Enum):
    """--engine: sdtool.choices.ENGINES."""

    torch, onnxruntime = ENGINES


class Cost(str, Enum):
    """--cost: sdtool.choices.COSTS."""

    macs, latency = COSTS


class Policy(str, Enum):
    """--policy: sdtool.choices.POLICIES."""

    max_softmax, entropy = POLICIES


class Fallback(str, Enum):
    """--fallback: sdtool.choices.FALLBACKS."""

    deepest, ensemble = FALLBACKS


class Format(str, Enum):
    """export --format: sdtool.choices.FORMATS."""

    safetensors, pt2, onnx = FORMATS


class Split(str, Enum):
    """eval --split: sdtool.choices.SPLITS."""

    test, val = SPLITS


# Devices stay a string: besides the kinds (auto, cpu, cuda, mps) a GPU is chosen by index (cuda:1), and
# sdtool.device.resolve_device refuses anything else in one line.
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps (auto: cuda, then mps, then cpu)"

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (progress goes to stderr).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a recipe key, e.g. --set train.epochs=3 (repeatable).")
]

# Threshold fitting: one option set, shared by `eval --early-exit` and `export --early-exit`.
FitOpt = Annotated[
    bool, typer.Option("--fit-thresholds", help="Early exit: fit thresholds on the validation split first.")
]
MaxDropOpt = Annotated[
    float | None,
    typer.Option(
        "--max-drop", help="Fit: least cost with top-1 at most D points below the deepest exit (default 0.5)."
    ),
]
BudgetOpt = Annotated[
    float | None,
    typer.Option(
        "--budget", help="Fit: best top-1 within F x the reference cost (the deepest exit alone, in --cost units)."
    ),
]
PolicyOpt = Annotated[Policy | None, typer.Option("--policy", help="Early exit: max_softmax (default) or entropy.")]
FallbackOpt = Annotated[
    Fallback | None,
    typer.Option("--fallback", help="Early exit: who answers the rest: deepest (default) or ensemble."),
]
CostOpt = Annotated[
    Cost,
    typer.Option(
        "--cost",
        help=(
            "Fit: what a sample costs: macs, or latency measured per exit step on this "
            "machine (in --engine; export: onnxruntime)."
        ),
    ),
]
SweepOpt = Annotated[
    Path | None,
    typer.Option("--sweep-out", help="Fit: write the accuracy-vs-MACs sweep (JSON, CSV, PNG) to this folder."),
]
EngineOpt = Annotated[
    Engine,
    typer.Option("--engine", help="Inference engine for timings: torch (eager, batch norm folded) or onnxruntime."),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help=(
            "CPU threads of the engine (default: torch's setting, or the cores this process may use for onnxruntime)."
        ),
    ),
]


def fit_options(
    fit: bool,
    max_drop: float | None,
    budget: float | None,
    policy: Policy | None,
    fallback: Fallback | None,
    cost: Cost,
    sweep_out: Path | None,
) -> FitOptions:
    """The library's FitOptions from the fitting options of `eval` or `export`."""
    from sdtool.exit_fit import FitOptions

    return FitOptions(
        fit,
        max_drop,
        budget,
        policy.value if policy is not None else None,
        fallback.value if fallback is not None else None,
        cost.value,
        str(sweep_out) if sweep_out else None,
    )
