"""Recipe schema: defaults, overrides, and error messages that name the key."""

from pathlib import Path

import pytest

from sdtool import SdtoolError
from sdtool.recipe import Recipe, apply_overrides, from_dict, load_recipe, reference_markdown

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))  # recipes/paper/ too
PAPER = sorted((ROOT / "recipes" / "paper").glob("*.yaml"))


def test_defaults_follow_the_official_method():
    r = Recipe()
    assert (r.sd.alpha, r.sd.beta, r.sd.temperature, r.sd.teacher) == (0.3, 0.03, 3.0, "deepest")
    assert (r.train.lr, r.train.momentum, r.train.weight_decay) == (0.1, 0.9, 5e-4)


def test_overrides_parse_yaml_values():
    r = from_dict(
        apply_overrides(
            {},
            [
                "train.epochs=3",
                "train.lr=0.01",
                "sd.hint_exits=[1, 3]",
                "model.attention=false",
                "train.milestones=null",
            ],
        )
    )
    assert r.train.epochs == 3 and r.train.lr == 0.01 and r.sd.hint_exits == [1, 3]
    assert r.model.attention is False and r.train.milestones is None


def test_channels_last_is_auto_or_a_yaml_boolean():
    """auto by default; true/false stay booleans, so old recipes and old runs' recipe.yaml still load."""
    assert Recipe().train.channels_last == "auto"
    for text, value in [("auto", "auto"), ("true", True), ("false", False)]:
        got = load_recipe(None, [f"train.channels_last={text}"]).train.channels_last
        assert got == value and type(got) is type(value)


def test_ints_are_accepted_for_floats():
    assert from_dict({"train": {"lr": 1}}).train.lr == 1.0


@pytest.mark.parametrize(
    "data,match",
    [
        ({"train": {"epoch": 3}}, "unknown key train.epoch; did you mean train.epochs"),
        ({"trian": {}}, "unknown key trian; did you mean train"),
        ({"train": {"epochs": "many"}}, "train.epochs: expected an integer"),
        ({"train": {"epochs": True}}, "train.epochs: expected an integer"),
        ({"sd": {"mode": "distill"}}, "sd.mode: 'distill' is not allowed; use one of 'self_distill'"),
        ({"train": {"optimizer": "adam"}}, "one of 'sgd', 'adamw'"),
        ({"sd": {"alpha": 2}}, r"sd.alpha must be in \[0, 1\]"),
        ({"prune": {"ratio": 1.5}}, r"prune.ratio must be in \(0, 1\)"),
        ({"data": {"val_size": 10.5}}, "whole count"),
        ({"sd": {"hint_exits": [1, "x"]}}, r"sd.hint_exits\[1\]: expected an integer"),
        ({"data": "cifar"}, "data: expected a mapping"),
        ({"train": {"eval_every": 0}}, "train.eval_every must be at least 1"),
        ({"train": {"milestones": [20, 10]}}, "train.milestones must be increasing"),
        ({"data": {"workers": -1}}, "data.workers must be >= 0"),
        ({"eval": {"budget": 0}}, "eval.budget must be a positive fraction"),
        (
            {"train": {"channels_last": "yes"}},
            "train.channels_last: 'yes' is not allowed; use one of 'auto', true, false",
        ),
        ({"train": {"channels_last": 1}}, "train.channels_last: 1 is not allowed"),  # 1 == True, but not a boolean
    ],
)
def test_errors_name_the_key(data, match):
    with pytest.raises(SdtoolError, match=match) as e:
        from_dict(data)
    assert "\n" not in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(SdtoolError, match="expected key=value"):
        apply_overrides({}, ["train.epochs"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(SdtoolError, match="not found"):
        load_recipe(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(SdtoolError, match="not valid YAML"):
        load_recipe(bad)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_every_recipe_validates_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    rel = path.relative_to(ROOT).as_posix()  # recipes/x.yaml or recipes/paper/x.yaml, as the command names it
    assert first.startswith("# sdtool ") and f" {rel} " in first, "a recipe starts with the command that runs it"
    load_recipe(path)


@pytest.mark.parametrize("path", PAPER, ids=[p.name for p in PAPER])
def test_paper_recipes_keep_the_papers_setting(path):
    """docs/reproducing.md: every training image, fp32, no selection (so commands name last.safetensors);
    on CIFAR the authors' AutoAugment policy, Cutout and the official step schedule."""
    r = load_recipe(path)
    assert r.data.val_size == 0 and r.train.amp is False
    assert f"--out runs/paper/{path.stem}" in path.read_text().splitlines()[0]
    if r.data.name.startswith("cifar"):
        a = r.data.augment
        assert (a.autoaugment, a.autoaugment_policy, a.cutout, a.crop_fill) == (True, "official_cifar10", 16, 128)
        assert (r.train.epochs, r.train.schedule, r.train.milestones, r.data.batch_size) == (250, "step", None, 128)


def test_paper_recipes_are_found():
    """An empty glob would skip the test above silently."""
    assert {"cifar100_resnet18_sd.yaml", "cifar100_resnet18_plain.yaml"} <= {p.name for p in PAPER}


def test_reference_docs_are_current():
    """docs/recipes.md embeds the generated reference; regenerate with `python -m sdtool.recipe`."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    assert reference_markdown().strip() in doc


def test_split_layer1_from_a_recipe():
    """`model.split_layer1: true` reaches the builder (5 stages, 5 exits); null leaves the spec as before."""
    from sdtool.engine import model_args
    from sdtool.models import create_model

    r = from_dict({"model": {"name": "resnet18", "width": 4, "split_layer1": True}})
    net = create_model("resnet18", **model_args(r, 10, 32))
    assert len(net.stages) == 5 and net.num_exits == 5 and net.spec["args"]["split_layer1"] is True
    plain = create_model("resnet18", **model_args(from_dict({"model": {"name": "resnet18", "width": 4}}), 10, 32))
    assert len(plain.stages) == 4 and "split_layer1" not in plain.spec["args"]
    with pytest.raises(SdtoolError, match="split_layer1"):
        create_model("resnet20", **model_args(from_dict({"model": {"name": "resnet20", "split_layer1": True}}), 10, 32))
