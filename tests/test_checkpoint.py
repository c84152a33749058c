"""The shared checkpoint format: round trip, atomic writes, and every kind of bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from sdtool import SdtoolError, checkpoint
from sdtool.models import create_model

META = {
    "num_classes": 3,
    "class_names": ["a", "b", "c"],
    "input": {"size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3},
}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=3, width=4).eval()


def test_round_trip_in_a_fresh_process(tmp_path, model):
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, model, META)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")  # test-side scratch only
    expected = model(x)[0][-1]
    code = (
        "import sys, torch; from sdtool import checkpoint;"
        f"m, meta = checkpoint.load({str(path)!r});"
        f"x = torch.load({str(tmp_path / 'x.pt')!r});"
        f"torch.save(m(x)[0][-1], {str(tmp_path / 'y.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected)


def test_metadata_contents(tmp_path, model):
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, model, META)
    meta = checkpoint.read_meta(path)
    assert meta["format_version"] == checkpoint.FORMAT_VERSION
    assert meta["model"] == {"name": "resnet18", "args": {"num_classes": 3, "width": 4}}
    assert meta["shapes"] == {}  # unpruned
    assert meta["class_names"] == ["a", "b", "c"] and meta["input"]["size"] == 32


def test_pruned_shapes_are_recorded_and_rebuilt(tmp_path, model):
    """A structural change (here by hand: stage-1 conv narrowed) survives a save/load without pickle."""
    from sdtool.models.shapes import apply_shapes, shape_changes

    shapes = {
        "stages.0.1.0.conv1": {"type": "conv2d", "in_channels": 4, "out_channels": 2, "groups": 1},
        "stages.0.1.0.bn1": {"type": "batchnorm2d", "num_features": 2},
        "stages.0.1.0.conv2": {"type": "conv2d", "in_channels": 2, "out_channels": 4, "groups": 1},
    }
    apply_shapes(model, shapes)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    model.eval()
    assert shape_changes(model, model.spec) == shapes
    path = tmp_path / "p.safetensors"
    checkpoint.save(path, model, META)
    loaded, meta = checkpoint.load(path)
    assert meta["shapes"] == shapes
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x)[0][-1], model(x)[0][-1])


def test_lineage_entry_hashes_the_parent(tmp_path, model):
    parent = tmp_path / "parent.safetensors"
    checkpoint.save(parent, model, META)
    entry = checkpoint.lineage_entry("prune", None, parent, checkpoint.now(), {"x": 1})
    assert entry["parent_sha256"] == checkpoint.sha256(parent) and len(entry["parent_sha256"]) == 64
    assert entry["command"] == "prune" and entry["metrics"] == {"x": 1}


def _bad(path, match):
    with pytest.raises(SdtoolError, match=match) as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value)


def test_random_bytes(tmp_path):
    p = tmp_path / "r.safetensors"
    p.write_bytes(os.urandom(4096))
    _bad(p, "not a readable safetensors file")


def test_truncated(tmp_path, model):
    p = tmp_path / "t.safetensors"
    checkpoint.save(p, model, META)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    _bad(p, "corrupt or truncated")


def test_foreign_safetensors(tmp_path):
    p = tmp_path / "f.safetensors"
    save_file({"w": torch.zeros(2)}, str(p), metadata={"format": "pt"})
    _bad(p, "not an sdtool checkpoint")


def test_newer_format(tmp_path, model):
    p = tmp_path / "n.safetensors"
    checkpoint.save(p, model, META)
    tensors = checkpoint.load_tensors(p)
    meta = checkpoint.read_meta(p)
    meta["format_version"] = checkpoint.FORMAT_VERSION + 1
    save_file(tensors, str(p), metadata={"sdtool": json.dumps(meta)})
    _bad(p, "newer sdtool")


def test_tensors_that_do_not_fit_the_spec(tmp_path, model):
    p = tmp_path / "w.safetensors"
    checkpoint.save(p, model, META)
    tensors = checkpoint.load_tensors(p)
    meta = checkpoint.read_meta(p)
    tensors["classifiers.3.weight"] = torch.zeros(5, 32)
    save_file(tensors, str(p), metadata={"sdtool": json.dumps(meta)})
    _bad(p, "do not fit the model spec")
    del tensors["classifiers.3.weight"]
    save_file(tensors, str(p), metadata={"sdtool": json.dumps(meta)})
    _bad(p, "missing classifiers.3.weight")


def test_write_to_a_folder_is_one_line(tmp_path, model):
    with pytest.raises(SdtoolError, match="is a folder"):
        checkpoint.save(tmp_path, model, META)


def test_unrecordable_structure_is_refused_before_writing(tmp_path, model):
    """A structural change the format cannot express (here: a module swapped for another type) is caught
    by rebuilding the recorded structure before anything is written."""
    model.heads[0][0] = torch.nn.Conv2d(4, 8, 3)
    with pytest.raises(SdtoolError, match="nothing was written"):
        checkpoint.save(tmp_path / "x.safetensors", model, META)
    assert not list(tmp_path.iterdir())


def test_missing_file(tmp_path):
    _bad(tmp_path / "nope.safetensors", "not found")


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(SdtoolError, match="cannot write .*a.bin: disk full"):
        checkpoint.atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # the temporary file was removed
