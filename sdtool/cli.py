"""Command-line interface: each command parses typed options and calls one library function.

No torch code lives here. `SdtoolError` becomes a one-line message and exit status 1 (with the
traceback only under `--debug`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from sdtool import __version__
from sdtool.cli_eval import EVAL_EPILOG, EXPORT_EPILOG, eval_, export
from sdtool.cli_options import (
    DeviceOpt,
    Engine,
    EngineOpt,
    JsonOpt,
    ProfileBatchSizeOpt,
    ProfileSetOpt,
    RecipeDeviceOpt,
    RecipeThreadsOpt,
    SetOpt,
    ThreadsOpt,
    default_out,
    deprecated,
)
from sdtool.cli_prune import PRUNE_EPILOG, prune
from sdtool.cli_report import REPORT_EPILOG, report_
from sdtool.errors import SdtoolError

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    help="sdtool: self-distillation, real early exit and structured pruning for CNNs.",
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdtool {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug


def _user_errors(fn):
    """Turn SdtoolError into one line on stderr and exit status 1, Ctrl-C into one line and status 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SdtoolError as e:
            if _state["debug"]:
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:
            from sdtool.runlock import RESUME_HINT

            # A run with a resume state loses at most the epoch in progress: say how to continue it.
            resume = getattr(e, RESUME_HINT, None)
            typer.echo(f"interrupted; continue with: {resume}" if resume else "interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


# --out: every command that writes takes the place to write as --out, and requires it; the exceptions are
# `eval` (it writes only with --fit-thresholds) and `train`/`distill --resume RUN_DIR`, which write into
# RUN_DIR. train, distill and pipeline without --out still write to their old default folder, with a
# warning, for one release.
OutRunOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", help="Run folder for checkpoints and metrics (required; not with --resume).", show_default=False
    ),
]


def _recipe_overrides(set_: list[str] | None, device: str | None, threads: int | None) -> list[str] | None:
    """--set plus --device and --threads as the recipe keys they stand for (so the run records them)."""
    extra = ([f"train.device={device}"] if device is not None else []) + (
        [f"train.threads={threads}"] if threads is not None else []
    )
    return [*(set_ or []), *extra] or None


def _resume_out(resume: Path, out: Path | None) -> None:
    if out is not None and out.resolve() != resume.resolve():
        raise SdtoolError(f"--resume writes into {resume}; drop --out (or give --out {resume})")


