"""timm backbones through the exits-on-any-model path (`model.name: timm:NAME`): tracing, training, reloading.

The two models are the smallest of the two families whose tracing matters most: a ResNet (plain modules) and a
MobileNetV3 (timm's BatchNormAct2d, which must stay one call so that eval mode uses the running statistics).
"""

import importlib.util
import json
import sys

import pytest
import torch

from sdtool import SdtoolError, checkpoint
from sdtool.models import create_model

# CI installs the timm extra; without it only the one-line refusal can be tested.
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="the timm extra is not installed")

MODELS = {
    "resnet10t": ["..layer1", "layer1..layer2", "layer2..layer3", "layer3..layer4.0.act2"],
    "mobilenetv3_small_050": ["..blocks.0", "blocks.0..blocks.1", "blocks.1..blocks.3", "blocks.3..act2"],
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may be downloaded: the hub client refuses to go online."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@needs_timm
@pytest.mark.parametrize("arch", MODELS)
def test_timm_model_wraps_with_default_exits_and_reloads(arch, tmp_path):
    import timm

    from sdtool.profile import exit_costs

    torch.manual_seed(0)
    m = create_model(f"timm:{arch}", num_classes=10, input_size=32).eval()
    assert m.spec["name"] == "timm_wrapped" and m.spec["args"]["arch"] == arch
    assert m.spec["stages"] == MODELS[arch] and m.num_exits == 4
    torch.manual_seed(0)  # the same backbone weights: timm's model is built first inside the builder
    ref = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, _ = m(x)
        assert [tuple(z.shape) for z in logits] == [(3, 10)] * 4
        # The final exit is timm's model, its classifier included, in eval mode (running BN statistics).
        torch.testing.assert_close(logits[-1], ref(x))
        torch.testing.assert_close(m(x[:1])[0][-1], logits[-1][:1])  # no batch statistics in eval

    path = tmp_path / "m.safetensors"
    checkpoint.save(path, m, {"num_classes": 10})
    back, meta = checkpoint.load(path)
    assert meta["model"]["name"] == "timm_wrapped" and meta["model"]["stages"] == MODELS[arch]
    with torch.no_grad():
        for a, b in zip(back.eval()(x)[0], logits):
            torch.testing.assert_close(a, b)

    costs = exit_costs(m, (32, 32))
    cumulative = [e["cumulative_macs"] for e in costs["exits"]]
    assert all(c > 0 for c in cumulative) and cumulative == sorted(cumulative)


@needs_timm
@pytest.mark.parametrize(
    "arch,exits_after,n_exits,norm",
    [("resnet10t", None, 4, "layer1.0.bn1"), ("mobilenetv3_small_050", ["blocks.1", "blocks.3"], 3, "bn1")],
)
def test_timm_model_trains_from_a_recipe(arch, exits_after, n_exits, norm, tmp_path):
    from sdtool.engine import fit
    from sdtool.recipe import load_recipe

    sets = [
        "data.name=fake",
        "data.fake_size=32",
        "data.batch_size=16",
        "data.input_size=32",
        "train.epochs=1",
        "train.limit_batches=1",
        f"model.name=timm:{arch}",
        "model.width=null",
    ]
    if exits_after:
        sets.append(f"model.exits_after=[{','.join(exits_after)}]")
    res = fit(load_recipe(None, sets), tmp_path / "run", quiet=True)
    m, meta = checkpoint.load(res.last)
    assert meta["model"]["args"].get("exits_after") == exits_after and m.num_exits == n_exits
    assert json.loads(json.dumps(meta["model"]["args"])) == meta["model"]["args"]  # plain JSON rebuilds it
    # One training step updated the batch-norm statistics (timm's BatchNormAct2d is kept whole, so the traced
    # graph has no training flag frozen in).
    assert int(m.stages[0].get_submodule(norm).num_batches_tracked) == 1


@needs_timm
def test_timm_names_that_cannot_work_fail_with_one_line():
    with pytest.raises(SdtoolError, match="did you mean resnet18"):
        create_model("timm:resnet81", num_classes=10)
    with pytest.raises(SdtoolError, match="not a hub or folder name"):
        create_model("timm:hf-hub:timm/resnet18.a1_in1k", num_classes=10)
    with pytest.raises(SdtoolError, match="has no module 'layer9'"):
        create_model("timm:resnet10t", num_classes=10, exits_after=["layer9"])


def test_timm_missing_fails_with_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed: its import fails
    with pytest.raises(SdtoolError) as e:
        create_model("timm:resnet10t", num_classes=10)
    assert str(e.value) == 'timm:resnet10t needs the timm package: pip install "sdtool[timm]"'
