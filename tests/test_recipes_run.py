"""Tiny overrides of the shipped recipes, run end to end (the full ones need data or days)."""

from pathlib import Path

import pytest

from sdtool import checkpoint
from sdtool.engine import fit
from sdtool.recipe import load_recipe

pytestmark = pytest.mark.slow  # end-to-end runs of the shipped recipes

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
TINY = [
    "model.width=4",
    "train.epochs=1",
    "train.limit_batches=2",
    "data.batch_size=16",
    "data.val_size=16",
    "data.eval_batch_size=64",
    "data.workers=0",
]
FAKE = ["data.name=fake", "data.fake_size=48", "data.download=false"]


@pytest.mark.parametrize(
    "name",
    [
        "cifar100_resnet18_sd",
        "cifar100_resnet18_ds",
        "cifar100_resnet18_plain",
        "cifar10_resnet18_sd",
        "cifar100_resnet50_sd",
    ],
)
def test_cifar_recipes_on_fake_data(tmp_path, name):
    """The official settings (AutoAugment per image, Cutout, step schedule) run as written, on fake data."""
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml", TINY + FAKE)
    assert r.data.augment.autoaugment and r.data.augment.cutout == 16
    res = fit(r, tmp_path / name, quiet=True)
    model, meta = checkpoint.load(res.best)
    assert meta["mode"] == r.sd.mode and model.num_exits == (1 if r.sd.mode == "plain" else 4)


def test_imagenet_recipe_on_fake_data(tmp_path):
    r = load_recipe(ROOT / "recipes" / "imagenet_resnet18_sd.yaml", TINY + FAKE + ["data.input_size=64"])
    res = fit(r, tmp_path / "in", quiet=True)
    assert checkpoint.read_meta(res.last)["input"]["size"] == 64


@pytest.mark.skipif(not (CIFAR / "test.npz").is_file(), reason="needs ../shared/data/cifar10 beside the repository")
def test_cifar10_npz_recipe_on_real_data(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's data.root is relative to the repository root
    r = load_recipe(ROOT / "recipes" / "cifar10_npz_short.yaml", TINY + ["data.limit_test=200"])
    res = fit(r, tmp_path / "c10", quiet=True)
    assert res.test["n"] == 200 and len(res.test["exits"]) == 4
    assert checkpoint.read_meta(res.best)["class_names"][0] == "airplane"
