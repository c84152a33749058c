"""Hostile checkpoints: metadata that lies about sizes, types or history, and tensors of the wrong dtype or
shape, are refused by every command with one `error:` line naming the field, before any real memory is
used or any file is written; legitimate large settings are not refused."""

import json
import resource
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import sdtool.cli
from sdtool import checkpoint, memory
from sdtool.errors import SdtoolError
from sdtool.meta import CheckpointMeta

FIXTURES = Path(__file__).resolve().parent / "data" / "ckpt"
ROOT = Path(__file__).resolve().parents[1]


def _bad(folder: Path, edit=None, tensors_edit=None) -> Path:
    """trained.safetensors with its JSON metadata and/or tensors edited (as tests/test_meta.py does)."""
    with safe_open(str(FIXTURES / "trained.safetensors"), framework="pt") as f:
        raw, tensors = json.loads(f.metadata()["sdtool"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if edit:
        edit(raw)
    if tensors_edit:
        tensors_edit(tensors)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "bad.safetensors"
    save_file(tensors, out, metadata={"sdtool": json.dumps(raw)})
    return out


def _args(**kw):
    return lambda m: m["model"]["args"].update(kw)


def _first_weight(dtype=None, shape=None):
    def edit(t):
        k = "stages.0.0.0.weight"
        t[k] = t[k].to(dtype) if dtype is not None else torch.zeros(shape)

    return edit


HUGE_SHAPES = {"stages.0.0.0": {"type": "conv2d", "in_channels": 300000, "out_channels": 300000, "groups": 1}}

# (id, metadata edit, tensor edit, what the error line must say)
HOSTILE = [
    ("width-200000", _args(width=200000), None, "GB of parameters and buffers"),
    ("width-negative", _args(width=-4), None, "metadata field model.args.width must be a positive integer, not -4"),
    (
        "width-string",
        _args(width="four"),
        None,
        "metadata field model.args.width must be a positive integer, not 'four'",
    ),
    ("shapes-300000", lambda m: m.update(shapes=HUGE_SHAPES), None, "GB of parameters and buffers"),
    ("spec-string", lambda m: m.update(model="resnet18"), None, "metadata field model must be an object"),
    ("input-100000", lambda m: m["input"].update(size=100000), None, "metadata field input.size must be"),
    ("input-big", lambda m: m["input"].update(size="big"), None, "metadata field input.size must be"),
    ("lineage-string", lambda m: m.update(lineage="train"), None, "metadata field lineage must be a list"),
    ("lineage-entry", lambda m: m["lineage"].append(7), None, "metadata field lineage[1] must be an object"),
    ("lineage-command", lambda m: m["lineage"][0].update(command=3), None, "metadata field lineage[0].command"),
    ("classes-negative", lambda m: m.update(num_classes=-3), None, "metadata field num_classes must be"),
    ("class-names", lambda m: m.update(class_names=["cat"]), None, "metadata field class_names must be"),
    ("args-classes", _args(num_classes=12), None, "metadata field model.args.num_classes must be"),
    ("exits", _args(exits=[1, "x"]), None, "metadata field model.args.exits must be a list of positive integers"),
    ("mean", lambda m: m["input"].update(mean=[0.5]), None, "metadata field input.mean must be a list of 3"),
    (
        "groups",
        lambda m: m.update(
            shapes={"stages.0.0.0": {"type": "conv2d", "in_channels": 3, "out_channels": 4, "groups": 2}}
        ),
        None,
        "metadata field shapes.stages.0.0.0.groups must be a divisor",
    ),
    ("dtype", None, _first_weight(dtype=torch.int8), "stages.0.0.0.weight is I8, the model holds F32"),
    ("dtype-bool", None, _first_weight(dtype=torch.bool), "stages.0.0.0.weight is BOOL, the model holds F32"),
    ("shape", None, _first_weight(shape=(5, 3, 3, 3)), "stages.0.0.0.weight has shape (5, 3, 3, 3)"),
]

COMMANDS = {
    "inspect": lambda bad, out: ["inspect", str(bad)],
    "eval": lambda bad, out: ["eval", str(bad)],
    "profile": lambda bad, out: ["profile", str(bad)],
    "prune": lambda bad, out: ["prune", str(bad), "--ratio", "0.5", "--out", str(out / "pruned.safetensors")],
    "export": lambda bad, out: ["export", str(bad), "--out", str(out / "model.onnx")],
    "train": lambda bad, out: [
        "train",
        str(ROOT / "recipes" / "quickstart.yaml"),
        "--init",
        str(bad),
        "--out",
        str(out / "run"),
        "--set",
        "train.epochs=1",
    ],
}


@pytest.fixture
def real_builds(monkeypatch):
    """Models built with real memory (not on the meta device) while the test runs; and no training."""
    built = []
    build = checkpoint.build_model

    def counting(meta):
        model = build(meta)
        if any(t.device.type != "meta" for t in model.state_dict().values()):
            built.append(model)
        return model

    def never(*a, **k):
        raise AssertionError("training started from a checkpoint that should have been refused")

    monkeypatch.setattr(checkpoint, "build_model", counting)
    monkeypatch.setattr("sdtool.engine.train_epoch", never)
    return built


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("edit,tensors_edit,says", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_every_command_refuses_a_hostile_checkpoint_in_one_line(
    tmp_path, monkeypatch, real_builds, command, edit, tensors_edit, says
):
    monkeypatch.chdir(tmp_path)  # anything a command writes by default would land here
    bad = _bad(tmp_path / "in", edit, tensors_edit)
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(sdtool.cli.app, COMMANDS[command](bad, tmp_path / "out"))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert lines and lines[-1].startswith("error: ") and says in lines[-1], result.output
    assert sum(x.startswith("error:") for x in lines) == 1 and "Traceback" not in result.output
    assert sorted(tmp_path.rglob("*")) == before, "a refused checkpoint left files behind"
    assert real_builds == [], "a model was built with real memory before the checkpoint was refused"


@pytest.mark.parametrize(
    "edit",
    [_args(width=200000), lambda m: m.update(shapes=HUGE_SHAPES), _args(num_classes=10**12)],
    ids=["width", "shapes", "classes"],
)
def test_huge_sizes_are_refused_from_the_meta_device_with_the_numbers(tmp_path, real_builds, edit):
    def both_classes(m):
        edit(m)
        if m["model"]["args"]["num_classes"] != 10:
            m.update(num_classes=m["model"]["args"]["num_classes"], class_names=None)

    bad = _bad(tmp_path, both_classes)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(SdtoolError, match=r"needs [\d.]+ GB \([\d.]+ GB of parameters.*this machine's [\d.]+ GB") as e:
        checkpoint.load_checkpoint(bad)
    assert "\n" not in str(e.value) and real_builds == []
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024, "the check itself allocated"


def test_a_spec_the_builder_cannot_take_is_one_line_naming_it(tmp_path):
    bad = _bad(tmp_path, _args(width=10**30))  # a positive integer, but past what torch can index
    with pytest.raises(SdtoolError, match=r'model spec \{"name": "resnet18".* cannot be built \(\w+Error') as e:
        checkpoint.load_checkpoint(bad)
    assert "\n" not in str(e.value)


def test_metadata_nested_past_the_stack_is_one_line(tmp_path):
    good = FIXTURES / "trained.safetensors"
    with safe_open(str(good), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    deep = '{"format_version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    save_file(tensors, tmp_path / "deep.safetensors", metadata={"sdtool": deep})
    with pytest.raises(SdtoolError, match="the sdtool metadata is not valid JSON"):
        checkpoint.load_meta(tmp_path / "deep.safetensors")


def test_a_builder_check_names_the_file(tmp_path):
    bad = _bad(tmp_path, _args(exits=[9]))
    with pytest.raises(SdtoolError, match=r"bad\.safetensors: model\.exits must name stages between 1 and 4"):
        checkpoint.load_checkpoint(bad)


def test_the_memory_bound_is_this_machines(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "machine_memory", lambda: 10**5)  # a 100 kB machine
    with pytest.raises(SdtoolError, match=r"needs 0\.\d GB .* more than this machine's 0\.0 GB of memory"):
        checkpoint.load_checkpoint(FIXTURES / "trained.safetensors")
    monkeypatch.setattr(memory, "machine_memory", lambda: 2 * 10**6)  # weights fit; a 1024 px image does not
    bad = _bad(tmp_path, lambda m: m["input"].update(size=1024))
    with pytest.raises(SdtoolError, match=r"GB of activations for one 1024x1024 image"):
        checkpoint.check_checkpoint(bad)


def _meta(name: str, args: dict, size: int) -> CheckpointMeta:
    doc = {"format_version": 1, "model": {"name": name, "args": args}, "num_classes": args["num_classes"]}
    return CheckpointMeta.from_json({**doc, "input": {"size": size, "channels": 3}}, "legit")


@pytest.mark.parametrize(
    "name,args,size",
    [
        ("wrn_28_10", {"num_classes": 100, "width": 16}, 32),  # 160-640 channels, 36 M parameters
        ("wrn_28_10", {"num_classes": 100, "width": 16}, 224),
        ("resnet50", {"num_classes": 1000, "stem": "imagenet", "width": 64}, 512),
        ("mobilenet_v2", {"num_classes": 1000, "stem": "imagenet", "width_mult": 1.4}, 224),
        ("resnet18", {"num_classes": 1000, "stem": "imagenet", "width": 160}, 224),  # 73 M parameters
    ],
)
def test_legitimate_large_settings_pass_every_bound(name, args, size):
    meta = _meta(name, args, size)
    skeleton = checkpoint._skeleton(meta, "legit")
    memory.check_model_fits("legit", meta, skeleton)  # does not raise


def test_a_valid_checkpoint_loads_as_before():
    ckpt = checkpoint.load_checkpoint(FIXTURES / "pruned.safetensors")
    assert checkpoint.check_checkpoint(FIXTURES / "pruned.safetensors") == ckpt.meta
    assert all(t.device.type == "cpu" for t in ckpt.model.state_dict().values())
