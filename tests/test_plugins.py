"""Models from installed packages (entry-point group `sdtool.models`) through the real command line, and
model errors that name the user's recipe key rather than an internal builder.

The example package in tests/plugins/sdtool_example_model is made visible without pip: a `*.dist-info`
folder with METADATA and entry_points.txt on PYTHONPATH is what an installed package leaves, and is all
`importlib.metadata` reads.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sdtool.cli import app
from sdtool.errors import SdtoolError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
EXAMPLE = ROOT / "tests" / "plugins" / "sdtool_example_model"
TINY = [
    *("--set", "model.name=example_tiny_cnn", "--set", "model.width=null", "--set", "data.name=fake"),
    *("--set", "data.fake_size=32", "--set", "data.batch_size=16", "--set", "data.val_size=16"),
    *("--set", "data.input_size=16", "--set", "train.epochs=1"),
]


def _dist_info(site: Path, name: str, entry_points: dict[str, str]) -> None:
    d = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (d / "entry_points.txt").write_text(f"[sdtool.models]\n{lines}")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example package, as pip would install it (its entry points read from its own pyproject.toml),
    and a broken one: an entry point at a missing module and one whose module raises on import."""
    site = tmp_path_factory.mktemp("site")
    # pyproject.toml read by pattern: tomllib is Python 3.11+, and these two keys are plain lines.
    text = (EXAMPLE / "pyproject.toml").read_text()
    name = re.search(r'^name = "(.+)"$', text, re.M).group(1)
    section = text.split('[project.entry-points."sdtool.models"]\n', 1)[1].split("\n[", 1)[0]
    _dist_info(site, name, dict(re.findall(r'^(\w+) = "(.+)"$', section, re.M)))
    (site / "sdtool_raises_on_import.py").write_text("raise RuntimeError('this plugin is broken\\non purpose')\n")
    _dist_info(
        site,
        "sdtool-broken-plugin",
        {"broken_missing": "no_such_module_for_sdtool:build", "broken_raises": "sdtool_raises_on_import:build"},
    )
    return site


@pytest.fixture
def plugins_here(site, monkeypatch):
    """The plugins visible to this process, loaded afresh; the registry is restored afterwards."""
    from sdtool.models import registry

    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_plugins", {"loaded": False, "errors": []})
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_PLUGIN_OF", {})


