"""Model registry and the multi-exit network against the official code's figures (DESIGN.md)."""

import pytest
import torch

from sdtool import SdtoolError
from sdtool.models import MultiExitNet, create_model, list_models


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def exit_params(m: MultiExitNet, k: int) -> int:
    """Parameters needed to reach and use exit k (0-based): stages up to it + its attention/head/classifier."""
    mods = list(m.stages[: m.exit_stages[k] + 1]) + [m.attention[k], m.heads[k], m.classifiers[k]]
    return sum(n_params(x) for x in mods)


def test_official_resnet18_parameter_count():
    m = create_model("resnet18", num_classes=100, stem="cifar", head="byot", attention=True)
    assert n_params(m) == 12_283_344
    assert m.num_exits == 4
    # DESIGN.md: 0.480 / 1.018 / 3.166 / 11.220 M parameters to reach and use each exit.
    got = [exit_params(m, k) / 1e6 for k in range(4)]
    assert got == pytest.approx([0.480, 1.018, 3.166, 11.220], abs=0.0006)


def test_plain_resnet18_is_the_backbone_alone():
    m = create_model("resnet18", num_classes=100, exits=[])
    assert m.num_exits == 1
    assert n_params(m) == 11_220_132  # torchvision's resnet18 with a 3x3 stem and 100 classes


@pytest.mark.parametrize(
    "name,count",
    [
        ("resnet50", 25_557_032),
        ("wide_resnet50_2", 68_883_240),
        ("resnext50_32x4d", 25_028_904),
        ("resnet34", 21_797_672),
    ],
)
def test_imagenet_stem_plain_matches_torchvision(name, count):
    with torch.device("meta"):
        m = create_model(name, num_classes=1000, stem="imagenet", exits=[])
    assert n_params(m) == count


def test_forward_shapes_and_truncated_path_agree():
    torch.manual_seed(0)
    m = create_model("resnet18", num_classes=7, width=8).eval()
    x = torch.randn(3, 3, 32, 32)
    logits, feats = m(x)
    assert [tuple(z.shape) for z in logits] == [(3, 7)] * 4
    assert m.feature_dims == [64, 64, 64, 64] and [f.shape[1] for f in feats] == m.feature_dims
    for k in range(4):
        torch.testing.assert_close(m.forward_until(x, k), logits[k])


def test_attention_feeds_only_its_head():
    """The next stage receives the stage output, not the attended one (official code)."""
    torch.manual_seed(0)
    a = create_model("resnet18", num_classes=5, width=4, attention=True).eval()
    b = create_model("resnet18", num_classes=5, width=4, attention=False).eval()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("attention.")})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a(x)[0][-1], b(x)[0][-1])  # the deepest exit never sees attention
    assert not torch.allclose(a(x)[0][0], b(x)[0][0])


@pytest.mark.parametrize(
    "head,dims", [("byot", [32, 32, 32, 32]), ("light", [32, 32, 32, 32]), ("pool", [4, 8, 16, 32])]
)
def test_heads(head, dims):
    m = create_model("resnet18", num_classes=3, width=4, head=head)
    assert m.feature_dims == dims
    logits, _ = m(torch.randn(2, 3, 32, 32))
    assert len(logits) == 4


def test_exit_subset_and_imagenet_stem():
    m = create_model("resnet18", num_classes=3, width=4, exits=[2], stem="imagenet")
    assert m.exit_stages == [1, 3]
    logits, _ = m(torch.randn(1, 3, 64, 64))
    assert len(logits) == 2


def test_unknown_names_fail_with_the_valid_ones():
    with pytest.raises(SdtoolError, match="valid models: .*resnet18"):
        create_model("resnet81")
    with pytest.raises(SdtoolError, match="did you mean resnet18"):
        create_model("resnet81")
    with pytest.raises(SdtoolError, match="valid heads"):
        create_model("resnet18", head="huge")
    with pytest.raises(SdtoolError, match="no argument 'depth'"):
        create_model("resnet18", depth=3)
    with pytest.raises(SdtoolError, match="between 1 and 4"):
        create_model("resnet18", exits=[0, 5])
    assert "resnet18" in list_models()


def test_spec_records_arguments():
    m = create_model("resnet18", num_classes=3, width=4)
    assert m.spec == {"name": "resnet18", "args": {"num_classes": 3, "width": 4}}


