"""`sdtool eval` and `sdtool export`: the two commands that take the early-exit option sets.

Plain functions with Typer-annotated options, so their long option lists live apart from the other
commands; sdtool.cli registers them (with its error handling) in the order `--help` lists them. As in
sdtool.cli, no torch code lives here: each command calls one library function.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sdtool.cli_options import (
    AllowOtherDataOpt,
    BatchSizeOpt,
    BudgetOpt,
    Cost,
    CostOpt,
    DataOpt,
    DataSetOpt,
    DeviceOpt,
    Engine,
    EngineOpt,
    FallbackOpt,
    FitOpt,
    Format,
    JsonOpt,
    MaxDropOpt,
    PolicyOpt,
    Split,
    SweepOpt,
    ThreadsOpt,
    fit_options,
)
from sdtool.errors import SdtoolError

if TYPE_CHECKING:
    from sdtool.deploy import BundleOptions
    from sdtool.exit_eval import RunOptions
    from sdtool.exit_fit import FitOptions

EVAL_EPILOG = (
    "Example: sdtool eval runs/quickstart/best.safetensors --split test; "
    "sdtool eval runs/sd/best.safetensors --early-exit --fit-thresholds --max-drop 0.5 --out runs/sd/ee.safetensors"
)


def eval_(
    ckpt: Annotated[Path, typer.Argument(help="sdtool checkpoint (.safetensors).")],
    data: DataOpt = None,
    set_: DataSetOpt = None,
    split: Annotated[Split, typer.Option("--split", help="The split to report on.")] = Split.test,
    device: DeviceOpt = "auto",
    early_exit: Annotated[
        bool, typer.Option("--early-exit", help="Real early exit with fitted thresholds (docs/early-exit.md).")
    ] = False,
    fit_thresholds: FitOpt = False,
    max_drop: MaxDropOpt = None,
    budget: BudgetOpt = None,
    policy: PolicyOpt = None,
    fallback: FallbackOpt = None,
    cost: CostOpt = Cost.macs,
    sweep_out: SweepOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Fit: write a new checkpoint with the thresholds (nothing is written without it)."),
    ] = None,
    batch_size: BatchSizeOpt = None,
    latency_images: Annotated[
        int,
        typer.Option(
            "--latency-images", help="Early exit: images timed one by one for the batch-1 speed-up (0 = skip)."
        ),
    ] = 128,
    engine: EngineOpt = Engine.torch,
    threads: ThreadsOpt = None,
    allow_other_data: AllowOtherDataOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Per-exit and ensemble accuracy (top-1/top-5, percent) and loss of a checkpoint; or real early exit."""
    fit = fit_options(fit_thresholds, max_drop, budget, policy, fallback, cost, sweep_out)
    if early_exit:
        from sdtool.exit_eval import RunOptions

        run = RunOptions(
            data,
            set_,
            split.value,
            device,
            batch_size,
            latency_images,
            engine=engine.value,
            threads=threads,
            allow_other_data=allow_other_data,
        )
        _eval_early_exit(ckpt, run, fit, out, json_)
        return
    if fit.given() or out or engine != Engine.torch:
        raise SdtoolError(
            "--fit-thresholds, --max-drop, --budget, --policy, --fallback, --cost, --sweep-out, --out "
            "and --engine belong to early exit; add --early-exit"
        )
    from sdtool.device import set_threads
    from sdtool.evaluate import eval_checkpoint

    set_threads(threads)
    rep = eval_checkpoint(
        str(ckpt), data, set_, split.value, device, batch_size=batch_size, allow_other_data=allow_other_data
    )
    _print_accuracy(rep, f"{ckpt} on {rep['data']} {split.value} ({rep['n']} images)", json_)


def _eval_early_exit(ckpt: Path, run: RunOptions, fit: FitOptions, out: Path | None, json_: bool) -> None:
    from sdtool import report, report_exit
    from sdtool.exit_eval import eval_early_exit

    rep = eval_early_exit(str(ckpt), run, fit, out=str(out) if out else None, quiet=json_)
    report.print_json(rep) if json_ else report_exit.early_exit_view(rep)


