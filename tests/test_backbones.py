"""Every registered backbone, built small: forward + backward, profile, prune 30 %, reload the pruned file.

New backbones are picked up from the registry automatically; they are built with `width=4` or
`width_mult=0.25` unless TINY says otherwise.
"""

import inspect

import pytest
import torch

from sdtool import SdtoolError, checkpoint
from sdtool.models import create_model, list_models
from sdtool.models.registry import _REGISTRY

TINY = {  # arguments that make a network small enough for a CPU test (and valid)
    "resnext50_32x4d": {"width": 16},  # 32 groups: narrower widths round to zero channels
    "resnet101": {"width": 2},
    "resnet152": {"width": 2},
    "wide_resnet50_2": {"width": 2},
    "resnet110": {"width": 2},
    "wrn_28_10": {"width": 1},
    "wrn_40_2": {"width": 2},
    "resnet8x4": {"width": 8},
    "resnet32x4": {"width": 8},
    "torchvision_wrapped": {"arch": "resnet18", "exits_after": ["layer1", "layer2", "layer3"]},
    "timm_wrapped": {"arch": "resnet10t"},  # the timm extra; tests/test_timm.py tests it further
}
VARIANTS = {  # built-ins in a non-default layout, tested like backbones of their own: (registry name, args)
    "resnet18[split_layer1]": ("resnet18", {"split_layer1": True}),  # 5 stages: an exit inside layer1
}


def tiny(name):
    if name == "timm_wrapped":
        pytest.importorskip("timm")  # an optional extra (`pip install "sdtool[timm]"`)
    if name == "truncated":  # one exit of another model, standing alone
        return create_model("truncated", base="resnet20", base_args={"num_classes": 10, "width": 4}, exit=2)
    name, variant = VARIANTS.get(name, (name, {}))
    params = inspect.signature(_REGISTRY[name]).parameters
    args = {"num_classes": 10, **variant}
    if "width" in params:
        args["width"] = 4
    if "width_mult" in params:
        args["width_mult"] = 0.25
    args.update(TINY.get(name, {}))
    return create_model(name, **args)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", list_models() + list(VARIANTS))
def test_backbone_trains_profiles_prunes_and_reloads(name, tmp_path):
    from sdtool.profile import exit_costs

    torch.manual_seed(0)
    model = tiny(name)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])

    logits, feats = model(x)
    assert [tuple(z.shape) for z in logits] == [(2, 10)] * model.num_exits
    assert [f.shape[1] for f in feats] == model.feature_dims
    sum(torch.nn.functional.cross_entropy(z, y) for z in logits).backward()
    assert all(p.grad is not None for p in model.parameters())  # every module is on some exit's path

    costs = exit_costs(model, (32, 32))
    assert costs["parameters"] == n_params(model)
    macs = [e["macs"] for e in costs["exits"]]
    assert all(m > 0 for m in macs) and macs[-1] == costs["reference"]["macs"]
    assert [e["stages_macs"] for e in costs["exits"]] == sorted(e["stages_macs"] for e in costs["exits"])

    prune = pytest.importorskip("sdtool.prune")
    pruned, info = prune.prune_model(model, prune.PruneOptions(ratio=0.3), 32)
    assert n_params(pruned) < 0.9 * n_params(model)
    assert info["macs_fraction"] < 0.9

    path = tmp_path / "pruned.safetensors"
    checkpoint.save(path, pruned, {"num_classes": 10})
    assert checkpoint.read_meta(path)["shapes"]  # the pruned widths are recorded ...
    reloaded, _ = checkpoint.load(path)  # ... and rebuilt from the file alone
    pruned.eval()
    with torch.no_grad():
        for a, b in zip(reloaded(x)[0], pruned(x)[0]):
            torch.testing.assert_close(a, b)


