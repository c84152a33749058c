"""sdtool: self-distillation, real early exit and structured pruning for CNNs.

The Python API (docs/python.md) runs what the CLI commands run and returns typed results:

    import sdtool
    run = sdtool.train("recipes/quickstart.yaml", out="runs/qs")
    print(run.test.top1, sdtool.evaluate(run.checkpoint).exit_top1)

`import sdtool` stays light: it does not import torch. The API (sdtool.api), its result types
(sdtool.api_results) and the checkpoint types load on first use of one of their names.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from sdtool.errors import SdtoolError  # noqa: E402  (re-exported for library users)

if TYPE_CHECKING:
    from sdtool.api import distill, early_exit, evaluate, export, load, profile, prune, train
    from sdtool.api_results import (
        Accuracy,
        Costs,
        EarlyExitResult,
        EvalResult,
        ExitCost,
        ExitUsage,
        ExportResult,
        ProfileResult,
        PruneResult,
        TrainResult,
    )
    from sdtool.checkpoint import Checkpoint
    from sdtool.meta import CheckpointMeta
    from sdtool.recipe import Recipe

__all__ = [
    "SdtoolError",
    "__version__",
    # sdtool.api
    "distill",
    "early_exit",
    "evaluate",
    "export",
    "load",
    "profile",
    "prune",
    "train",
    # sdtool.api_results
    "Accuracy",
    "Costs",
    "EarlyExitResult",
    "EvalResult",
    "ExitCost",
    "ExitUsage",
    "ExportResult",
    "ProfileResult",
    "PruneResult",
    "TrainResult",
    # the checkpoint and recipe types the API takes and returns
    "Checkpoint",
    "CheckpointMeta",
    "Recipe",
]
_FUNCTIONS = frozenset(__all__[2:10])
# Each lazily loaded name and the module that defines it.
_LAZY = {
    **dict.fromkeys(_FUNCTIONS, "sdtool.api"),
    **dict.fromkeys(__all__[10:20], "sdtool.api_results"),
    "Checkpoint": "sdtool.checkpoint",
    "CheckpointMeta": "sdtool.meta",
    "Recipe": "sdtool.recipe",
}


def __getattr__(name: str) -> Any:
    """Import the module defining `name` on first use (torch loads only when a function runs)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'sdtool' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """sdtool's module type: keeps `sdtool.prune` & co. the API functions.

    Five API functions share their name with the submodule that implements the step (sdtool/prune.py,
    evaluate.py, export.py, profile.py, distill.py; early_exit.py too). Importing a submodule makes
    Python set it as an attribute of its package, which would silently turn `sdtool.evaluate` from the
    function into a module as soon as any code imported `sdtool.evaluate` (training does). So the
    package ignores that assignment for the API's names: `sdtool.prune` is always the function, and the
    submodules are reached with `from sdtool.prune import prune_checkpoint` (or importlib)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTIONS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
