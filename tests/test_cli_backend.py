"""What each command hands its library function, option by option (the backend is patched out).

Every option `sdtool prune` declares, and eval's and export's early-exit options, are set to a value
other than their default; the test asserts the exact call. A new option that is parsed but never
passed on, or passed to the wrong field, fails here without running any model.
"""

import importlib
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


def patch(monkeypatch, target: str, value) -> None:
    """monkeypatch.setattr("sdtool.module.name", value) on the module itself: `sdtool.prune` and a few
    other package attributes are the Python API's functions, not the submodules of the same name."""
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, value)


def _invoke(args: list[str]) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output


def test_prune_hands_every_option_to_prune_checkpoint(monkeypatch, tmp_path):
    rec, threads = Recorder(), Recorder()
    patch(monkeypatch, "sdtool.prune.prune_checkpoint", rec)
    monkeypatch.setattr("torch.set_num_threads", threads)
    # fmt: off
    _invoke([
        "prune", "in.safetensors", "--out", "out.safetensors", "--ratio", "0.3", "--criterion", "taylor",
        "--global-pruning", "--iterative-steps", "3", "--round-to", "8", "--no-protect-exits",
        "--taylor-batches", "7", "--eval", "--data", "cifar10", "--set", "data.val_size=0.2", "--set",
        "data.workers=0", "--device", "cuda:1", "--allow-other-data", "--threads", "3", "--json",
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
            {"allow_other_data": True},
        )
    ]
    assert threads.calls == [((3,), {})]


def test_prune_defaults_are_the_options_defaults(monkeypatch):
    rec = Recorder()
    patch(monkeypatch, "sdtool.prune.prune_checkpoint", rec)
    _invoke(["prune", "in.safetensors", "--out", "o.safetensors", "--target-macs", "0.5", "--json"])
    ((args, kwargs),) = rec.calls
    assert args[2] == PruneOptions(target_macs=0.5) and args[3:] == (False, None, None, "auto")
    assert kwargs == {"allow_other_data": False}


