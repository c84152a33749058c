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


@pytest.mark.parametrize("name,count", [("resnet50", 25_557_032), ("wide_resnet50_2", 68_883_240),
                                        ("resnext50_32x4d", 25_028_904), ("resnet34", 21_797_672)])
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


@pytest.mark.parametrize("head,dims", [("byot", [32, 32, 32, 32]), ("light", [32, 32, 32, 32]), ("pool", [4, 8, 16, 32])])
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
