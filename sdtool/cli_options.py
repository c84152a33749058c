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
from typing import TYPE_CHECKING, Annotated, Any

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
# sdtool.device.resolve_device refuses anything else in one line. The shell completes the kinds.
DEVICES = ("auto", "cpu", "cuda", "mps")
# The data set names of sdtool.data.registry, which imports torch (too slow for a completion callback):
# tests/test_cli_consistency.py checks the two lists match.
DATA_SETS = ("digits", "npz", "fake", "cifar10", "cifar100", "imagefolder")


def complete_device(incomplete: str) -> list[str]:
    return [d for d in DEVICES if d.startswith(incomplete)]


def complete_data(incomplete: str) -> list[str]:
    """--data: the data set names, then recipe files (.yaml, .yml) and folders below the typed path."""
    names = [d for d in DATA_SETS if d.startswith(incomplete)]
    folder, _, stem = incomplete.rpartition("/")
    base = Path(folder or ".")
    try:
        found = sorted(
            (f"{folder}/" if folder else "") + p.name + ("/" if p.is_dir() else "")
            for p in base.iterdir()
            if p.name.startswith(stem) and (p.is_dir() or p.suffix in (".yaml", ".yml"))
        )
    except OSError:
        found = []
    return names + found


# Options several commands share: one name, one help text and one default everywhere
# (tests/test_cli_consistency.py compares every command's --help). Their defaults are given where each
# command declares the parameter; the show_default strings say what None means.
DEVICE_HELP = "Where to compute: auto, cpu, cuda, cuda:N or mps (auto: cuda, then mps, then cpu)."
THREADS_HELP = "CPU threads to compute with (torch's, or each ONNX Runtime session's)."
BATCH_SIZE_HELP = "Images per forward pass."
DATA_HELP = "Recipe file whose data section to use, or a data set name."
ALLOW_OTHER_DATA_HELP = "Score on a data set other than the one the checkpoint records (refused otherwise)."

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (progress goes to stderr).")]
DeviceOpt = Annotated[str, typer.Option("--device", help=DEVICE_HELP, autocompletion=complete_device)]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", help=THREADS_HELP, show_default="torch's; ONNX Runtime: the cores this process may use"),
]
# train, distill and pipeline: the two options set the recipe's own keys, so a run records them.
RecipeDeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device", help=DEVICE_HELP, autocompletion=complete_device, show_default="the recipe's train.device"
    ),
]
RecipeThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help=THREADS_HELP, show_default="the recipe's train.threads")
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option("--batch-size", help=BATCH_SIZE_HELP, show_default="the recipe's data.eval_batch_size"),
]
# profile measures latency at batch 1 and at this batch size; a checkpoint alone has no data section.
ProfileBatchSizeOpt = Annotated[int, typer.Option("--batch-size", help=BATCH_SIZE_HELP)]
DataOpt = Annotated[
    str | None,
    typer.Option("--data", help=DATA_HELP, autocompletion=complete_data, show_default="the checkpoint's"),
]
AllowOtherDataOpt = Annotated[bool, typer.Option("--allow-other-data", help=ALLOW_OTHER_DATA_HELP)]


def _set_opt(example: str, scope: str = "Override a recipe key") -> Any:
    return typer.Option("--set", help=f"{scope}, e.g. --set {example} (repeatable).")


# --set: each command's own help, with an example that command accepts (tests/test_cli_consistency.py
# applies each example).
SetOpt = Annotated[list[str] | None, _set_opt("train.epochs=3")]
DataSetOpt = Annotated[list[str] | None, _set_opt("data.root=/data", "Override a data.* key of the data")]
ProfileSetOpt = Annotated[list[str] | None, _set_opt("model.width=32", "Recipe targets: override a recipe key")]


def warn(message: str) -> None:
    """One `warning:` line on stderr."""
    typer.echo(f"warning: {message}", err=True)


def deprecated(old: str, new: str) -> None:
    """The one-line notice of an old option spelling, kept working for one release."""
    warn(f"{old} is deprecated and will be removed in the next release; use {new}")


def default_out(out: Path | None, folder: str) -> Path:
    """train, distill, pipeline without --out: the old default folder, with the notice that it goes."""
    if out is not None:
        return out
    warn(f"writing to {folder}; --out will be required in the next release")
    return Path(folder)


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
