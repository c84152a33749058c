"""model.pretrained: torchvision or local weights matched by name and shape onto a fresh model's backbone."""

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from sdtool import SdtoolError, checkpoint, fileio
from sdtool.engine import fit
from sdtool.models import create_model
from sdtool.models.pretrained import load_pretrained, recorded
from sdtool.recipe import from_dict, load_recipe
from tests.ckpt_factory import make_ckpt

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "data.name=fake",
    "data.fake_size=16",
    "data.input_size=32",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.val_size=0",
    "data.workers=0",
    "train.epochs=1",
    "train.limit_batches=1",
    "train.device=cpu",
    "train.threads=1",
]


def tv_weights(tmp_path: Path, arch: str, suffix: str = ".pth", **kw) -> tuple[Path, torch.nn.Module]:
    """A torchvision model with random weights (weights=None), saved as its state dict."""
    torch.manual_seed(1)
    tv = getattr(torchvision.models, arch)(weights=None, **kw).eval()
    path = tmp_path / f"{arch}{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(path))
    else:
        torch.save(tv.state_dict(), path)
    return path, tv


def model_cfg(**model):
    return from_dict({"model": model}).model


def load(net, lines=None, **model):
    return load_pretrained(net, model_cfg(**model), (lines if lines is not None else []).append)


def test_pth_lands_in_torchvision_modules(tmp_path):
    """Built-in resnet18 (ImageNet stem, 1000 classes): every tensor loads, the deepest exit is torchvision's net."""
    path, tv = tv_weights(tmp_path, "resnet18")
    net = create_model("resnet18", num_classes=1000, stem="imagenet")
    lines: list[str] = []
    rec = load(net, lines, name="resnet18", stem="imagenet", pretrained=str(path))
    assert rec["skipped"] == [] and rec["missing"] == [] and rec["unused"] == 0
    assert torch.equal(net.stages[0][0][0].weight, tv.conv1.weight)
    assert torch.equal(net.stages[1][0].conv1.weight, tv.layer2[0].conv1.weight)
    assert torch.equal(net.stages[3][1].bn2.running_var, tv.layer4[1].bn2.running_var)
    assert torch.equal(net.classifiers[-1].weight, tv.fc.weight)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.eval().forward_until(x, net.num_exits - 1), tv(x), atol=1e-5)
    assert len(lines) == 1 and "loaded 122 tensors" in lines[0] and "skipped 0" in lines[0]


def test_split_layer1_and_cifar_stem(tmp_path):
    """layer1's second block lands in stage 2; the 7x7 stem conv and the 1000-class fc are skipped (allowed)."""
    path, tv = tv_weights(tmp_path, "resnet18")
    net = create_model("resnet18", num_classes=10, stem="cifar", split_layer1=True)
    rec = load(net, name="resnet18", split_layer1=True, pretrained=str(path))
    assert rec["skipped"] == ["stages.0.0.0.weight", "classifiers.4.weight", "classifiers.4.bias"]
    assert torch.equal(net.stages[1][0].conv2.weight, tv.layer1[1].conv2.weight)
    assert torch.equal(net.stages[2][0].downsample[0].weight, tv.layer2[0].downsample[0].weight)


def test_safetensors_mobilenet_and_wrapped(tmp_path):
    path, tv = tv_weights(tmp_path, "mobilenet_v2", ".safetensors")
    net = create_model("mobilenet_v2", num_classes=10)
    rec = load(net, name="mobilenet_v2", pretrained=str(path))
    assert rec["missing"] == [] and rec["skipped"] == ["classifiers.3.weight", "classifiers.3.bias"]
    assert torch.equal(net.stages[1][1].conv[0][0].weight, tv.features[5].conv[0][0].weight)
    assert torch.equal(net.stages[3][4][0].weight, tv.features[18][0].weight)
    # torchvision:ARCH stages keep the original names under `stages.N.`
    path, tv = tv_weights(tmp_path, "resnet18", num_classes=10)
    wrapped = create_model("torchvision:resnet18", num_classes=10, input_size=32)
    rec = load(wrapped, name="torchvision:resnet18", pretrained=str(path))
    assert rec["skipped"] == [] and rec["missing"] == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(wrapped.eval().forward_until(x, wrapped.num_exits - 1), tv(x), atol=1e-5)


def test_sdtool_checkpoint_as_source(tmp_path):
    """An sdtool checkpoint gives its backbone and deepest classifier; the exits start fresh."""
    src = make_ckpt(tmp_path / "src.safetensors", val_size=0)
    tensors = fileio.load_tensors(src)
    torch.manual_seed(5)
    net = create_model("resnet18", num_classes=10, width=4)
    rec = load(net, name="resnet18", width=4, pretrained=str(src))
    assert rec["skipped"] == [] and rec["missing"] == [] and rec["unused"] > 0  # exits' tensors: unused
    state = net.state_dict()
    assert all(torch.equal(state[k], tensors[k]) for k in state if k.startswith(("stages.", "classifiers.3.")))
    assert not torch.equal(state["classifiers.0.weight"], tensors["classifiers.0.weight"])


