"""The typed checkpoint interface: metadata types checked before anything is built, derive/save, round trips."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtool import checkpoint
from sdtool.errors import SdtoolError
from sdtool.meta import CheckpointMeta, Thresholds

FIXTURES = Path(__file__).resolve().parent / "data" / "ckpt"


def _raw(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["sdtool"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _without_nulls(obj):
    if isinstance(obj, dict):
        return {k: _without_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_without_nulls(v) for v in obj]
    return obj


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.safetensors")))
def test_metadata_of_earlier_files_round_trips(name):
    raw, _ = _raw(FIXTURES / f"{name}.safetensors")
    meta = CheckpointMeta.from_json(raw, name)
    assert _without_nulls(meta.to_json()) == _without_nulls(raw)


def _tamper(tmp_path: Path, edit, tensors_edit=None) -> Path:
    raw, tensors = _raw(FIXTURES / "trained.safetensors")
    edit(raw)
    if tensors_edit:
        tensors_edit(tensors)
    out = tmp_path / "bad.safetensors"
    save_file(tensors, out, metadata={"sdtool": json.dumps(raw)})
    return out


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda m: m["input"].update(size="big"), "input.size"),
        (lambda m: m.update(model="resnet18"), "model"),
        (lambda m: m["model"].update(args="x"), "model.args"),
        (lambda m: m.update(lineage="train"), "lineage"),
        (lambda m: m["lineage"][0].update(command=3), "lineage[0].command"),
        (lambda m: m.update(num_classes="ten"), "num_classes"),
        (lambda m: m.update(num_classes=True), "num_classes"),
        (lambda m: m.update(val_split={"size": "a", "seed": 0}), "val_split.size"),
        (lambda m: m.update(thresholds={"policy": "max_softmax", "values": "x"}), "thresholds.values"),
        (lambda m: m.update(shapes={"stages.0": 5}), "shapes.stages.0"),
        (lambda m: m.update(class_names="cats"), "class_names"),
    ],
)
def test_a_field_of_the_wrong_type_is_named_before_anything_is_built(tmp_path, monkeypatch, edit, field):
    bad = _tamper(tmp_path, edit)

    def never(*a, **k):
        raise AssertionError("a model was built from unchecked metadata")

    monkeypatch.setattr("sdtool.models.create_model", never)
    with pytest.raises(SdtoolError, match=re.escape(f"metadata field {field} must be")) as e:
        checkpoint.load_checkpoint(bad)
    assert "\n" not in str(e.value)


def test_a_missing_required_field_is_named(tmp_path):
    bad = _tamper(tmp_path, lambda m: m.pop("num_classes"))
    with pytest.raises(SdtoolError, match="lacks 'num_classes'"):
        checkpoint.load_meta(bad)


def test_tensors_of_another_dtype_are_refused_not_cast(tmp_path):
    def to_int8(t):
        k = next(k for k in t if k.endswith("weight"))
        t[k] = t[k].to(torch.int8)

    bad = _tamper(tmp_path, lambda m: None, to_int8)
    with pytest.raises(SdtoolError, match="is I8, the model holds F32"):
        checkpoint.load_checkpoint(bad)


def test_unknown_fields_are_kept(tmp_path):
    good = _tamper(tmp_path, lambda m: m.update(future_field={"x": 1}))
    ckpt = checkpoint.load_checkpoint(good)
    assert ckpt.meta.extra == {"future_field": {"x": 1}}
    out = ckpt.derive("copy").save(tmp_path / "copy.safetensors")
    assert checkpoint.read_meta(out.path)["future_field"] == {"x": 1}


def test_derive_records_one_step_and_leaves_the_parent_alone(tmp_path):
    parent = checkpoint.load_checkpoint(FIXTURES / "thresholds.safetensors")
    before = parent.meta.to_json()
    child = parent.derive("mine", step_metrics={"top1": 1.0}, lineage={"note": "n"}, thresholds=None)
    saved = child.save(tmp_path / "child.safetensors")
    assert parent.meta.to_json() == before
    meta = checkpoint.load_meta(saved.path)
    entry = meta.lineage[-1]
    assert [e.command for e in meta.lineage][:-1] == [e.command for e in parent.meta.lineage]
    assert entry.command == "mine" and entry.metrics == {"top1": 1.0} and entry.extra["note"] == "n"
    assert entry.parent_sha256 == checkpoint.sha256(FIXTURES / "thresholds.safetensors")
    assert "argv" in entry.extra and meta.thresholds is None and meta.metrics == parent.meta.metrics
    assert saved.sha256 == checkpoint.sha256(tmp_path / "child.safetensors")


def test_the_earlier_dict_interface_still_works(tmp_path):
    model, meta = checkpoint.load(FIXTURES / "pruned.safetensors")
    assert isinstance(meta, dict) and meta["num_classes"] == 10 and meta["shapes"]
    checkpoint.save(tmp_path / "again.safetensors", model, checkpoint.derived_meta(meta))
    again, meta2 = checkpoint.load(tmp_path / "again.safetensors")
    assert meta2["shapes"] == meta["shapes"] and sum(p.numel() for p in again.parameters()) == sum(
        p.numel() for p in model.parameters()
    )


def test_thresholds_are_typed():
    ckpt = checkpoint.load_checkpoint(FIXTURES / "thresholds.safetensors")
    t = ckpt.meta.thresholds
    assert isinstance(t, Thresholds) and t.policy == "max_softmax" and len(t.values) == ckpt.model.num_exits - 1


def test_a_model_of_another_dtype_is_not_saved(tmp_path):
    """Loading refuses a tensor of another dtype, so saving refuses to write one (no silent cast either way)."""
    ckpt = checkpoint.load_checkpoint(FIXTURES / "trained.safetensors")
    ckpt.model.half()
    with pytest.raises(SdtoolError, match=r"is torch.float16 but the model's builder makes torch.float32"):
        ckpt.derive("half").save(tmp_path / "half.safetensors")
    assert not any(tmp_path.iterdir())
