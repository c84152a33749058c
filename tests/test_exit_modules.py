"""How the early-exit modules depend on each other: the policies are a leaf, the CLI loads no torch.

Each check runs in a fresh interpreter, since this process has imported everything already.
"""

import subprocess
import sys

import pytest


def _loaded_after(module: str, *names: str) -> list[str]:
    """Which of `names` are in sys.modules after importing `module` alone."""
    code = f"import sys, {module}\nprint(' '.join(n for n in {list(names)!r} if n in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return r.stdout.split()


@pytest.mark.parametrize(
    "module,not_loaded",
    [
        ("sdtool.exit_policy", ("sdtool.early_exit", "sdtool.thresholds", "sdtool.exit_eval")),
        ("sdtool.thresholds", ("sdtool.early_exit", "sdtool.exit_eval")),
        ("sdtool.early_exit", ("sdtool.thresholds", "sdtool.exit_eval")),
        ("sdtool.choices", ("torch", "numpy")),
        ("sdtool.cli", ("torch", "numpy")),  # cpu.configure() must run before torch loads
    ],
)
def test_imports_stay_one_way(module, not_loaded):
    assert _loaded_after(module, *not_loaded) == []


def test_old_import_locations_still_work():
    import importlib

    early_exit, exit_eval, exit_fit, exit_policy = (
        importlib.import_module(f"sdtool.{m}") for m in ("early_exit", "exit_eval", "exit_fit", "exit_policy")
    )

    assert early_exit.ExitPolicy is exit_policy.ExitPolicy
    assert early_exit.confidence is exit_policy.confidence
    assert early_exit.values_from_scores is exit_policy.values_from_scores
    assert early_exit.POLICIES is exit_policy.POLICIES and early_exit.FALLBACKS is exit_policy.FALLBACKS
    assert exit_eval.FitOptions is exit_fit.FitOptions and exit_eval.choose_policy is exit_fit.choose_policy
