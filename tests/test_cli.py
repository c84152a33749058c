"""The command line: exit codes, one-line errors, --json and the quickstart path."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sdtool import __version__
from sdtool.cli import app

runner = CliRunner()

TINY = [
    "--set",
    "model.width=4",
    "--set",
    "data.name=fake",
    "--set",
    "data.fake_size=64",
    "--set",
    "data.batch_size=16",
    "--set",
    "train.epochs=1",
    "--set",
    "data.val_size=16",
]


def sdtool(*args):
    return subprocess.run([sys.executable, "-m", "sdtool", *args], capture_output=True, text=True)


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"sdtool {__version__}"


@pytest.mark.parametrize(
    "cmd", ["train", "eval", "inspect", "models", "profile", "export", "predict", "prune", "pipeline", "distill"]
)
def test_help_has_an_example(cmd):
    r = runner.invoke(app, [cmd, "--help"])
    assert r.exit_code == 0 and "Example: sdtool" in r.output


def test_train_eval_inspect_json(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "recipes/quickstart.yaml", "--out", str(out), "--json", *TINY])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["best"].endswith("best.safetensors") and len(res["epochs"]) == 1
    r = runner.invoke(app, ["eval", res["best"], "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert [e["exit"] for e in rep["exits"]] == [1, 2, 3, 4] and rep["split"] == "test"
    assert {"top1", "top5", "loss"} <= set(rep["exits"][0]) and rep["ensemble"]["top1"] >= 0
    # The same numbers the engine recorded for the test split of the checkpoint it picked.
    assert rep["exits"][-1]["top1"] == pytest.approx(res["test"]["exits"][-1]["top1"])
    r = runner.invoke(app, ["eval", res["best"], "--split", "val", "--json"])
    assert json.loads(r.stdout)["n"] == 16
    r = runner.invoke(app, ["inspect", res["best"], "--json"])
    info = json.loads(r.stdout)
    assert info["exits"] == 4 and info["meta"]["lineage"][0]["command"] == "train"
    r = runner.invoke(app, ["inspect", res["best"]])
    assert r.exit_code == 0 and "lineage" in r.output


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["train", "recipes/quickstart.yaml", "--set", "train.epoch=3"],
            "error: unknown key train.epoch; did you mean train.epochs?",
        ),
        (["train", "missing.yaml"], "error: recipe missing.yaml not found"),
        (["train", "recipes/quickstart.yaml", "--set", "model.name=resnet81"], "error: unknown model 'resnet81'"),
        (["eval", "README.md"], "error: README.md is not a readable safetensors file"),
        (["eval", "nope.safetensors"], "error: checkpoint nope.safetensors not found"),
        (["train", "recipes/quickstart.yaml", "--resume", "runs/x"], "error: --resume continues a run exactly"),
    ],
)
def test_user_errors_are_one_line_exit_1(args, message, tmp_path):
    if args[0] == "train" and "--resume" not in args:  # without --out, a warning line comes first
        args = [*args, "--out", str(tmp_path / "run")]
    r = sdtool(*args)
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert "Traceback" not in r.stderr


def test_debug_shows_the_traceback():
    r = sdtool("--debug", "train", "missing.yaml")
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_wrong_class_count_on_eval(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, ["train", "recipes/quickstart.yaml", "--out", str(out), "--json", *TINY]).exit_code == 0
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "te.npz", x=rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), y=np.arange(8) % 4)
    r = sdtool(
        "eval",
        str(out / "last.safetensors"),
        "--data",
        "npz",
        "--set",
        f"data.root={tmp_path}",
        "--set",
        "data.test_file=te.npz",
        "--set",
        "data.train_file=te.npz",
    )
    assert r.returncode == 1 and "predicts 10 classes but data set npz has 4" in r.stderr
