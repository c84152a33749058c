"""Exits on any model: wrap a network the registry does not know, cut checks, and the torchvision builder."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdtool import SdtoolError, checkpoint
from sdtool.models import create_model, register_model
from sdtool.models.registry import _REGISTRY
from sdtool.models.wrap import wrap_model


class UserNet(nn.Module):
    """A user's own CNN: functional residual add and pooling in forward(), a Linear classifier."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(24, classes)

    def forward(self, x):
        x = self.conv1(x)
        x = x + self.block1(x)
        x = self.block2(self.down(x))
        x = self.down2(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Untraceable(UserNet):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow
            return super().forward(x)
        return super().forward(-x)


def test_wrap_a_network_the_registry_does_not_know():
    torch.manual_seed(0)
    net = UserNet().eval()
    m = wrap_model(net, ["down", "block2"], num_classes=5, input_size=16).eval()
    assert m.num_exits == 3
    assert m.strides == [2, 1, 2]  # 16 -> 8 (down) -> 8 (block2) -> 4 (down2)
    assert m.feature_dims == [24, 24, 24]  # byot heads follow the backbone to its last width
    x = torch.randn(2, 3, 16, 16)
    logits, feats = m(x)
    assert [tuple(z.shape) for z in logits] == [(2, 5)] * 3
    torch.testing.assert_close(logits[-1], net(x))  # the stages compute the original network
    for k in range(3):
        torch.testing.assert_close(m.forward_until(x, k), logits[k])
    assert "stages.0.block1.0.weight" in m.state_dict()  # original module names inside each stage
    m.train()
    sum(F.cross_entropy(z, torch.tensor([0, 1])) for z in m(x)[0]).backward()
    assert net.conv1[0].weight.grad is not None  # the wrapper shares the user's modules


def test_cuts_that_cannot_work_fail_with_one_line():
    for names, pattern in [
        (["block1"], "skip connection crosses it"),
        (["blok2"], "did you mean block2"),
        (["down", "down"], "twice"),
        (["head"], "outputs shape \\(1, 5\\)"),
    ]:
        with pytest.raises(SdtoolError, match=pattern):
            wrap_model(UserNet(), names, num_classes=5, input_size=16)
    with pytest.raises(SdtoolError, match="cannot trace Untraceable"):
        wrap_model(Untraceable(), ["down"], num_classes=5)
    with pytest.raises(SdtoolError, match="does not run on 3x4x4"):
        wrap_model(nn.Sequential(nn.Conv2d(3, 4, 5), nn.Conv2d(4, 4, 5)), ["0"], num_classes=2, input_size=4)


@pytest.fixture
def registered():
    """A user's builder, registered for the test only (checkpoints rebuild models by registry name)."""

    def user_net(num_classes: int = 5, head: str = "byot", attention: bool = True, exits=None):
        return wrap_model(UserNet(num_classes), ["down", "block2"], num_classes, head, attention, 16, exits)

    register_model(user_net)
    yield "user_net"
    del _REGISTRY["user_net"]


def test_wrapped_model_saves_and_reloads_through_a_registered_builder(registered, tmp_path):
    torch.manual_seed(0)
    m = create_model(registered, num_classes=5, head="light").eval()
    path = tmp_path / "w.safetensors"
    checkpoint.save(path, m, {"num_classes": 5})
    back, meta = checkpoint.load(path)
    assert meta["model"]["stages"] == ["..down", "down..block2", "block2..down2.1"]
    x = torch.randn(2, 3, 16, 16)
    for a, b in zip(back(x)[0], m(x)[0]):
        torch.testing.assert_close(a, b)


def test_torchvision_models_from_a_recipe():
    from sdtool.engine import model_args
    from sdtool.recipe import load_recipe

    r = load_recipe(None, ["model.name=torchvision:resnet18", "model.exits_after=[layer2,layer3]", "model.exits=[2]"])
    args = model_args(r, 10, 32)
    assert args == {
        "num_classes": 10,
        "head": "byot",
        "attention": True,
        "exits": [2],
        "exits_after": ["layer2", "layer3"],
        "input_size": 32,
    }
    m = create_model(r.model.name, **args)
    assert m.spec["name"] == "torchvision_wrapped" and m.spec["args"]["arch"] == "resnet18"
    assert m.num_exits == 2 and m.exit_stages == [1, 2]
    with pytest.raises(SdtoolError, match="no default exit points"):
        create_model("torchvision:squeezenet1_0", num_classes=10)
    with pytest.raises(SdtoolError, match="did you mean resnet18"):
        create_model("torchvision:resnet81", num_classes=10)


def test_in_place_op_right_after_a_cut_does_not_corrupt_the_exit():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Hardtanh(-0.1, 0.1, inplace=True),
        nn.Conv2d(4, 6, 3, padding=1),
    )
    m = wrap_model(net, ["2"], num_classes=3, input_size=8)
    logits, _ = m(torch.randn(2, 3, 8, 8))
    sum(z.sum() for z in logits).backward()  # would fail if Hardtanh modified stage 1's output in place
    assert not net[3].inplace


def test_wrapped_torchvision_shufflenet_prunes_and_reloads(tmp_path, monkeypatch):
    """torchvision's ShuffleNetV2 blocks get a shuffle module (same outputs), so the wrapped model prunes."""
    import copy

    import torch_pruning as tp
    import torchvision

    from sdtool.models.mobile import prunable_shuffles
    from sdtool.prune import PruneOptions, prune_model

    torch.manual_seed(0)
    ref = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(prunable_shuffles(copy.deepcopy(ref))(x), ref(x), rtol=0, atol=0)

    m = create_model("torchvision:shufflenet_v2_x0_5", num_classes=10)
    pruned, info = prune_model(m, PruneOptions(ratio=0.3), 32)
    assert info["macs_fraction"] < 0.9
    checkpoint.save(tmp_path / "p.safetensors", pruned, {"num_classes": 10})
    reloaded, _ = checkpoint.load(tmp_path / "p.safetensors")
    with torch.no_grad():
        for a, b in zip(reloaded(x)[0], pruned.eval()(x)[0]):
            torch.testing.assert_close(a, b)

    def untraceable(*args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", untraceable)
    with pytest.raises(SdtoolError, match="cannot trace the channel dependencies of torchvision_wrapped"):
        prune_model(m, PruneOptions(ratio=0.3), 32)