# Plain backbones (no exits) at CIFAR-100 size against the parameter counts of the reference code
# bases: CRD/RepDistiller (resnet8x4 1.23 M, resnet32x4 7.43 M, wrn_40_2 2.26 M, ...), torchvision.
@pytest.mark.parametrize(
    "name,stem,count",
    [
        ("resnet20", None, 278_324),
        ("resnet32", None, 472_756),
        ("resnet56", None, 861_620),
        ("resnet110", None, 1_736_564),
        ("resnet8x4", None, 1_233_540),
        ("resnet32x4", None, 7_433_860),
        ("wrn_16_2", None, 703_284),
        ("wrn_40_2", None, 2_255_156),
        ("wrn_28_10", None, 36_536_884),
        ("mobilenet_v2", "imagenet", 3_504_872),
        ("shufflenet_v2_x1_0", "imagenet", 2_278_604),
    ],
)
def test_plain_parameter_counts(name, stem, count):
    kw = {"stem": stem, "num_classes": 1000} if stem else {"num_classes": 100}
    with torch.device("meta"):
        m = create_model(name, exits=[], attention=False, **kw)
    assert n_params(m) == count


def test_imagenet_stems_are_torchvision_layouts():
    """The features of mobilenet_v2 with stem=imagenet load torchvision's weights and give its logits."""
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25).eval()
    m = create_model("mobilenet_v2", num_classes=10, stem="imagenet", width_mult=0.25, exits=[]).eval()
    cuts = [0, 4, 7, 14, 19]
    state = {
        f"stages.{s}.{i - a}.{k}": v
        for s, (a, b) in enumerate(zip(cuts, cuts[1:]))
        for i in range(a, b)
        for k, v in ref.features[i].state_dict().items()
    }
    state.update({"classifiers.0.weight": ref.classifier[1].weight, "classifiers.0.bias": ref.classifier[1].bias})
    m.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(m(x)[0][-1], ref(x))


def test_shufflenet_imagenet_stem_is_torchvision_with_a_prunable_shuffle():
    """shufflenet_v2_x1_0 (stem=imagenet) loads torchvision's weights and gives its logits, although its
    channel shuffle is a gather module; pruning then keeps every block's input and output width (the
    shuffle interleaves them) and narrows the stem, the right branches' inner width and conv5."""
    import torchvision

    from sdtool.prune import PruneOptions, prune_model

    torch.manual_seed(0)
    ref = torchvision.models.shufflenet_v2_x1_0(num_classes=10).eval()
    m = create_model("shufflenet_v2_x1_0", num_classes=10, stem="imagenet", exits=[], attention=False).eval()
    places = [
        ("conv1", None),
        *((f"stage2.{i}", f"0.{2 + i}") for i in range(4)),  # 0.1 is the max-pool
        *((f"stage3.{i}", f"{1 + i // 4}.{i % 4}") for i in range(8)),  # stage3 is cut in two
        *((f"stage4.{i}", f"3.{i}") for i in range(4)),
        ("conv5", "3.4"),
    ]
    state = {
        f"stages.{dst or '0.0'}.{k}": v for src, dst in places for k, v in ref.get_submodule(src).state_dict().items()
    }
    state.update({"classifiers.0.weight": ref.fc.weight, "classifiers.0.bias": ref.fc.bias})
    m.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(m(x)[0][-1], ref(x))

    small = tiny("shufflenet_v2_x1_0")
    pruned, _ = prune_model(small, PruneOptions(ratio=0.5), 32)
    before, after = dict(small.named_modules()), dict(pruned.named_modules())
    blocks = [n for n, mod in before.items() if n.endswith(".branch2")]
    for n in blocks:
        assert after[n][-3].out_channels == before[n][-3].out_channels  # block output: kept
        assert after[n][0].out_channels < before[n][0].out_channels  # inner width: pruned
    assert after["stages.3.4.0"].out_channels < before["stages.3.4.0"].out_channels  # conv5
    assert after["stages.0.0.0"].out_channels < before["stages.0.0.0"].out_channels  # the stem


