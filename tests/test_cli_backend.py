"""What each command hands its library function, option by option (the backend is patched out).

Every option `sdtool prune` declares, and eval's and export's early-exit options, are set to a value
other than their default; the test asserts the exact call. A new option that is parsed but never
passed on, or passed to the wrong field, fails here without running any model.
"""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdtool.cli import app
from sdtool.deploy import BundleOptions
from sdtool.exit_eval import RunOptions
from sdtool.exit_fit import FitOptions
from sdtool.prune_options import PruneOptions

runner = CliRunner()


class Recorder:
    """Stands in for a library function: records its arguments, returns a JSON-able report."""

    def __init__(self, result=None):
        self.calls: list[tuple[tuple, dict]] = []
        self.result = result if result is not None else {"ok": True}

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


def _invoke(args: list[str]) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output


def test_prune_hands_every_option_to_prune_checkpoint(monkeypatch, tmp_path):
    rec = Recorder()
    monkeypatch.setattr("sdtool.prune.prune_checkpoint", rec)
    # fmt: off
    _invoke([
        "prune", "in.safetensors", "--out", "out.safetensors", "--ratio", "0.3", "--criterion", "taylor",
        "--global", "--iterative-steps", "3", "--round-to", "8", "--no-protect-exits", "--taylor-batches", "7",
        "--eval", "--data", "cifar10", "--set", "data.val_size=0.2", "--set", "data.workers=0",
        "--device", "cuda:1", "--json",
    ])
    # fmt: on
    assert rec.calls == [
        (
            (
                "in.safetensors",
                "out.safetensors",
                PruneOptions(
                    criterion="taylor",
                    ratio=0.3,
                    target_macs=None,
                    global_pruning=True,
                    iterative_steps=3,
                    round_to=8,
                    protect_exits=False,
                    taylor_batches=7,
                ),
                True,
                "cifar10",
                ["data.val_size=0.2", "data.workers=0"],
                "cuda:1",
            ),
            {},
        )
    ]


def test_prune_defaults_are_the_options_defaults(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr("sdtool.prune.prune_checkpoint", rec)
    _invoke(["prune", "in.safetensors", "--out", "o.safetensors", "--target-macs", "0.5", "--json"])
    ((args, _),) = rec.calls
    assert args[2] == PruneOptions(target_macs=0.5) and args[3:] == (False, None, None, "auto")


def test_eval_early_exit_hands_its_options_on(monkeypatch, tmp_path):
    rec = Recorder()
    monkeypatch.setattr("sdtool.exit_eval.eval_early_exit", rec)
    sweep = tmp_path / "sweep"
    # fmt: off
    _invoke([
        "eval", "m.safetensors", "--early-exit", "--data", "digits", "--set", "data.val_size=0.1",
        "--split", "val", "--device", "cpu", "--fit-thresholds", "--max-drop", "1.5", "--policy", "entropy",
        "--fallback", "ensemble", "--cost", "latency", "--sweep-out", str(sweep), "--out", "fit.safetensors",
        "--batch-size", "32", "--latency-images", "9", "--engine", "onnxruntime", "--threads", "2", "--json",
    ])
    # fmt: on
    ((args, kwargs),) = rec.calls
    assert args == (
        "m.safetensors",
        RunOptions(
            data="digits",
            overrides=["data.val_size=0.1"],
            split="val",
            device="cpu",
            batch_size=32,
            latency_images=9,
            engine="onnxruntime",
            threads=2,
        ),
        FitOptions(
            fit=True,
            max_drop=1.5,
            budget=None,
            policy="entropy",
            fallback="ensemble",
            cost="latency",
            sweep_out=str(sweep),
        ),
    )
    assert kwargs == {"out": "fit.safetensors", "quiet": True}


def test_eval_early_exit_budget_and_defaults(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr("sdtool.exit_eval.eval_early_exit", rec)
    _invoke(["eval", "m.safetensors", "--early-exit", "--fit-thresholds", "--budget", "0.6", "--json"])
    ((args, kwargs),) = rec.calls
    assert args == ("m.safetensors", RunOptions(), FitOptions(fit=True, budget=0.6))
    assert kwargs == {"out": None, "quiet": True}


def test_plain_eval_hands_its_options_on(monkeypatch):
    rec = Recorder({"data": "digits", "n": 1, "exits": []})
    monkeypatch.setattr("sdtool.evaluate.eval_checkpoint", rec)
    _invoke(
        [
            "eval",
            "m.safetensors",
            "--data",
            "digits",
            "--set",
            "data.val_size=0.1",
            "--split",
            "val",
            "--device",
            "cpu",
            "--batch-size",
            "16",
            "--json",
        ]
    )
    assert rec.calls == [(("m.safetensors", "digits", ["data.val_size=0.1"], "val", "cpu"), {"batch_size": 16})]


def test_export_bundle_hands_its_options_on(monkeypatch, tmp_path):
    rec = Recorder()
    monkeypatch.setattr("sdtool.deploy.export_bundle", rec)
    # fmt: off
    _invoke([
        "export", "m.safetensors", "--out", "bundle", "--early-exit", "--fit-thresholds", "--max-drop", "0.8",
        "--policy", "entropy", "--fallback", "ensemble", "--data", "digits", "--set", "data.val_size=0.1",
        "--batch-size", "16", "--latency-batch", "8", "--threads", "1", "--json",
    ])
    # fmt: on
    ((args, kwargs),) = rec.calls
    assert args[:2] == ("m.safetensors", "bundle")
    flat = dict(zip(("opts", "run", "quiet"), args[2:], strict=False)) | kwargs
    assert flat["opts"] == FitOptions(fit=True, max_drop=0.8, policy="entropy", fallback="ensemble")
    assert flat["run"] == BundleOptions(
        data="digits", overrides=["data.val_size=0.1"], batch_size=16, threads=1, latency_batch=8
    )
    assert flat["quiet"] is True


@pytest.mark.parametrize("fmt", ["safetensors", "pt2", "onnx"])
def test_export_one_exit_hands_its_options_on(monkeypatch, fmt):
    rec = Recorder()
    monkeypatch.setattr("sdtool.export.export", rec)
    _invoke(["export", "m.safetensors", "--out", "x", "--format", fmt, "--exit", "2", "--no-check", "--json"])
    assert rec.calls == [(("m.safetensors", "x", fmt, 2, False), {})]


def test_train_hands_recipe_and_paths_on(monkeypatch, tmp_path):
    class Result:
        is_main = True

        def to_json(self):
            return {"ok": True}

    rec = Recorder(Result())
    monkeypatch.setattr("sdtool.engine.fit", rec)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    _invoke(
        [
            "train",
            str(recipe),
            "--out",
            str(tmp_path / "run"),
            "--set",
            "train.epochs=3",
            "--init",
            "p.safetensors",
            "--json",
        ]
    )
    ((args, kwargs),) = rec.calls
    assert args[0].train.epochs == 3 and args[1] == tmp_path / "run"
    assert kwargs == {"init": "p.safetensors", "resume": None, "quiet": True}