def sdtool(*args: str, site: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(EXAMPLE), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "sdtool", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_models_lists_the_plugin_and_reports_broken_ones_in_one_line_each(site):
    r = sdtool("models", site=site)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert "plugin sdtool-example-model" in rows["example_tiny_cnn"]
    assert "Example plugin: a 3-block CNN" in rows["example_tiny_cnn"]
    assert "resnet18" in rows and "torchvision:ARCH" in rows
    assert not {"torchvision_wrapped", "truncated", "timm_wrapped"} & set(rows)  # internal builders
    warnings = r.stderr.splitlines()
    assert len(warnings) == 2 and "Traceback" not in r.stderr, r.stderr
    assert all(w.startswith("warning: plugin sdtool-broken-plugin (entry point broken_") for w in warnings)
    assert "no_such_module_for_sdtool" in warnings[0] and "this plugin is broken" in warnings[1]


def test_models_json_describes_each_entry(plugins_here):
    r = runner.invoke(app, ["models", "--json"])
    assert r.exit_code == 0 and r.stderr.count("warning: plugin sdtool-broken-plugin") == 2
    entries = {e["name"]: e for e in json.loads(r.stdout)}
    assert entries["example_tiny_cnn"]["source"] == "plugin sdtool-example-model"
    assert entries["resnet18"]["source"] == "built-in" and entries["torchvision:ARCH"]["source"] == "torchvision"
    assert entries["example_tiny_cnn"]["description"].startswith("Example plugin: a 3-block CNN")
    assert not {"torchvision_wrapped", "truncated", "timm_wrapped"} & set(entries)


def test_plugin_model_trains_and_its_checkpoint_evaluates(site, tmp_path):
    """One epoch of two steps on fake data through `sdtool train`, with the broken plugin installed too."""
    r = sdtool("train", "recipes/quickstart.yaml", "--out", str(tmp_path / "run"), "--json", *TINY, site=site)
    assert r.returncode == 0, r.stderr
    best = json.loads(r.stdout)["best"]
    r = sdtool("eval", best, "--json", site=site)  # the checkpoint names its builder: looked up by name
    assert r.returncode == 0, r.stderr
    assert [e["exit"] for e in json.loads(r.stdout)["exits"]] == [1, 2, 3]


def test_a_broken_plugin_fails_only_its_own_model(plugins_here):
    from sdtool.models import create_model

    with pytest.raises(SdtoolError) as e:
        create_model("broken_raises")
    msg = str(e.value)
    assert msg.startswith("model 'broken_raises' cannot be built: plugin sdtool-broken-plugin") and "\n" not in msg
    assert "RuntimeError: this plugin is broken" in msg and "fix or uninstall sdtool-broken-plugin" in msg
    assert create_model("example_tiny_cnn", num_classes=3, width=2, input_size=16).num_exits == 3


def test_a_checkpoint_of_a_model_whose_plugin_is_missing_is_refused_in_one_line(tmp_path, monkeypatch):
    from sdtool import checkpoint
    from sdtool.models import create_model, register_model
    from sdtool.models.registry import _REGISTRY

    monkeypatch.syspath_prepend(str(EXAMPLE))
    from sdtool_example_model import example_tiny_cnn

    # Registered in this process only: the subprocess has no package that provides it.
    register_model(example_tiny_cnn, name="uninstalled_plugin_net")
    try:
        torch.manual_seed(0)
        model = create_model("uninstalled_plugin_net", num_classes=3, width=2, input_size=16)
        checkpoint.save(tmp_path / "m.safetensors", model, {"num_classes": 3})
    finally:
        del _REGISTRY["uninstalled_plugin_net"]
    r = runner.invoke(app, ["eval", str(tmp_path / "m.safetensors")])
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    msg = r.stderr
    assert "unknown model 'uninstalled_plugin_net'" in msg
    assert "needs that package installed (`sdtool models` lists the installed ones)" in msg


def test_internal_builders_are_hidden():
    from sdtool.models import create_model, model_entries, public_models

    names = public_models()
    assert "resnet18" in names and "torchvision_wrapped" not in names and "truncated" not in names
    assert "torchvision:ARCH" in {e["name"] for e in model_entries()}
    with pytest.raises(SdtoolError, match="did you mean resnet18") as e:
        create_model("resnet81")
    assert "torchvision_wrapped" not in str(e.value) and "truncated" not in str(e.value)


def test_a_recipe_key_a_model_does_not_take_is_named_with_the_fix(tmp_path):
    args = ["train", "recipes/quickstart.yaml", "--set", "model.name=torchvision:resnet50", "--out", str(tmp_path)]
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and r.stderr.strip() == (
        "error: model.width does not apply to torchvision:resnet50 (its width is fixed by the architecture); "
        "remove model.width from the recipe or set it to null"
    )


def test_recipe_key_errors_in_process():
    from sdtool.models.from_recipe import model_args
    from sdtool.recipe import load_recipe

    r = load_recipe(None, ["model.name=mobilenet_v2", "model.width=8"])
    with pytest.raises(SdtoolError, match=r"^model.width does not apply to mobilenet_v2 \(it takes model.width_mult"):
        model_args(r, 10, 32)
    r = load_recipe(None, ["model.name=torchvision:resnet18", "model.stem=imagenet"])
    with pytest.raises(
        SdtoolError,
        match=r"^model.stem does not apply to torchvision:resnet18 \(it has no argument 'stem'; its settings are "
        r"model.head, .*\); remove model.stem from the recipe or set it to cifar$",
    ):
        model_args(r, 10, 32)
