"""The CLI's choice options: str Enums built from the library's own constants, checked by Typer.

The library keeps its own checks for Python callers; the CLI refuses a bad choice with a usage error
(exit status 2) before any command code runs, so these tests need no checkpoint.
"""

import importlib

import pytest
from typer.testing import CliRunner

from sdtool import SdtoolError
from sdtool.cli import app
from sdtool.cli_options import Cost, Engine, Fallback, Format, Policy, Split
from sdtool.cli_prune import Criterion
from sdtool.prune_options import CRITERIA

runner = CliRunner()
# Modules, imported by name: `sdtool.early_exit` and `sdtool.export` are the Python API's functions.
early_exit, engines, exit_eval, export, thresholds = (
    importlib.import_module(f"sdtool.{m}") for m in ("early_exit", "engines", "exit_eval", "export", "thresholds")
)


@pytest.mark.parametrize(
    "enum,constant",
    [
        (Policy, early_exit.POLICIES),
        (Fallback, early_exit.FALLBACKS),
        (Cost, thresholds.COSTS),
        (Engine, engines.ENGINES),
        (Format, export.FORMATS),
        (Split, exit_eval.SPLITS),
        (Criterion, CRITERIA),
    ],
)
def test_enum_values_are_the_library_constant(enum, constant):
    assert [m.value for m in enum] == list(constant)
    assert all(m.name == m.value and isinstance(m, str) for m in enum)  # Typer shows and parses the values


@pytest.mark.parametrize(
    "args,option",
    [
        (["eval", "m.safetensors", "--split", "train"], "--split"),
        (["eval", "m.safetensors", "--early-exit", "--policy", "margin"], "--policy"),
        (["eval", "m.safetensors", "--early-exit", "--fallback", "shallowest"], "--fallback"),
        (["eval", "m.safetensors", "--early-exit", "--cost", "flops"], "--cost"),
        (["eval", "m.safetensors", "--early-exit", "--engine", "tvm"], "--engine"),
        (["profile", "m.safetensors", "--engine", "tvm"], "--engine"),
        (["export", "m.safetensors", "--out", "x", "--format", "tflite"], "--format"),
        (["prune", "m.safetensors", "--out", "x", "--ratio", "0.5", "--criterion", "magic"], "--criterion"),
        (["export", "m.safetensors", "--out", "x", "--early-exit", "--policy", "margin"], "--policy"),
    ],
)
def test_bad_choice_is_a_usage_error(args, option):
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.output, r.output


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "missing.safetensors", "--split", "val", "--device", "cpu"],
        ["eval", "missing.safetensors", "--early-exit", "--policy", "entropy", "--fallback", "ensemble"],
        ["profile", "missing.safetensors", "--device", "cpu", "--no-latency"],
        ["export", "missing.safetensors", "--out", "x.onnx", "--format", "onnx", "--no-check"],
    ],
)
def test_good_choices_reach_the_library(args):
    """A valid choice gets through to the library call, which then fails on the missing file (exit 1)."""
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "missing.safetensors" in r.output and r.output.startswith("error:"), r.output


def test_the_library_still_checks_its_choices():
    with pytest.raises(SdtoolError, match="--split 'train' is not allowed; use test or val"):
        exit_eval.eval_early_exit("missing.safetensors", exit_eval.RunOptions(split="train"))
    with pytest.raises(SdtoolError, match="unknown early-exit policy 'margin'; use one of max_softmax, entropy"):
        early_exit.ExitPolicy("margin", [])
    with pytest.raises(SdtoolError, match="unknown fallback 'shallowest'; use one of deepest, ensemble"):
        exit_eval.FitOptions(fallback="shallowest").check()
    with pytest.raises(SdtoolError, match="unknown --cost 'flops'; use one of macs, latency"):
        exit_eval.FitOptions(fit=True, cost="flops").check()
    with pytest.raises(SdtoolError, match="unknown engine 'tvm'; use one of torch, onnxruntime"):
        exit_eval.eval_early_exit("missing.safetensors", exit_eval.RunOptions(engine="tvm"))
    with pytest.raises(SdtoolError, match="unknown export format 'tflite'; use one of safetensors, pt2, onnx"):
        export.export("missing.safetensors", "x", "tflite")


@pytest.mark.parametrize("cmd", [["eval"], ["profile"]])
def test_a_device_is_a_string_checked_by_the_library(cmd, tmp_path):
    """--device takes cuda:N too, so it is not an Enum: a bad one is refused in one line by resolve_device."""
    from tests.ckpt_factory import make_ckpt

    ckpt = make_ckpt(tmp_path / "m.safetensors")
    r = runner.invoke(app, [*cmd, str(ckpt), "--device", "tpu"])
    assert r.exit_code == 1 and r.output.startswith("error: unknown device 'tpu'"), r.output
