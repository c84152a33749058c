"""`sdtool profile`: parameter and MAC counts per exit (parity with the paper's network), latency."""

import json

import pytest
import yaml
from ckpt_factory import make_ckpt
from typer.testing import CliRunner

from sdtool.cli import app
from sdtool.models import create_model
from sdtool.models.truncate import truncate
from sdtool.profile import exit_costs

runner = CliRunner()


def test_parity_resnet18_cifar100_byot_attention():
    """DESIGN.md's figures for the official CIFAR-100 ResNet18 at 32x32 (fvcore, within about 1 %)."""
    model = create_model("resnet18", num_classes=100, stem="cifar", head="byot", attention=True)
    c = exit_costs(model, (32, 32))
    assert c["parameters"] == 12_283_344
    assert c["full"]["macs"] == pytest.approx(0.584e9, rel=0.01)
    assert [e["macs"] / 1e6 for e in c["exits"]] == pytest.approx([166.4, 297.0, 427.9, 556.7], rel=0.01)
    assert [e["params"] / 1e6 for e in c["exits"]] == pytest.approx([0.480, 1.018, 3.166, 11.220], rel=0.01)
    # The reference is the deepest exit alone; the whole net (= the ensemble) costs every exit.
    assert c["reference"]["macs"] == c["exits"][-1]["macs"]
    assert c["ensemble"]["macs"] == c["full"]["macs"] == c["exits"][-1]["cumulative_macs"]
    assert c["exits"][-1]["cumulative_params"] == c["parameters"]
    # Cumulative cost = the stages up to the exit + every head up to and including it.
    heads = 0
    for e in c["exits"]:
        heads += e["head_macs"]
        assert e["cumulative_macs"] == e["stages_macs"] + heads
        assert e["share_of_reference"] == pytest.approx(e["macs"] / c["reference"]["macs"])


def test_exit_alone_costs_equal_the_truncated_model():
    """ "Alone" is exactly what a standalone export of that exit costs."""
    model = create_model("resnet18", num_classes=10, width=4).eval()
    c = exit_costs(model, (16, 16))
    for k, e in enumerate(c["exits"]):
        t = exit_costs(truncate(model, k), (16, 16))
        assert t["full"]["macs"] == e["macs"] and t["parameters"] == e["params"]


def test_cli_profile_checkpoint_with_latency(tmp_path):
    ckpt = make_ckpt(tmp_path / "m.safetensors")
    r = runner.invoke(
        app, ["profile", str(ckpt), "--batch", "4", "--warmup", "1", "--repeats", "2", "--threads", "1", "--json"]
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["kind"] == "checkpoint" and rep["input_size"] == [16, 16] and rep["num_classes"] == 10
    lat = rep["latency"]
    assert lat["threads"] == 1 and lat["batch_sizes"] == [1, 4] and lat["statistic"] == "median"
    assert lat["device"] == "cpu" and lat["exits"][0]["peak_memory_bytes"] is None  # not measured on CPU
    assert [r["name"] for r in lat["exits"]] == ["exit 1", "exit 2", "exit 3", "exit 4"]
    assert all(v > 0 for r in lat["exits"] + [lat["full"]] for v in r["latency_ms"].values())
    for row in lat["exits"] + [lat["full"]]:  # the spread over the repeats: fastest <= median <= slowest
        for b in ("1", "4"):
            assert 0 < row["latency_ms_min"][b] <= row["latency_ms"][b] <= row["latency_ms_max"][b]
    r = runner.invoke(app, ["profile", str(ckpt), "--no-latency"])  # the table
    assert r.exit_code == 0 and "reference cost" in r.output


def test_cli_profile_recipe_takes_the_data_sets_classes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": "resnet18", "width": 4}, "data": {"name": "cifar100"}}))
    r = runner.invoke(app, ["profile", str(recipe), "--no-latency", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["kind"] == "recipe" and rep["num_classes"] == 100 and "cifar100" in rep["num_classes_from"]
    assert rep["latency"] is None
    small = json.loads(
        runner.invoke(app, ["profile", str(recipe), "--no-latency", "--json", "--input-size", "16", "16"]).stdout
    )
    # Convolutions scale with the pixel count; the classifiers do not, hence "about a quarter".
    assert small["full"]["macs"] == pytest.approx(rep["full"]["macs"] / 4, rel=0.05)
    plain = json.loads(
        runner.invoke(app, ["profile", str(recipe), "--no-latency", "--json", "--set", "sd.mode=plain"]).stdout
    )
    assert len(plain["exits"]) == 1 and plain["ensemble"] is None


def test_cli_profile_recipe_sizes_the_model_as_training_does(tmp_path):
    """The input side comes from the data as a run would see it (an npz file of 20x20 images), and a
    wrapped model's exits are placed by a dry run at that side."""
    import numpy as np

    x = np.random.default_rng(0).integers(0, 255, (12, 20, 20, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(12) % 3)
    np.savez(tmp_path / "test.npz", x=x[:6], y=np.arange(6) % 3)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "torchvision:resnet18", "exits_after": ["layer2", "layer3"]},
                "data": {"name": "npz", "root": str(tmp_path), "val_size": 0},
            }
        )
    )
    r = runner.invoke(app, ["profile", str(recipe), "--no-latency", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["input_size"] == [20, 20] and rep["num_classes"] == 3
    assert rep["model"]["args"]["input_size"] == 20


def test_cli_profile_bad_target_is_one_line(tmp_path):
    r = runner.invoke(app, ["profile", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("error:")