@pytest.mark.parametrize(
    "name,sides",
    [
        ("resnet56", [32, 32, 16, 8]),
        ("wrn_16_2", [32, 32, 16, 8]),
        ("vgg16_bn", [16, 8, 4, 4]),
        ("mobilenet_v2", [32, 16, 8, 4]),
        ("shufflenet_v2_x1_0", [16, 8, 8, 4]),
    ],
)
def test_exit_points_and_stride_one_heads(name, sides):
    """Four exits; where a stage does not downsample, the byot head does not either, so every exit's
    head ends at the resolution of the final stage (as the official heads do for ResNet18)."""
    m = tiny(name).eval()
    assert m.num_exits == 4 and len(m.spec["stages"]) == 4
    h, got = torch.randn(1, 3, 32, 32), []
    for stage in m.stages:
        h = stage(h)
        got.append(h.shape[-1])
    assert got == sides
    h = torch.randn(1, 3, 32, 32)
    for k, stage in enumerate(m.stages[:-1]):
        h = stage(h)
        head_convs = m.heads[k][:-1]  # SepConv blocks before the pooling
        assert head_convs(h).shape[-1] == sides[-1]


def test_cifar_resnet_split_is_stated_in_the_spec():
    assert tiny("resnet56").spec["stages"] == ["stem+layer1[:4]", "layer1[4:]", "layer2", "layer3"]
    assert tiny("resnet8x4").spec["stages"][0] == "stem"  # one block per stage: the stem is exit 1's stage


def test_engine_model_args_skip_keys_a_builder_lacks():
    from sdtool.engine import model_args
    from sdtool.recipe import load_recipe

    r = load_recipe(None, ["model.name=resnet20", "model.width=4"])
    assert model_args(r, 10) == {"num_classes": 10, "width": 4, "head": "byot", "attention": True}
    with pytest.raises(SdtoolError, match="no argument 'stem'"):
        create_model("resnet20", **model_args(load_recipe(None, ["model.name=resnet20", "model.stem=imagenet"]), 10))
    r = load_recipe(None, ["model.name=mobilenet_v2", "model.width_mult=0.5", "sd.mode=plain"])
    assert model_args(r, 10) == {
        "num_classes": 10,
        "stem": "cifar",
        "width_mult": 0.5,
        "head": "byot",
        "attention": False,
        "exits": [],
    }


@pytest.mark.parametrize(
    "name", [n for n in list_models() if n not in ("truncated", "torchvision_wrapped", "timm_wrapped")] + list(VARIANTS)
)
def test_backbones_are_what_wrapping_their_stages_gives(name):
    """A built-in backbone is a preset of the exits-on-any-model mechanism: wrapping its stages (chained
    as one plain nn.Sequential, exits after each but the last) finds the same widths and strides by a
    dry run, so the wrapped network has the same exits, heads and parameter count."""
    import copy

    from torch import nn

    from sdtool.models.wrap import wrap_model

    model = tiny(name)
    n = len(model.stages)
    chain = nn.Sequential(*copy.deepcopy(list(model.stages)))
    wrapped = wrap_model(
        chain, [str(i) for i in range(n - 1)], num_classes=10, input_size=32, exits=[s + 1 for s in model.exit_stages]
    )
    assert wrapped.strides == model.strides
    assert wrapped.feature_dims == model.feature_dims
    assert n_params(wrapped) == n_params(model)


@pytest.mark.parametrize("name", [n for n in list_models() if n != "truncated"])
@pytest.mark.parametrize("head,attention", [("light", True), ("byot", False), ("pool", False)])
def test_backbone_heads_and_attention_switch(name, head, attention):
    """Every backbone takes every head type with attention on or off; without attention the exits hold
    no attention parameters, and forward_until agrees with the full forward."""
    args = {"head": head, "attention": attention, "num_classes": 10}
    params = inspect.signature(_REGISTRY[name]).parameters
    args.update({k: v for k, v in (("width", 4), ("width_mult", 0.25)) if k in params})
    args.update(TINY.get(name, {}))
    model = create_model(name, **args).eval()
    assert model.num_exits == 4
    has_attention = any(p.numel() for a in model.attention for p in a.parameters())
    assert has_attention == attention
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, _ = model(x)
        torch.testing.assert_close(model.forward_until(x, 1), logits[1])
    assert [tuple(z.shape) for z in logits] == [(2, 10)] * 4
