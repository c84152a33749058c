"""The training loop's pieces: run.json (`RunInfo`), the memory-format rule on resume, the `ExtraLoss`
protocol as the engine calls it, metrics.jsonl reconciliation, and the torchvision layout table."""

import json

import pytest
import torch
from torch import nn

from sdtool import SdtoolError, checkpoint, engine
from sdtool.engine import fit
from sdtool.models.wrap import default_exits, torchvision_stages
from sdtool.recipe import from_dict
from sdtool.runfolder import RunInfo, load_run, truncate_metrics

TINY = {
    "model": {"name": "resnet18", "width": 4},
    "data": {"name": "fake", "fake_size": 64, "batch_size": 16, "eval_batch_size": 64},
    "train": {"epochs": 1, "lr": 0.05, "seed": 0, "threads": 1},
}


def test_run_info_round_trip_and_old_files(tmp_path):
    info = RunInfo("parent.safetensors", "ab" * 32, "train", True)
    info.write(tmp_path)
    assert json.loads((tmp_path / "run.json").read_text()) == {
        "init": "parent.safetensors",
        "init_sha256": "ab" * 32,
        "command": "train",
        "channels_last": True,
    }
    assert RunInfo.read(tmp_path) == info
    (tmp_path / "run.json").write_text(json.dumps({"init": None, "command": "train"}))  # before `auto`
    assert RunInfo.read(tmp_path).channels_last is None
    assert RunInfo.read(tmp_path / "missing") == RunInfo()


def test_load_run_needs_a_run_folder(tmp_path):
    with pytest.raises(SdtoolError, match="has no recipe.yaml"):
        load_run(tmp_path)


def test_memory_format_rule_on_resume():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engine._channels_last(None, "auto", cpu) is True  # a new run decides
    assert engine._channels_last(RunInfo(channels_last=False), "auto", cpu) is False  # a resumed run keeps it
    # run.json from before `auto`: channels_last was used only for `true` on CUDA
    assert [engine._channels_last(RunInfo(), s, d) for s, d in [(True, cuda), (True, cpu), ("auto", cuda)]] == [
        True,
        False,
        False,
    ]


def test_truncate_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))
    truncate_metrics(path, {"epoch": 2, "kept": True})  # epoch 3 was cut short
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"epoch": 1}, {"epoch": 2, "kept": True}]
    truncate_metrics(tmp_path / "none.jsonl", None)  # died before the first row
    assert (tmp_path / "none.jsonl").read_text() == ""


class _Extra(nn.Module):
    """A minimal `ExtraLoss`: one trainable weight, a term that depends on it, counters for its hooks."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.bound: list = []
        self.calls = 0

    def bind(self, model, bundle) -> None:
        self.bound.append((model, bundle.num_classes, next(model.parameters()).device))

    def forward(self, x, logits, features, y):
        self.calls += 1
        loss = 0.01 * self.w**2 * logits[-1].float().pow(2).mean()
        return loss, {"extra_term": loss.detach()}

    def epoch_metrics(self) -> dict[str, float]:
        out, self.calls = {"extra_calls": float(self.calls)}, 0
        return out


def test_extra_loss_protocol_as_the_engine_calls_it(tmp_path):
    extra = _Extra()
    res = fit(from_dict(json.loads(json.dumps(TINY))), tmp_path / "run", extra=extra, quiet=True)
    assert len(extra.bound) == 1 and extra.bound[0][1] == 10  # bound once, to the student and the data
    row = res.history[0]
    assert row["extra_calls"] == 4.0  # 64 images / 16 per batch; epoch_metrics reset the count after
    assert "extra_term" in row["train_parts"]
    assert extra.w.item() != 1.0  # optimised with the network
    state = checkpoint.load_tensors(tmp_path / "run" / "train_state.safetensors")
    assert torch.equal(state["extra.w"], extra.w.detach())  # and stored in the resume state


def test_torchvision_layout_table():
    assert default_exits("resnet50") == ["layer1", "layer2", "layer3"]
    assert torchvision_stages("wide_resnet50_2") == ["layer1", "layer2", "layer3", "layer4"]
    assert default_exits("mobilenet_v2") == ["features.3", "features.6", "features.13"]
    assert torchvision_stages("mobilenet_v2") is None  # no known stages: no feature distillation
    assert (
        default_exits("shufflenet_v2_x1_0") == ["stage2", "stage3"] and torchvision_stages("shufflenet_v2_x1_0") is None
    )
    assert default_exits("vgg11") is None and torchvision_stages("vgg11") is None
    exits = default_exits("resnet18")
    exits.append("layer4")  # callers get a copy of the table's entry
    assert default_exits("resnet18") == ["layer1", "layer2", "layer3"]