def test_split_layer1_adds_an_exit_inside_layer1():
    """split_layer1: stage 1 = stem + layer1[:1], stage 2 = layer1[1:] (same resolution, so the byot head
    after stage 1 starts with a stride-1 SepConv), then layer2-4: five stages and five exits."""
    torch.manual_seed(0)
    m = create_model("resnet18", num_classes=7, width=8, split_layer1=True).eval()
    assert len(m.stages) == 5 and m.num_exits == 5 and m.exit_stages == [0, 1, 2, 3, 4]
    assert m.strides == [1, 1, 2, 2, 2]
    assert m.spec == {
        "name": "resnet18",
        "args": {"num_classes": 7, "width": 8, "split_layer1": True},
        "stages": ["stem+layer1[:1]", "layer1[1:]", "layer2", "layer3", "layer4"],
    }
    assert len(m.stages[0][1]) == 1 and len(m.stages[1]) == 1  # one BasicBlock on each side of the cut
    h, sides, widths = torch.randn(1, 3, 32, 32), [], []
    for stage in m.stages:
        h = stage(h)
        sides.append(h.shape[-1])
        widths.append(h.shape[1])
    assert sides == [32, 32, 16, 8, 4] and widths == [8, 8, 16, 32, 64]
    assert [m.heads[0][i][0].stride for i in range(4)] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert m.feature_dims == [64] * 5
    x = torch.randn(3, 3, 32, 32)
    logits, _ = m(x)
    assert [tuple(z.shape) for z in logits] == [(3, 7)] * 5
    for k in range(5):
        torch.testing.assert_close(m.forward_until(x, k), logits[k])


def test_split_layer1_exit_placement_and_names():
    m = create_model("resnet18", num_classes=3, width=4, split_layer1=True, exits=[1, 3, 4])
    assert m.exit_stages == [0, 2, 3, 4]  # the last stage always has an exit
    assert m.heads[0][0][0].stride == (1, 1) and len(m.heads[0]) == 5  # 4 SepConvs + pooling
    t = create_model(
        "truncated", base="resnet18", exit=1, base_args={"num_classes": 3, "width": 4, "split_layer1": True}
    )  # exit 1 standing alone
    assert len(t.stages) == 1 and n_params(t) == exit_params(m, 0)
    with pytest.raises(SdtoolError, match="between 1 and 5"):
        create_model("resnet18", split_layer1=True, exits=[6])
    with pytest.raises(SdtoolError, match="split_layer1 must be true or false"):
        create_model("resnet18", split_layer1="yes")
    # The stem and layer1[0] keep their unsplit names; the rest of layer1 is a stage of its own.
    split = set(create_model("resnet18", num_classes=3, width=4, split_layer1=True).state_dict())
    plain = set(create_model("resnet18", num_classes=3, width=4).state_dict())
    assert {k for k in plain if k.startswith(("stages.0.0.", "stages.0.1.0."))} <= split
    assert "stages.1.0.conv1.weight" in split and "stages.4.1.conv2.weight" in split
    # ResNet50: layer1 has 3 Bottlenecks, cut after 1 (split_point, as the CIFAR ResNets).
    with torch.device("meta"):
        r50 = create_model("resnet50", num_classes=10, width=4, split_layer1=True)
    assert (
        len(r50.stages[0][1]) == 1
        and len(r50.stages[1]) == 2
        and r50.spec["stages"][:2] == ["stem+layer1[:1]", "layer1[1:]"]
    )


def test_split_layer1_exit_1_costs_less_default_unchanged():
    """The point of the split: exit 1 costs ~0.20 of the deepest exit instead of ~0.30 (CIFAR-100 at full
    width: 100.4 M MACs instead of 166.4 M); the later exits cost what the unsplit model's do. The default
    build is the paper's network, names and counts unchanged."""
    from sdtool.profile import exit_costs

    with torch.device("meta"):
        a = create_model("resnet18", num_classes=100)
        b = create_model("resnet18", num_classes=100, split_layer1=True)
    assert n_params(a) == 12_283_344 and len(a.stages) == 4 and a.strides == [1, 2, 2, 2]
    assert len(b.stages) == 5 and b.num_exits == 5
    assert a.spec == {"name": "resnet18", "args": {"num_classes": 100}} and a.stage_names is None
    assert [k for k in a.state_dict() if k.startswith("stages.")][-1].startswith("stages.3.")
    ca = exit_costs(create_model("resnet18", num_classes=100), (32, 32))["exits"]
    cb = exit_costs(create_model("resnet18", num_classes=100, split_layer1=True), (32, 32))["exits"]
    assert [e["macs"] for e in cb[1:]] == [e["macs"] for e in ca]
    assert cb[0]["macs"] < 0.65 * ca[0]["macs"]
    assert cb[0]["macs"] / 1e6 == pytest.approx(100.4, rel=0.01)
    assert cb[0]["share_of_reference"] == pytest.approx(0.180, abs=0.002)
    assert ca[0]["share_of_reference"] == pytest.approx(0.299, abs=0.002)
