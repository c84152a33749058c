"""train.tensorboard: the epochs' metrics rows as TensorBoard scalars, beside metrics.jsonl."""

import json

import pytest

from sdtool import SdtoolError, scalars
from sdtool.engine import fit
from sdtool.recipe import from_dict

TINY = {
    "model": {"name": "resnet18", "width": 4},
    "data": {"name": "fake", "fake_size": 64, "batch_size": 16, "eval_batch_size": 64, "val_size": 0.25},
    "train": {"epochs": 2, "lr": 0.05, "seed": 0, "threads": 1, "tensorboard": True},
}


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_flatten_names_every_curve():
    row = {
        "epoch": 3,
        "lr": 0.1,
        "train_loss": 1.5,
        "train_top1": 40.0,
        "images_per_s": 900.0,
        "threads": 2,
        "device": "cpu",
        "world_size": 1,
        "train_parts": {"ce_deep": 1.0, "kd": 0.25},
        "eval_split": "val",
        "eval": {
            "exits": [{"top1": 30.0, "top5": 80.0, "loss": 2.0}, {"top1": 50.0, "top5": 90.0, "loss": 1.2}],
            "ensemble": {"top1": 52.0, "top5": 91.0, "loss": 1.1},
        },
    }
    got = scalars.flatten(row)
    assert got == {
        "train/lr": 0.1,
        "train/loss": 1.5,
        "train/top1": 40.0,
        "train/images_per_s": 900.0,
        "train/part_ce_deep": 1.0,
        "train/part_kd": 0.25,
        "val/exit1_top1": 30.0,
        "val/exit1_top5": 80.0,
        "val/exit1_loss": 2.0,
        "val/exit2_top1": 50.0,
        "val/exit2_top5": 90.0,
        "val/exit2_loss": 1.2,
        "val/ensemble_top1": 52.0,
        "val/ensemble_top5": 91.0,
        "val/ensemble_loss": 1.1,
    }


def test_training_writes_the_metrics_rows_as_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    fit(from_dict(TINY), tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = _events(tmp_path / "run" / scalars.TB_DIR)
    assert [s for s, _ in events["train/loss"]] == [1, 2]
    assert [v for _, v in events["train/loss"]] == pytest.approx([r["train_loss"] for r in rows], rel=1e-6)
    deepest = [r["eval"]["exits"][-1]["top1"] for r in rows]
    assert [v for _, v in events["val/exit4_top1"]] == pytest.approx(deepest, rel=1e-6)
    assert "val/ensemble_top1" in events


def test_missing_tensorboard_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(scalars.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SdtoolError, match=r"pip install 'sdtool\[tensorboard\]'"):
        fit(from_dict(TINY), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_off_by_default_writes_no_event_files(tmp_path):
    off = json.loads(json.dumps(TINY))
    off["train"].update(tensorboard=False, epochs=1)
    fit(from_dict(off), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / scalars.TB_DIR).exists()