def test_refused_beyond_stem_and_classifier_unless_not_strict(tmp_path):
    path, tv = tv_weights(tmp_path, "resnet18")
    net = create_model("resnet34", num_classes=10)
    with pytest.raises(SdtoolError) as e:
        load(net, name="resnet34", pretrained=str(path))
    msg = str(e.value)
    assert "\n" not in msg and "model.pretrained_strict: false" in msg and "stages.0.1.2.conv1.weight" in msg
    rec = load(net, name="resnet34", pretrained=str(path), pretrained_strict=False)
    assert "stages.0.1.2.conv1.weight" in rec["missing"] and rec["loaded"] > 50
    assert torch.equal(net.stages[2][1].conv1.weight, tv.layer3[1].conv1.weight)
    # Nothing of a float dtype fits (another width): refused even when not strict.
    with pytest.raises(SdtoolError, match="no tensor of .* fits"):
        load(
            create_model("resnet18", num_classes=10, width=8),
            name="resnet18",
            width=8,
            pretrained=str(path),
            pretrained_strict=False,
        )


def test_torchvision_name_from_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    net = create_model("resnet18", num_classes=10, stem="imagenet")
    with pytest.raises(SdtoolError) as e:
        load(net, name="resnet18", stem="imagenet", pretrained="IMAGENET1K_V1")
    msg = str(e.value)
    assert "\n" not in msg and "resnet18-f37072fd.pth" in msg and str(folder) in msg and "never downloads" in msg
    folder.mkdir(parents=True)
    path, tv = tv_weights(tmp_path, "resnet18")
    (folder / "resnet18-f37072fd.pth").write_bytes(path.read_bytes())
    rec = load(net, name="resnet18", stem="imagenet", pretrained="IMAGENET1K_V1")
    assert rec["source"] == "ResNet18_Weights.IMAGENET1K_V1" and rec["sha256"] == fileio.sha256(path)
    assert torch.equal(net.stages[2][0].conv1.weight, tv.layer3[0].conv1.weight)


def test_recipe_keys_validated(tmp_path):
    with pytest.raises(SdtoolError, match=r"model.pretrained: file .*nope.pth not found"):
        from_dict({"model": {"pretrained": str(tmp_path / "nope.pth")}})
    with pytest.raises(SdtoolError, match="not a weights name of resnet18; valid: IMAGENET1K_V1"):
        from_dict({"model": {"pretrained": "IMAGENET9K"}})
    with pytest.raises(SdtoolError, match="model.pretrained: wrn_40_2 has no torchvision weights"):
        from_dict({"model": {"name": "wrn_40_2", "pretrained": "IMAGENET1K_V1"}})
    with pytest.raises(SdtoolError, match="model.pretrained_strict: expected true or false"):
        from_dict({"model": {"pretrained_strict": "maybe"}})
    assert from_dict({"model": {"name": "torchvision:resnet50", "pretrained": "DEFAULT"}}).model.pretrained


class NotATensor:
    pass


def test_pickles_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "x": NotATensor()}, path)
    net = create_model("resnet18", num_classes=10, width=4)
    with pytest.raises(SdtoolError, match="weights_only=True"):
        load(net, name="resnet18", width=4, pretrained=str(path))
    torch.save({"w": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(SdtoolError, match="does not hold a state dict"):
        load(net, name="resnet18", width=4, pretrained=str(path))


def test_init_and_pretrained_refused(tmp_path):
    init = make_ckpt(tmp_path / "init.safetensors", val_size=0)
    src = make_ckpt(tmp_path / "src.safetensors", val_size=0)
    r = load_recipe(None, TINY_RUN + ["model.width=4", f"model.pretrained={src}"])
    with pytest.raises(SdtoolError, match="--init and model.pretrained both"):
        fit(r, tmp_path / "run", init=str(init), quiet=True)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenet_v2"])
def test_finetune_recipes_one_step(tmp_path, arch):
    """The shipped recipes run one step on fake data with a local .pth; the lineage records the weights."""
    path, tv = tv_weights(tmp_path, arch)
    r = load_recipe(ROOT / "recipes" / f"finetune_pretrained_{arch}_sd.yaml", TINY_RUN + [f"model.pretrained={path}"])
    assert r.sd.mode == "self_distill" and r.model.pretrained_strict
    res = fit(r, tmp_path / "run", quiet=True)
    entry = checkpoint.read_meta(res.last)["lineage"][-1]
    rec = entry["pretrained"]  # lineage extras sit beside the standard fields
    assert rec["source"] == str(path) and rec["sha256"] == fileio.sha256(path)
    assert rec["missing"] == [] and rec["skipped"] == [f"classifiers.3.{p}" for p in ("weight", "bias")]
    assert json.loads(json.dumps(entry))["recipe"]["model"]["pretrained"] == str(path)
    assert recorded(res.last) == rec  # what a resumed run records without reading the file again
