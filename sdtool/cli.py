"""Command-line interface: each command parses typed options and calls one library function.

No torch code lives here. `SdtoolError` becomes a one-line message and exit status 1 (with the
traceback only under `--debug`).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sdtool import __version__
from sdtool.errors import SdtoolError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False,
                  help="sdtool: self-distillation, real early exit and structured pruning for CNNs.")
_state = {"debug": False}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (progress goes to stderr).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key, e.g. --set train.epochs=3 (repeatable).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdtool {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug


def _user_errors(fn):
    """Turn SdtoolError (and Ctrl-C) into one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SdtoolError as e:
            if _state["debug"]:
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


@app.command(epilog="Example: sdtool train recipes/quickstart.yaml --out runs/quickstart --set train.epochs=5")
@_user_errors
def train(
    recipe: Annotated[Optional[Path], typer.Argument(help="YAML recipe (see recipes/).", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", help="Run folder for checkpoints and metrics.")] = Path("runs/train"),
    set_: SetOpt = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from this checkpoint's structure and weights (e.g. a pruned one).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder exactly where it stopped.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Train a network with self-distillation (or a baseline mode) from a recipe."""
    from sdtool import report
    from sdtool.engine import fit
    from sdtool.recipe import load_recipe

    if resume is None and recipe is None:
        raise SdtoolError("give a RECIPE to train, or --resume RUN_DIR to continue a run")
    r = load_recipe(recipe, set_) if resume is None else None
    result = fit(r, out, init=str(init) if init else None, resume=resume, quiet=json_)
    report.print_json(result.to_json()) if json_ else report.fit_summary(result)


@app.command("eval", epilog="Example: sdtool eval runs/quickstart/best.safetensors --split test")
@_user_errors
def eval_(
    ckpt: Annotated[Path, typer.Argument(help="sdtool checkpoint (.safetensors).")],
    data: Annotated[Optional[str], typer.Option("--data", help="Recipe file whose data section to use, or a data set name (default: the checkpoint's).")] = None,
    set_: SetOpt = None,
    split: Annotated[str, typer.Option("--split", help="test or val.")] = "test",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, mps.")] = "auto",
    json_: JsonOpt = False,
) -> None:
    """Per-exit and ensemble accuracy (top-1/top-5, percent) and loss of a checkpoint."""
    from sdtool import report
    from sdtool.evaluate import eval_checkpoint

    if split not in ("test", "val"):
        raise SdtoolError(f"--split {split!r} is not allowed; use test or val")
    rep = eval_checkpoint(str(ckpt), data, set_, split, device)
    if json_:
        report.print_json(rep)
    else:
        report.out.print(report.accuracy_table(rep, title=f"{ckpt} on {rep['data']} {split} ({rep['n']} images)"))


@app.command(epilog="Example: sdtool inspect runs/quickstart/best.safetensors --json")
@_user_errors
def inspect(
    ckpt: Annotated[Path, typer.Argument(help="sdtool checkpoint (.safetensors).")],
    json_: JsonOpt = False,
) -> None:
    """Model, exits, classes, input, lineage, metrics and file size of a checkpoint."""
    from sdtool import report
    from sdtool.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(str(ckpt))
    if json_:
        report.print_json(info)
    else:
        report.inspect_view(str(ckpt), info["meta"], info["file_size"], info["parameters"])


@app.command(epilog="Example: sdtool models")
@_user_errors
def models(json_: JsonOpt = False) -> None:
    """List the registered backbones."""
    from sdtool import report
    from sdtool.models import list_models

    names = list_models()
    report.print_json(names) if json_ else typer.echo("\n".join(names))


def main() -> None:
    app(prog_name="sdtool")


if __name__ == "__main__":
    sys.exit(main())