@app.command(epilog="Example: sdtool train recipes/quickstart.yaml --out runs/quickstart --set train.epochs=5")
@_user_errors
def train(
    recipe: Annotated[Path | None, typer.Argument(help="YAML recipe (see recipes/).", show_default=False)] = None,
    out: OutRunOpt = None,
    set_: SetOpt = None,
    init: Annotated[
        Path | None,
        typer.Option("--init", help="Start from this checkpoint's structure and weights (e.g. a pruned one)."),
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in this folder exactly where it stopped.")
    ] = None,
    device: RecipeDeviceOpt = None,
    threads: RecipeThreadsOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Train a network with self-distillation (or a baseline mode) from a recipe."""
    from sdtool import report
    from sdtool.engine import fit
    from sdtool.recipe import load_recipe

    if resume is None and recipe is None:
        raise SdtoolError("give a RECIPE to train, or --resume RUN_DIR to continue a run")
    if resume is not None and (recipe or set_ or init or device or threads):
        raise SdtoolError(
            "--resume continues a run exactly as it was set up; drop RECIPE, --set, --init, --device and "
            "--threads (to change the run, start a new one with --init RUN_DIR/last.safetensors)"
        )
    if resume is not None:
        _resume_out(resume, out)
        result = fit(None, None, init=None, resume=resume, quiet=json_)
    else:
        r = load_recipe(recipe, _recipe_overrides(set_, device, threads))
        result = fit(r, default_out(out, "runs/train"), init=str(init) if init else None, resume=None, quiet=json_)
    if result.is_main:
        report.print_json(result.to_json()) if json_ else report.fit_summary(result)


# `eval` and `export` are defined in sdtool.cli_eval (their option lists are long); registered here, in
# the order `--help` lists the commands.
app.command("eval", epilog=EVAL_EPILOG)(_user_errors(eval_))


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
        from sdtool.meta import CheckpointMeta

        meta = CheckpointMeta.from_json(info["meta"], str(ckpt))
        report.inspect_view(str(ckpt), meta, info["file_size"], info["parameters"])


@app.command(epilog="Example: sdtool models")
@_user_errors
def models(json_: JsonOpt = False) -> None:
    """List the models a recipe can name: built-in, torchvision:ARCH and installed plugins (sdtool.models)."""
    from sdtool import report
    from sdtool.models import model_entries, plugin_errors

    entries = model_entries()
    # A broken plugin is reported, one line each, and the listing goes on: it must not hide the others.
    for line in plugin_errors():
        typer.echo(f"warning: {line}", err=True)
    if json_:
        report.print_json(entries)
        return
    wide = [max(len(e[k]) for e in entries) for k in ("name", "source")]
    for e in entries:
        typer.echo(f"{e['name']:<{wide[0]}}  {e['source']:<{wide[1]}}  {e['description']}".rstrip())


@app.command(
    epilog=(
        "Example: sdtool profile runs/quickstart/best.safetensors --batch-size 64; sdtool "
        "profile recipes/quickstart.yaml --no-latency"
    )
)
@_user_errors
def profile(
    target: Annotated[Path, typer.Argument(help="sdtool checkpoint (.safetensors) or recipe (.yaml).")],
    input_size: Annotated[
        tuple[int, int] | None,
        typer.Option("--input-size", help="Input height and width (default: the checkpoint's or data set's)."),
    ] = None,
    batch_size: ProfileBatchSizeOpt = 32,
    device: DeviceOpt = "auto",
    latency: Annotated[
        bool, typer.Option("--latency/--no-latency", help="Measure latency (MACs and parameters are always counted).")
    ] = True,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs before timing.")] = 3,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs; the median, min and max are reported.")] = 10,
    threads: ThreadsOpt = None,
    engine: EngineOpt = Engine.torch,
    set_: ProfileSetOpt = None,
    json_: JsonOpt = False,
    batch: Annotated[int | None, typer.Option("--batch", hidden=True)] = None,  # the old --batch-size
) -> None:
    """Parameters, MACs and measured latency per exit, of the ensemble and of the whole multi-exit net.

    Latency is measured at batch 1 and at --batch-size, on --device.
    """
    from sdtool import report
    from sdtool.profile import ProfileOptions
    from sdtool.profile import profile as run_profile

    if batch is not None:
        deprecated("--batch", "--batch-size")
        batch_size = batch
    opts = ProfileOptions(
        input_size=input_size,
        batch=batch_size,
        device=device,
        latency=latency,
        warmup=warmup,
        repeats=repeats,
        threads=threads,
        overrides=set_,
        engine=engine.value,
    )
    rep = run_profile(str(target), opts)
    report.print_json(rep) if json_ else report.profile_view(rep)


app.command(epilog=EXPORT_EPILOG)(_user_errors(export))


@app.command(
    epilog=(
        "Example: sdtool predict runs/sd/bundle cat.png dog.jpg; sdtool predict "
        "runs/sd/best.safetensors images.npz --json"
    )
)
@_user_errors
def predict(
    target: Annotated[Path, typer.Argument(help="Early-exit bundle folder, or an sdtool checkpoint (.safetensors).")],
    images: Annotated[
        list[Path], typer.Argument(help="Image files (PNG, JPEG, ...) or npz files with x uint8 (N, H, W, C).")
    ],
    resize: Annotated[
        bool,
        typer.Option(
            "--resize", help="Resize images of another size (shorter side, centre crop) instead of refusing them."
        ),
    ] = False,
    top: Annotated[int, typer.Option("--top", help="Report the K most likely classes.")] = 1,
    threads: ThreadsOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Classify images: class, confidence and the exit that answered (early exit when thresholds are known)."""
    from sdtool import report
    from sdtool.deploy import predict as run_predict

    rep = run_predict(str(target), [str(i) for i in images], threads, resize, top)
    report.print_json(rep) if json_ else report.predict_view(rep)


# `prune` is defined in sdtool.cli_prune (its options come from sdtool.prune_options).
app.command(epilog=PRUNE_EPILOG)(_user_errors(prune))
# `report` is defined in sdtool.cli_report.
app.command("report", epilog=REPORT_EPILOG)(_user_errors(report_))


@app.command(epilog="Example: sdtool pipeline recipes/pipeline_quickstart.yaml --out runs/pipeline")
@_user_errors
def pipeline(
    recipe: Annotated[
        Path, typer.Argument(help="YAML recipe with a prune section (see recipes/pipeline_quickstart.yaml).")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for the train, pruned and fine-tune steps (required).", show_default=False),
    ] = None,
    set_: SetOpt = None,
    device: RecipeDeviceOpt = None,
    threads: RecipeThreadsOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Train, prune, fine-tune and (with eval.early_exit) fit early-exit thresholds, from one recipe."""
    from sdtool import report
    from sdtool.pipeline import run_pipeline
    from sdtool.recipe import load_recipe

    r = load_recipe(recipe, _recipe_overrides(set_, device, threads))
    rep = run_pipeline(r, default_out(out, "runs/pipeline"), recipe_path=str(recipe), quiet=json_)
    report.print_json(rep) if json_ else report.pipeline_view(rep)


@app.command(
    epilog="Example: sdtool distill recipes/cifar100_resnet32x4_to_resnet8x4_sd_kd.yaml "
    "--teacher runs/resnet32x4/best.safetensors --out runs/kd"
)
@_user_errors
def distill(
    recipe: Annotated[
        Path | None,
        typer.Argument(help="YAML recipe of the student (its sd.mode and distill section apply).", show_default=False),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher", help="sdtool checkpoint, or torchvision:NAME (default: the recipe's distill.teacher)."
        ),
    ] = None,
    teacher_weights: Annotated[
        Path | None,
        typer.Option(
            "--teacher-weights",
            help="torchvision teacher: local .safetensors or .pth state dict (nothing is downloaded).",
        ),
    ] = None,
    out: OutRunOpt = None,
    set_: SetOpt = None,
    init: Annotated[
        Path | None, typer.Option("--init", help="Start the student from this checkpoint's structure and weights.")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue the distillation run in this folder exactly where it stopped."),
    ] = None,
    device: RecipeDeviceOpt = None,
    threads: RecipeThreadsOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Train a student with its recipe's loss plus knowledge distillation from a frozen external teacher."""
    from sdtool import report
    from sdtool.distill import distill as run_distill
    from sdtool.recipe import load_recipe

    if resume is None and recipe is None:
        raise SdtoolError("give a RECIPE to distill, or --resume RUN_DIR to continue a run")
    if resume is not None and (recipe or set_ or init or teacher or teacher_weights or device or threads):
        raise SdtoolError(
            "--resume continues a run exactly as it was set up (its recipe names the teacher); "
            "drop RECIPE, --set, --init, --teacher, --teacher-weights, --device and --threads"
        )
    if resume is not None:
        _resume_out(resume, out)
    result = run_distill(
        load_recipe(recipe, _recipe_overrides(set_, device, threads)) if resume is None else None,
        default_out(out, "runs/distill") if resume is None else resume,  # with resume, out is the run folder
        teacher=teacher,
        teacher_weights=str(teacher_weights) if teacher_weights else None,
        init=str(init) if init else None,
        quiet=json_,
        resume=resume,
    )
    if result.is_main:
        report.print_json(result.to_json()) if json_ else report.fit_summary(result)


def main() -> None:
    # First, before any command imports torch: OpenMP reads its wait policy once, when torch loads it.
    from sdtool import cpu

    cpu.configure()
    app(prog_name="sdtool")


if __name__ == "__main__":
    main()
