"""Progress bars (sdtool.progress): shown on a terminal's stderr whatever --json says, never on stdout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import sdtool.report
from sdtool import progress
from sdtool.cli import app

CKPT = Path(__file__).resolve().parent / "data" / "ckpt" / "trained.safetensors"


def terminal() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=100), buf


def test_bar_draws_on_a_terminal_and_disappears():
    con, buf = terminal()
    with progress.progress("scoring things", 4, console=con) as bar:
        assert bar.shown
        for _ in range(4):
            bar.advance()
        with progress.progress("inner step", 2, console=con) as inner:  # nested: a second line
            assert inner.shown
            inner.advance(2)
    text = buf.getvalue()
    assert "scoring things" in text and "inner step" in text
    assert progress._live is None  # the display is closed again


@pytest.mark.parametrize("how", ["enabled=False", "not a terminal", "set_enabled(False)"])
def test_bar_is_a_no_op_when_off(how, monkeypatch):
    con, buf = terminal()
    kwargs: dict = {"console": con}
    if how == "enabled=False":
        kwargs["enabled"] = False
    elif how == "not a terminal":
        kwargs["console"] = Console(file=buf, force_terminal=False)
    else:
        monkeypatch.setattr(progress, "_enabled", True)
        progress.set_enabled(False)
    with progress.progress("hidden", 3, **kwargs) as bar:
        assert not bar.shown
        bar.advance()
        bar.update(completed=2, total=3)
    assert buf.getvalue() == ""


def test_epoch_bar_hidden_only_when_asked():
    """Training's bar: `quiet` means "another process of a distributed run draws it", not --json."""
    with progress.epoch_progress(0, 2, 5, quiet=True) as bar:
        assert not bar.shown
        bar.update(1, loss=0.5, acc=10.0, ips=100.0)


def test_json_stdout_stays_pure_json_while_bars_show(monkeypatch):
    """`profile --json` with a terminal on stderr: the bars are drawn there and stdout holds only the JSON."""
    con, buf = terminal()
    monkeypatch.setattr(sdtool.report, "err", con)
    res = CliRunner().invoke(
        app, ["profile", str(CKPT), "--json", "--batch-size", "2", "--repeats", "2", "--warmup", "1", "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)  # nothing but the JSON document
    assert rep["latency"]["repeats"] == 2
    assert "timing exits (torch), batch 1+2" in buf.getvalue()


def test_library_call_without_progress(monkeypatch):
    from sdtool.profile import ProfileOptions, profile

    con, buf = terminal()
    monkeypatch.setattr(sdtool.report, "err", con)
    profile(str(CKPT), ProfileOptions(batch=2, repeats=1, warmup=0, progress=False))
    assert buf.getvalue() == ""
