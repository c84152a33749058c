"""The Python API (sdtool.api, docs/python.md): typed results, argument errors, a light `import sdtool`,
and the complete script of docs/python.md run as written."""

import dataclasses
import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ckpt_factory import make_ckpt

import sdtool
from sdtool import api
from sdtool.errors import SdtoolError

ROOT = Path(__file__).resolve().parents[1]


def test_import_sdtool_and_runtime_never_import_torch():
    code = (
        "import sys, sdtool, sdtool.runtime\n"
        "from sdtool import train, prune, TrainResult, EarlyExitResult\n"  # names resolve without torch too
        "dir(sdtool)\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_names_all_and_dir():
    assert set(dir(sdtool)) == set(sdtool.__all__)
    for name in sdtool.__all__:
        assert getattr(sdtool, name) is not None
    assert sdtool.train is api.train and sdtool.TrainResult.__module__ == "sdtool.api_results"
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        sdtool.trian  # noqa: B018


def test_api_functions_survive_their_submodules_imports():
    """sdtool/prune.py & co. share the functions' names: importing them must not replace the functions."""
    for name in ("distill", "early_exit", "evaluate", "export", "profile", "prune"):
        module = importlib.import_module(f"sdtool.{name}")
        assert getattr(sdtool, name) is getattr(api, name)
        assert module is sys.modules[f"sdtool.{name}"]
    from sdtool import evaluate

    assert evaluate is api.evaluate


def _fields(*classes) -> set[str]:
    return {f.name for c in classes for f in dataclasses.fields(c)}


def test_keyword_types_match_the_options_they_fill():
    """Every options-dataclass field is a keyword (explicit or in the TypedDict), and nothing else is."""
    from sdtool.exit_eval import FitOptions, RunOptions
    from sdtool.profile import ProfileOptions
    from sdtool.prune_options import PruneOptions

    explicit = {"ratio", "target_macs", "criterion"}
    assert set(api.PruneKeywords.__annotations__) == _fields(PruneOptions) - explicit | {
        "overrides",
        "allow_other_data",
        "quiet",
    }
    explicit = {"fit", "max_drop", "budget", "data", "split", "device"}
    assert set(api.EarlyExitKeywords.__annotations__) == _fields(FitOptions, RunOptions) - explicit | {"quiet"}
    explicit = {"input_size", "batch", "device", "latency", "engine", "threads", "overrides", "progress"}
    assert set(api.ProfileKeywords.__annotations__) == _fields(ProfileOptions) - explicit | {"quiet"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_ckpt(tmp_path_factory.mktemp("api") / "m.safetensors", sharpen=20.0)


def test_load_returns_the_checkpoint_in_eval_mode(ckpt):
    c = sdtool.load(ckpt)
    assert isinstance(c, sdtool.Checkpoint) and c.path == ckpt
    assert not c.model.training and c.meta.num_classes == 10 and c.model.num_exits == 4
    assert next(c.model.parameters()).device.type == "cpu"


def test_evaluate_result(ckpt, capsys):
    r = sdtool.evaluate(str(ckpt), device="cpu", batch_size=50)
    assert isinstance(r, sdtool.EvalResult)
    assert (r.checkpoint, r.split, r.data, r.n) == (ckpt, "test", "fake", 100)
    assert [a.exit for a in r.exits] == [1, 2, 3, 4] and r.ensemble is not None and r.ensemble.exit is None
    assert r.top1 == r.raw["exits"][-1]["top1"] and r.exit_top1 == tuple(e["top1"] for e in r.raw["exits"])
    assert json.loads(json.dumps(r.to_json())) == r.to_json()
    assert capsys.readouterr() == ("", "")  # quiet by default


def test_prune_result(ckpt, tmp_path):
    out = tmp_path / "p.safetensors"
    r = sdtool.prune(ckpt, out, ratio=0.3, evaluate=True, device="cpu", round_to=2)
    assert isinstance(r, sdtool.PruneResult) and r.out == out and out.is_file()
    assert r.ratio == 0.3 and 0 < r.macs_fraction < 1 and r.after.macs < r.before.macs
    assert r.macs_fraction == pytest.approx(r.after.macs / r.before.macs, rel=1e-3)
    assert r.params_fraction == pytest.approx(r.after.params / r.before.params)
    assert r.after.exits[-1].macs == r.after.reference_macs and len(r.before.exits) == 4
    assert r.accuracy_before is not None and r.accuracy_after is not None
    assert r.accuracy_after.checkpoint == out and r.accuracy_after.n == 100
    assert r.sha256 == sdtool.load(out).sha256
    assert r.raw["options"]["round_to"] == 2


def test_early_exit_result_and_written_thresholds(ckpt, tmp_path):
    out = tmp_path / "ee.safetensors"
    r = sdtool.early_exit(ckpt, max_drop=2.0, out=out, device="cpu", latency_images=0, batch_size=50)
    assert isinstance(r, sdtool.EarlyExitResult) and r.fitted and r.out == out
    assert len(r.thresholds) == 3 and len(r.exits) == 4 and sum(e.count for e in r.exits) == r.n == 100
    assert r.accuracy_drop == pytest.approx(r.deepest_top1 - r.top1)
    assert r.macs_speedup == pytest.approx(r.reference_macs / r.expected_macs)
    assert r.speedup_batch_1 is None and r.speedup_batch_n > 0
    assert sdtool.load(out).meta.thresholds.values == list(r.thresholds)
    # The stored thresholds run as they are: the same exits answer.
    again = sdtool.early_exit(out, fit=False, device="cpu", latency_images=0, batch_size=50)
    assert not again.fitted and again.out is None and again.thresholds == r.thresholds
    assert [e.count for e in again.exits] == [e.count for e in r.exits]


def test_profile_and_export_results(ckpt, tmp_path):
    p = sdtool.profile(ckpt, latency=False)
    assert isinstance(p, sdtool.ProfileResult) and p.kind == "checkpoint" and p.latency_ms is None
    assert p.params == p.raw["full"]["params"] and p.exits[-1].macs == p.costs.reference_macs
    assert p.exits[0].macs < p.exits[-1].macs <= p.macs
    timed = sdtool.profile(ckpt, batch_size=2, device="cpu", warmup=0, repeats=1)
    assert set(timed.latency_ms) == {1, 2} and set(timed.exits[0].latency_ms) == {1, 2}

    e = sdtool.export(ckpt, tmp_path / "exit2.safetensors", exit=2)
    assert isinstance(e, sdtool.ExportResult) and (e.format, e.exit, e.exits) == ("safetensors", 2, 1)
    assert e.out.is_file() and e.file_size == e.out.stat().st_size
    assert sdtool.load(e.out).model.num_exits == 1


def _tiny_recipe() -> dict:
    return {
        "model": {"name": "resnet18", "width": 4},
        "data": {"name": "fake", "fake_size": 64, "input_size": 16, "val_size": 16, "batch_size": 32},
        "train": {"epochs": 1, "device": "cpu"},
    }


def test_train_from_a_dict_and_a_recipe(tmp_path, capsys):
    recipe = _tiny_recipe()
    r = sdtool.train(recipe, tmp_path / "run", overrides={"train.epochs": 2})
    assert isinstance(r, sdtool.TrainResult) and r.epochs == 2 and len(r.history) == 2
    assert r.best is not None and r.checkpoint == r.best and r.last.is_file()
    assert r.test is not None and r.test.checkpoint == r.best and r.test.data == "fake" and len(r.test.exits) == 4
    assert recipe == _tiny_recipe()  # the caller's dict is not changed
    assert capsys.readouterr() == ("", "")

    from sdtool.recipe import from_dict

    rec = from_dict(_tiny_recipe())
    r2 = sdtool.train(rec, tmp_path / "run2", overrides=["train.lr=0.01"], init=r.checkpoint)
    assert rec.train.lr != 0.01 and r2.epochs == 1
    assert sdtool.load(r2.checkpoint).meta.lineage[-1].recipe["train"]["lr"] == 0.01


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sdtool.train(), "needs a recipe"),
        (lambda: sdtool.train(_tiny_recipe()), "needs out="),
        (lambda: sdtool.train(_tiny_recipe(), resume="runs/x"), "drop recipe, overrides and init"),
        (lambda: sdtool.train(42, "runs/x"), "recipe must be a YAML path, a dict or a sdtool Recipe"),
        (lambda: sdtool.train(_tiny_recipe(), "runs/x", overrides=7), "overrides must be a mapping"),
        (lambda: sdtool.distill(resume="runs/x", teacher="t.safetensors"), "drop teacher"),
        (lambda: sdtool.evaluate(3), "ckpt must be a path"),
        (lambda: sdtool.evaluate("m.safetensors", split="train"), "split must be one of test, val"),
        (lambda: sdtool.prune("m.safetensors", "p.safetensors"), "exactly one of --ratio"),
        (lambda: sdtool.prune("m.safetensors", "p.safetensors", ratio=0.3, criterion="l3"), "unknown criterion"),
        (lambda: sdtool.early_exit("m.safetensors", fit=False, max_drop=1.0), "belong to threshold fitting"),
        (lambda: sdtool.load("missing.safetensors"), "not found"),
    ],
)
def test_argument_errors_are_sdtool_errors(call, message):
    with pytest.raises(SdtoolError, match=re.escape(message)):
        call()


def test_unknown_keywords_are_type_errors():
    for call in (
        lambda: sdtool.prune("m.safetensors", "p.safetensors", ratio=0.3, bogus=1),
        lambda: sdtool.early_exit("m.safetensors", max_dorp=1.0),
        lambda: sdtool.profile("m.safetensors", batch=4),
    ):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            call()


def _docs_script() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "python.md").read_text(), re.S)
    assert len(blocks) == 1, "docs/python.md holds one complete script"
    return blocks[0]


@pytest.mark.slow
def test_docs_script_runs(tmp_path, monkeypatch, capsys):
    (tmp_path / "recipes").mkdir()
    shutil.copy(ROOT / "recipes" / "quickstart.yaml", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    exec(compile(_docs_script(), "docs/python.md", "exec"), {})  # noqa: S102 - the documented script, as written
    printed = capsys.readouterr().out
    assert "pruned + fine-tuned" in printed and "+ early exit" in printed
    assert (tmp_path / "runs/api/ee.safetensors").is_file()
    assert sdtool.load(tmp_path / "runs/api/ee.safetensors").meta.thresholds is not None
