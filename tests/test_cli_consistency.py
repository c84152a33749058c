"""One CLI: the options several commands share have one name, one help text and one default everywhere.

Read from the commands Typer builds (what `--help` renders), so a command that declares a shared option
its own way fails here. Also: the old spellings kept for one release work, warn once and stay out of
`--help`; shell completion is on; each command's `--set` example is one that command accepts.
"""

import re

import pytest
import typer.main
from typer.testing import CliRunner

from sdtool.cli import app
from sdtool.cli_options import DATA_SETS, DEVICES, complete_data, complete_device
from tests.test_cli_backend import patch

runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]
# The commands that build their run from a recipe: --device and --threads set its train.device and
# train.threads (default: the recipe's own), and --set takes any recipe key.
RECIPE_COMMANDS = {"train", "distill", "pipeline"}
# Where each shared option must be present (other commands may take it too, then identically).
PRESENT = {
    "--json": {
        "train",
        "eval",
        "inspect",
        "models",
        "profile",
        "export",
        "predict",
        "prune",
        "pipeline",
        "distill",
        "report",
    },
    "--device": {"train", "eval", "profile", "prune", "pipeline", "distill", "report"},
    "--threads": {"train", "eval", "profile", "export", "predict", "prune", "pipeline", "distill", "report"},
    "--batch-size": {"eval", "profile", "export"},
    "--out": {"train", "eval", "export", "prune", "pipeline", "distill", "report"},
    "--set": {"train", "eval", "profile", "export", "prune", "pipeline", "distill"},
}
# --out is required wherever a command writes, except: eval writes only with --fit-thresholds; train and
# distill --resume RUN_DIR write into RUN_DIR; train, distill and pipeline still fall back to their old
# default folder, with a warning, for one release (tests/test_cli_backend.py).
OUT_OPTIONAL = {"eval", "train", "distill", "pipeline"}
# Options that take free text; every other option is a number, a path, a flag or a fixed choice (Enum).
FREE_TEXT = {"--device", "--data", "--teacher"}


def _options(name: str) -> dict:
    return {o: p for p in COMMANDS[name].params if p.param_type_name == "option" for o in p.opts}


def _shared(option: str) -> dict:
    found = {name: _options(name)[option] for name in COMMANDS if option in _options(name)}
    assert PRESENT[option] <= set(found), f"{option} missing on {PRESENT[option] - set(found)}"
    return found


@pytest.mark.parametrize("option", ["--json", "--device", "--threads", "--batch-size"])
def test_a_shared_option_has_one_help_text(option):
    helps = {name: p.help for name, p in _shared(option).items()}
    usual = max(set(helps.values()), key=list(helps.values()).count)
    assert {n: h for n, h in helps.items() if h != usual} == {}, f"usual {option} help: {usual!r}"


@pytest.mark.parametrize("option", ["--json", "--device", "--threads", "--batch-size"])
def test_a_shared_option_has_one_default(option):
    """One default per kind of command: the recipe commands' --device and --threads default to the recipe."""
    found = _shared(option)
    for group in (RECIPE_COMMANDS, set(found) - RECIPE_COMMANDS - {"profile"}):
        defaults = {n: (p.default, p.show_default) for n, p in found.items() if n in group}
        assert len(set(defaults.values())) <= 1, defaults
    if option == "--device":
        assert {found[n].default for n in set(found) - RECIPE_COMMANDS} == {"auto"}
    if option == "--batch-size":  # profile times batch 1 and this batch on random inputs: no recipe to read
        assert found["profile"].default == 32


def test_out_is_required_where_a_command_writes():
    found = _shared("--out")
    assert {n for n, p in found.items() if not p.required} == OUT_OPTIONAL


@pytest.mark.parametrize("name", sorted(PRESENT["--set"]))
def test_each_set_example_is_accepted_by_its_command(name):
    from sdtool.recipe import apply_overrides, from_dict, load_recipe

    (example,) = re.findall(r"--set (\S+=\S+)", _options(name)["--set"].help)
    if name in RECIPE_COMMANDS | {"profile"}:  # any recipe key (profile: for recipe targets)
        load_recipe("recipes/quickstart.yaml", [example])
    else:  # checkpoint commands: the data section only (sdtool/checkpoint_data.py)
        assert example.startswith("data.")
        from_dict(apply_overrides({"data": {}}, [example]))


def test_free_text_options_are_the_few_that_must_be():
    for name in COMMANDS:
        r = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        free = set(re.findall(r"(--[a-z-]+)\s+<str>", r.output))
        assert free <= FREE_TEXT, (name, free - FREE_TEXT)


@pytest.mark.parametrize(
    "args,old,new",
    [
        (["profile", "m.safetensors", "--batch", "4", "--json"], "--batch", "--batch-size"),
        (
            ["prune", "m.safetensors", "--out", "o.safetensors", "--ratio", "0.3", "--global", "--json"],
            "--global",
            None,
        ),
    ],
)
def test_old_spellings_work_warn_once_and_are_hidden(monkeypatch, args, old, new):
    calls = []
    patch(monkeypatch, "sdtool.profile.profile", lambda *a, **k: calls.append(a) or {})
    patch(monkeypatch, "sdtool.prune.prune_checkpoint", lambda *a, **k: calls.append(a) or {})
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    new = new or "--global-pruning"
    assert r.stderr == f"warning: {old} is deprecated and will be removed in the next release; use {new}\n"
    (call,) = calls
    assert call[1].batch == 4 if args[0] == "profile" else call[2].global_pruning is True
    assert _options(args[0])[old].hidden
    shown = runner.invoke(app, [args[0], "--help"], env={"COLUMNS": "200"}).output
    assert new in shown and not re.search(rf"{old}\b(?!-)", shown)


def test_shell_completion_is_on():
    r = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "--install-completion" in r.output and "--show-completion" in r.output
    r = runner.invoke(app, ["--show-completion", "bash"], prog_name="sdtool")
    assert r.exit_code == 0 and "complete" in r.output, r.output


def test_device_and_data_complete():
    assert complete_device("c") == ["cpu", "cuda"] and complete_device("") == list(DEVICES)
    assert complete_data("cifar") == ["cifar10", "cifar100"]
    assert "recipes/quickstart.yaml" in complete_data("recipes/quick")


def test_the_data_set_list_matches_the_registry():
    from sdtool.data.registry import dataset_names

    assert list(DATA_SETS) == dataset_names()


@pytest.mark.parametrize("cmd", [["eval"], ["profile"], ["prune", "--ratio", "0.3", "--eval"]])
def test_a_missing_gpu_names_the_option_that_fixes_it(monkeypatch, tmp_path, cmd):
    from tests.ckpt_factory import make_ckpt

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    ckpt = make_ckpt(tmp_path / "m.safetensors")
    out = ["--out", str(tmp_path / "o.safetensors")] if cmd[0] == "prune" else []
    r = runner.invoke(app, [cmd[0], str(ckpt), *cmd[1:], *out, "--device", "cuda"])
    assert r.exit_code == 1, r.output
    assert r.output.strip() == (
        "error: device cuda requested but CUDA is not available here; use --device cpu or --device auto"
    )