def test_eval_early_exit_hands_its_options_on(monkeypatch, tmp_path):
    rec = Recorder()
    patch(monkeypatch, "sdtool.exit_eval.eval_early_exit", rec)
    sweep = tmp_path / "sweep"
    # fmt: off
    _invoke([
        "eval", "m.safetensors", "--early-exit", "--data", "digits", "--set", "data.val_size=0.1",
        "--split", "val", "--device", "cpu", "--fit-thresholds", "--max-drop", "1.5", "--policy", "entropy",
        "--fallback", "ensemble", "--cost", "latency", "--sweep-out", str(sweep), "--out", "fit.safetensors",
        "--batch-size", "32", "--latency-images", "9", "--engine", "onnxruntime", "--threads", "2",
        "--allow-other-data", "--json",
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
            allow_other_data=True,
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
    patch(monkeypatch, "sdtool.exit_eval.eval_early_exit", rec)
    _invoke(["eval", "m.safetensors", "--early-exit", "--fit-thresholds", "--budget", "0.6", "--json"])
    ((args, kwargs),) = rec.calls
    assert args == ("m.safetensors", RunOptions(), FitOptions(fit=True, budget=0.6))
    assert kwargs == {"out": None, "quiet": True}


def test_plain_eval_hands_its_options_on(monkeypatch):
    rec, threads = Recorder({"data": "digits", "n": 1, "exits": []}), Recorder()
    patch(monkeypatch, "sdtool.evaluate.eval_checkpoint", rec)
    monkeypatch.setattr("torch.set_num_threads", threads)
    # fmt: off
    _invoke([
        "eval", "m.safetensors", "--data", "digits", "--set", "data.val_size=0.1", "--split", "val",
        "--device", "cpu", "--batch-size", "16", "--threads", "2", "--allow-other-data", "--json",
    ])
    # fmt: on
    assert rec.calls == [
        (("m.safetensors", "digits", ["data.val_size=0.1"], "val", "cpu"), {"batch_size": 16, "allow_other_data": True})
    ]
    assert threads.calls == [((2,), {})]


def test_plain_eval_defaults(monkeypatch):
    rec = Recorder({"data": "digits", "n": 1, "exits": []})
    patch(monkeypatch, "sdtool.evaluate.eval_checkpoint", rec)
    _invoke(["eval", "m.safetensors", "--json"])
    assert rec.calls == [
        (("m.safetensors", None, None, "test", "auto"), {"batch_size": None, "allow_other_data": False})
    ]


def test_export_bundle_hands_its_options_on(monkeypatch, tmp_path):
    rec = Recorder()
    patch(monkeypatch, "sdtool.deploy.export_bundle", rec)
    # fmt: off
    _invoke([
        "export", "m.safetensors", "--out", "bundle", "--early-exit", "--fit-thresholds", "--max-drop", "0.8",
        "--policy", "entropy", "--fallback", "ensemble", "--data", "digits", "--set", "data.val_size=0.1",
        "--batch-size", "16", "--latency-batch", "8", "--threads", "1", "--allow-other-data", "--json",
    ])
    # fmt: on
    ((args, kwargs),) = rec.calls
    assert args[:2] == ("m.safetensors", "bundle")
    flat = dict(zip(("opts", "run", "quiet"), args[2:], strict=False)) | kwargs
    assert flat["opts"] == FitOptions(fit=True, max_drop=0.8, policy="entropy", fallback="ensemble")
    assert flat["run"] == BundleOptions(
        data="digits", overrides=["data.val_size=0.1"], batch_size=16, threads=1, latency_batch=8, allow_other_data=True
    )
    assert flat["quiet"] is True


@pytest.mark.parametrize("fmt", ["safetensors", "pt2", "onnx"])
def test_export_one_exit_hands_its_options_on(monkeypatch, fmt):
    rec = Recorder()
    patch(monkeypatch, "sdtool.export.export", rec)
    _invoke(["export", "m.safetensors", "--out", "x", "--format", fmt, "--exit", "2", "--no-check", "--json"])
    assert rec.calls == [(("m.safetensors", "x", fmt, 2, False), {})]


def test_train_hands_recipe_and_paths_on(monkeypatch, tmp_path):
    class Result:
        is_main = True

        def to_json(self):
            return {"ok": True}

    rec = Recorder(Result())
    patch(monkeypatch, "sdtool.engine.fit", rec)
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


class _FitResult:
    is_main = True

    def to_json(self):
        return {"ok": True}


RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")


@pytest.mark.parametrize("cmd,target", [("train", "sdtool.engine.fit"), ("distill", "sdtool.distill.distill")])
def test_device_and_threads_become_the_recipes_train_keys(monkeypatch, tmp_path, cmd, target):
    rec = Recorder(_FitResult())
    patch(monkeypatch, target, rec)
    # fmt: off
    _invoke([
        cmd, RECIPE, "--out", str(tmp_path / "run"), "--set", "train.epochs=2", "--device", "cuda:1",
        "--threads", "3", "--json",
    ])
    # fmt: on
    ((args, _),) = rec.calls
    assert (args[0].train.device, args[0].train.threads, args[0].train.epochs) == ("cuda:1", 3, 2)


def test_pipeline_hands_device_threads_and_out_on(monkeypatch, tmp_path):
    rec = Recorder({"steps": []})
    patch(monkeypatch, "sdtool.pipeline.run_pipeline", rec)
    patch(monkeypatch, "sdtool.report.pipeline_view", lambda rep: None)
    _invoke(["pipeline", RECIPE, "--out", str(tmp_path / "p"), "--device", "cpu", "--threads", "2", "--json"])
    ((args, kwargs),) = rec.calls
    assert (args[0].train.device, args[0].train.threads, args[1]) == ("cpu", 2, tmp_path / "p")
    assert kwargs == {"recipe_path": RECIPE, "quiet": True}


@pytest.mark.parametrize(
    "cmd,target,folder",
    [
        ("train", "sdtool.engine.fit", "runs/train"),
        ("distill", "sdtool.distill.distill", "runs/distill"),
        ("pipeline", "sdtool.pipeline.run_pipeline", "runs/pipeline"),
    ],
)
def test_without_out_the_old_default_folder_is_used_with_a_warning(monkeypatch, cmd, target, folder):
    rec = Recorder(_FitResult() if cmd != "pipeline" else {"steps": []})
    patch(monkeypatch, target, rec)
    r = runner.invoke(app, [cmd, RECIPE, "--json"])
    assert r.exit_code == 0, r.output
    assert r.stderr.strip() == f"warning: writing to {folder}; --out will be required in the next release"
    ((args, _),) = rec.calls
    assert args[1] == Path(folder)


@pytest.mark.parametrize("cmd,target", [("train", "sdtool.engine.fit"), ("distill", "sdtool.distill.distill")])
def test_resume_writes_into_its_folder(monkeypatch, tmp_path, cmd, target):
    rec = Recorder(_FitResult())
    patch(monkeypatch, target, rec)
    run = tmp_path / "run"
    r = runner.invoke(app, [cmd, "--resume", str(run), "--json"])
    assert r.exit_code == 0 and not r.stderr, r.output  # no --out warning: the run folder is the output
    ((args, kwargs),) = rec.calls
    assert args[0] is None and kwargs["resume"] == run
    _invoke([cmd, "--resume", str(run), "--out", str(run), "--json"])  # the same folder: accepted
    r = runner.invoke(app, [cmd, "--resume", str(run), "--out", str(tmp_path / "elsewhere")])
    assert r.exit_code == 1 and f"error: --resume writes into {run}; drop --out" in r.output
    for extra in (["--device", "cpu"], ["--threads", "2"]):
        r = runner.invoke(app, [cmd, "--resume", str(run), *extra])
        assert r.exit_code == 1 and "error: --resume continues a run exactly" in r.output


def test_profile_hands_its_options_on(monkeypatch):
    from sdtool.profile import ProfileOptions

    rec = Recorder()
    patch(monkeypatch, "sdtool.profile.profile", rec)
    _invoke(["profile", "m.safetensors", "--json"])
    _invoke(
        [
            "profile",
            "r.yaml",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--threads",
            "2",
            "--set",
            "model.width=8",
            "--json",
        ]
    )
    assert [c[0] for c in rec.calls] == [
        ("m.safetensors", ProfileOptions(batch=32, device="auto")),
        ("r.yaml", ProfileOptions(batch=8, device="cpu", threads=2, overrides=["model.width=8"])),
    ]
