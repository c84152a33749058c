"""The training engine: files of a run, modes, --init lineage, NaN handling and exact resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdtool import SdtoolError, checkpoint, engine
from sdtool.device import use_channels_last
from sdtool.engine import fit
from sdtool.recipe import from_dict

TINY = {
    "model": {"name": "resnet18", "width": 4},
    "data": {"name": "fake", "fake_size": 96, "batch_size": 16, "eval_batch_size": 64},
    "train": {"epochs": 2, "lr": 0.05, "seed": 0, "threads": 1},
}


def recipe(**sections):
    data = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return from_dict(data)


def weights(path):
    return checkpoint.load_tensors(path)


def test_run_folder_with_validation_split(tmp_path):
    r = recipe(data={"val_size": 0.25, "val_seed": 3})
    res = fit(r, tmp_path / "run", quiet=True)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"last.safetensors", "best.safetensors", "metrics.jsonl", "recipe.yaml", "train_state.safetensors"} <= files
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert all(row["eval_split"] == "val" and row["eval"]["n"] == 24 for row in rows)
    assert len(rows[0]["eval"]["exits"]) == 4 and rows[0]["eval"]["ensemble"] is not None
    meta = checkpoint.read_meta(res.last)
    assert {k: meta["val_split"][k] for k in ("size", "seed")} == {"size": 24, "seed": 3}
    assert len(meta["val_split"]["fingerprint"]) == 16
    assert meta["lineage"][-1]["command"] == "train"
    assert meta["lineage"][-1]["recipe"]["data"]["val_size"] == 0.25
    assert res.test["n"] == 24 and res.test["checkpoint"].endswith("best.safetensors")


def test_no_best_without_validation_split(tmp_path):
    res = fit(recipe(train={"epochs": 1}), tmp_path / "run", quiet=True)
    assert res.best is None and not (tmp_path / "run" / "best.safetensors").exists()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["eval_split"] == "test"  # reported, never used to select


@pytest.mark.parametrize("mode,exits", [("plain", 1), ("deep_supervision", 4), ("self_distill", 4)])
def test_modes(tmp_path, mode, exits):
    res = fit(recipe(sd={"mode": mode}, train={"epochs": 1}), tmp_path / mode, quiet=True)
    model, meta = checkpoint.load(res.last)
    assert model.num_exits == exits and meta["mode"] == mode
    state = weights(tmp_path / mode / "train_state.safetensors")
    assert any(k.startswith("loss.adapters.") for k in state) == (mode == "self_distill")


def test_init_keeps_structure_and_records_lineage(tmp_path):
    first = fit(recipe(train={"epochs": 1}), tmp_path / "a", quiet=True)
    second = fit(recipe(train={"epochs": 1}, model={"width": 8}), tmp_path / "b", init=str(first.last), quiet=True)
    meta = checkpoint.read_meta(second.last)
    assert meta["model"]["args"]["width"] == 4  # the checkpoint's model wins over the recipe's
    assert [e["command"] for e in meta["lineage"]] == ["train", "train"]
    assert meta["lineage"][-1]["parent_sha256"] == checkpoint.sha256(first.last)


def test_init_class_mismatch(tmp_path):
    import numpy as np

    first = fit(recipe(train={"epochs": 1}), tmp_path / "a", quiet=True)
    rng = np.random.default_rng(0)
    for name in ("tr.npz", "te.npz"):  # a 3-class data set
        np.savez(tmp_path / name, x=rng.integers(0, 255, (30, 32, 32, 3), dtype=np.uint8), y=np.arange(30) % 3)
    three = {"name": "npz", "root": str(tmp_path), "train_file": "tr.npz", "test_file": "te.npz"}
    with pytest.raises(SdtoolError, match="--init checkpoint has 10 classes but data set npz has 3"):
        fit(recipe(data=three), tmp_path / "b", init=str(first.last), quiet=True)
    with pytest.raises(SdtoolError, match="model.num_classes is 10 but data set npz has 3"):
        fit(recipe(data=three, model={"num_classes": 10}), tmp_path / "c", quiet=True)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from sdtool import losses

    real = losses.SelfDistillLoss.forward
    calls = {"n": 0}

    def poisoned(self, logits, feats, y):
        calls["n"] += 1
        loss, parts = real(self, logits, feats, y)
        return (loss * float("nan") if calls["n"] > 6 else loss), parts  # epoch 1 has 6 steps

    monkeypatch.setattr(losses.SelfDistillLoss, "forward", poisoned)
    with pytest.raises(SdtoolError, match="loss became nan at epoch 2"):
        fit(recipe(), tmp_path / "run", quiet=True)
    assert checkpoint.read_meta(tmp_path / "run" / "last.safetensors")["metrics"]["epoch"] == 1


def test_channels_last_rule():
    """auto: a fixed rule per device type (CPU and CUDA measured faster in channels_last, MPS not measured)."""
    cpu, cuda, mps = (torch.device(d) for d in ("cpu", "cuda", "mps"))
    assert [use_channels_last("auto", d) for d in (cpu, cuda, mps)] == [True, True, False]
    assert [use_channels_last(True, d) for d in (cpu, cuda, mps)] == [True, True, True]
    assert [use_channels_last(False, d) for d in (cpu, cuda, mps)] == [False, False, False]


def _spy_memory_format(monkeypatch) -> list[tuple[bool, bool]]:
    """Record, per training step, whether the batch and the conv weights are in channels_last layout."""
    seen = []
    real = engine.TrainStep.forward

    def spy(self, x, y):
        w = next(p for p in self.model.parameters() if p.dim() == 4)
        seen.append(
            (
                x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous(),
            )
        )
        return real(self, x, y)

    monkeypatch.setattr(engine.TrainStep, "forward", spy)
    return seen


@pytest.mark.parametrize("setting,channels_last", [("auto", True), (True, True), (False, False)])
def test_memory_format_is_used_and_recorded(tmp_path, monkeypatch, setting, channels_last):
    seen = _spy_memory_format(monkeypatch)
    res = fit(recipe(train={"epochs": 1, "channels_last": setting}), tmp_path / "run", quiet=True)
    assert seen and set(seen) == {(channels_last, channels_last)}
    assert json.loads((tmp_path / "run" / "run.json").read_text())["channels_last"] is channels_last
    runtime = res.to_json()["runtime"]
    assert runtime["memory_format"] == ("channels_last" if channels_last else "contiguous")
    assert runtime["device"] == "cpu" and runtime["threads"] == 1


def test_resume_reuses_the_recorded_memory_format(tmp_path, monkeypatch):
    """--resume trains in the format run.json records and never re-decides; run.json files from before
    `auto` (no key) get the old rule: channels_last only for `true` on CUDA."""
    import shutil

    from sdtool import losses

    class Cut(Exception):
        pass

    real, calls = losses.SelfDistillLoss.forward, {"n": 0}

    def cut_in_epoch_2(self, *args):
        calls["n"] += 1
        if calls["n"] > 6:  # epoch 1 has 6 steps
            raise Cut
        return real(self, *args)

    with monkeypatch.context() as m:
        m.setattr(losses.SelfDistillLoss, "forward", cut_in_epoch_2)
        with pytest.raises(Cut):
            fit(recipe(), tmp_path / "cut", quiet=True)
    info = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert info["channels_last"] is True  # auto, on the CPU
    monkeypatch.setattr(engine, "use_channels_last", lambda *a: pytest.fail("resume re-decided the format"))
    seen = _spy_memory_format(monkeypatch)
    for recorded, expect in [(True, True), (False, False), (None, False)]:
        run = tmp_path / f"resume_{recorded}"
        shutil.copytree(tmp_path / "cut", run)
        kept = {k: v for k, v in info.items() if k != "channels_last"}
        (run / "run.json").write_text(json.dumps(kept if recorded is None else {**kept, "channels_last": recorded}))
        seen.clear()
        res = fit(None, None, resume=run, quiet=True)
        assert len(res.history) == 1 and set(seen) == {(expect, expect)}
        assert res.runtime["memory_format"] == ("channels_last" if expect else "contiguous")


def test_existing_run_folder_is_not_overwritten(tmp_path):
    fit(recipe(train={"epochs": 1}), tmp_path / "run", quiet=True)
    with pytest.raises(SdtoolError, match="--resume"):
        fit(recipe(train={"epochs": 1}), tmp_path / "run", quiet=True)


RESUME_RECIPE = {**TINY, "train": {**TINY["train"], "epochs": 4}, "data": {**TINY["data"], "val_size": 16}}


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sdtool", "train", *extra, "--out", str(out), "--json"]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    """kill -9 during an epoch, resume, and end with bit-identical weights (CPU)."""
    rfile = tmp_path / "r.yaml"
    import yaml

    rfile.write_text(yaml.safe_dump(RESUME_RECIPE))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_cmd(tmp_path / "full", str(rfile)), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(
        _train_cmd(tmp_path / "cut", str(rfile)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 1):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 1 <= done < 4, "the run must be cut before its end"
    subprocess.run(
        [sys.executable, "-m", "sdtool", "train", "--resume", str(tmp_path / "cut"), "--json"],
        check=True,
        env=env,
        capture_output=True,
    )
    a, b = weights(tmp_path / "full" / "last.safetensors"), weights(tmp_path / "cut" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (
        weights(tmp_path / "full" / "best.safetensors").keys() == weights(tmp_path / "cut" / "best.safetensors").keys()
    )
    # What was just shown bit-exact was channels_last training: `auto` on the CPU, recorded and reused.
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["channels_last"] is True
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows][-1] == 4