def _print_accuracy(rep: dict, title: str, json_: bool) -> None:
    from sdtool import report

    if json_:
        report.print_json(rep)
    else:
        report.out.print(report.accuracy_table(rep, title=title))


EXPORT_EPILOG = (
    "Example: sdtool export runs/sd/best.safetensors --exit 2 --format onnx --out exit2.onnx; "
    "sdtool export runs/sd/ee.safetensors --early-exit --out runs/sd/bundle"
)


def export(
    ckpt: Annotated[Path, typer.Argument(help="sdtool checkpoint (.safetensors).")],
    out: Annotated[Path, typer.Option("--out", help="Output file (a new folder with --early-exit).")],
    format_: Annotated[
        Format, typer.Option("--format", help="safetensors (an sdtool checkpoint), pt2 (torch.export) or onnx.")
    ] = Format.safetensors,
    exit_: Annotated[
        int | None, typer.Option("--exit", help="Keep only what exit K (1-based) needs: a compact standalone model.")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Run the written file and compare it with PyTorch.")
    ] = True,
    early_exit: Annotated[
        bool, typer.Option("--early-exit", help="Write a deployable early-exit bundle (ONNX Runtime; docs/deploy.md).")
    ] = False,
    fit_thresholds: FitOpt = False,
    max_drop: MaxDropOpt = None,
    budget: BudgetOpt = None,
    policy: PolicyOpt = None,
    fallback: FallbackOpt = None,
    cost: CostOpt = Cost.macs,
    sweep_out: SweepOpt = None,
    data: DataOpt = None,
    set_: DataSetOpt = None,
    batch_size: BatchSizeOpt = None,
    latency_batch: Annotated[
        int,
        typer.Option(
            "--latency-batch", help="Bundle: batch size at which each step's latency is recorded (besides batch 1)."
        ),
    ] = 64,
    threads: ThreadsOpt = None,
    allow_other_data: AllowOtherDataOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Export the multi-exit net, one exit as a compact standalone model, or an early-exit bundle.

    With --early-exit, --data, --set, --batch-size and --allow-other-data choose the threshold fit's data.
    """
    from sdtool import report

    fit_opts = fit_options(fit_thresholds, max_drop, budget, policy, fallback, cost, sweep_out)
    if early_exit:
        from sdtool.deploy import BundleOptions

        if format_ not in (Format.onnx, Format.safetensors):
            raise SdtoolError("--early-exit writes an ONNX bundle; drop --format or use --format onnx")
        if exit_ is not None:
            raise SdtoolError("--early-exit exports every exit; export one exit with --exit K alone, then bundle that")
        if not check:
            raise SdtoolError("a bundle is always checked against PyTorch before it is written; drop --no-check")
        run = BundleOptions(data, set_, batch_size, threads, latency_batch, allow_other_data=allow_other_data)
        _export_bundle(ckpt, out, fit_opts, run, json_)
        return
    if fit_opts.given() or data or set_ or batch_size or threads or latency_batch != 64 or allow_other_data:
        raise SdtoolError(
            "threshold fitting, --data, --set, --batch-size, --allow-other-data, --threads and --latency-batch "
            "belong to --early-exit"
        )
    from sdtool.export import export as run_export

    rep = run_export(str(ckpt), str(out), format_.value, exit_, check)
    report.print_json(rep) if json_ else report.export_view(rep)


def _export_bundle(ckpt: Path, out: Path, fit: FitOptions, run: BundleOptions, json_: bool) -> None:
    from sdtool import report
    from sdtool.deploy import export_bundle

    if not fit.fit and (run.data or run.overrides or run.batch_size or run.allow_other_data):
        raise SdtoolError(
            "--data, --set, --batch-size and --allow-other-data belong to threshold fitting; add --fit-thresholds"
        )
    rep = export_bundle(str(ckpt), str(out), fit, run, quiet=json_)
    report.print_json(rep) if json_ else report.bundle_view(rep)
