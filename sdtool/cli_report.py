"""`sdtool report`: a compression report of a checkpoint's chain (Markdown, self-contained HTML, PNG plots).

A plain function with Typer-annotated options, registered by sdtool.cli with its error handling, and the
one decision that belongs to the command line: which checkpoint a RUN_OR_CKPT argument names. As in
sdtool.cli, no torch code lives here: the command calls sdtool.chain_report (collecting) and
sdtool.chain_render (writing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sdtool.cli_options import AllowOtherDataOpt, DataOpt, DeviceOpt, JsonOpt, ThreadsOpt
from sdtool.errors import SdtoolError

REPORT_EPILOG = (
    "Example: sdtool report runs/pipe --out runs/pipe/report; "
    "sdtool report runs/ft/best.safetensors --out runs/ft/report --no-latency"
)


def resolve_target(target: str | Path) -> Path:
    """The checkpoint to report on: the file itself, a `sdtool pipeline` folder's final checkpoint, or a
    training run's best.safetensors (else its last.safetensors)."""
    p = Path(target)
    if p.is_dir():
        if (p / "pipeline.json").is_file():
            return _pipeline_final(p)
        for name in ("best.safetensors", "last.safetensors"):
            if (p / name).is_file():
                return p / name
        raise SdtoolError(
            f"{p} holds no pipeline.json, best.safetensors or last.safetensors; pass a checkpoint or a "
            "folder written by sdtool train or sdtool pipeline"
        )
    if not p.is_file():
        raise SdtoolError(f"{p} not found; pass an sdtool checkpoint (.safetensors) or a run folder")
    return p


def _pipeline_final(folder: Path) -> Path:
    """The final checkpoint a pipeline.json names, found in `folder` even if the folder moved since."""
    pipe = folder / "pipeline.json"
    try:
        rep = json.loads(pipe.read_text())
        final, out = Path(rep["final"]), rep.get("out")
    except (OSError, ValueError, KeyError, TypeError):
        raise SdtoolError(f"{pipe} cannot be read (damaged?); pass the pipeline's final checkpoint instead") from None
    # pipeline.json records paths as given to --out; read them relative to where the folder is now.
    if isinstance(out, str) and final.is_relative_to(out) and (folder / final.relative_to(out)).is_file():
        return folder / final.relative_to(out)
    if final.is_file():
        return final
    raise SdtoolError(f"{pipe} names {final} as the final checkpoint, which is missing; pass a checkpoint instead")


def report_(
    run: Annotated[
        Path,
        typer.Argument(
            help="sdtool checkpoint (.safetensors), a training run folder (best, else last) or a pipeline folder."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", help="New or empty folder for the report (an earlier report's folder is replaced)."),
    ],
    latency: Annotated[
        bool,
        typer.Option("--latency/--no-latency", help="Measure each step's batch-1 CPU latency (median, min-max)."),
    ] = True,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs before timing.")] = 3,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs; the median, min and max are reported.")] = 10,
    evaluate: Annotated[
        bool,
        typer.Option("--evaluate", help="Re-measure per-exit test accuracy of every step found on disk."),
    ] = False,
    data: DataOpt = None,
    device: DeviceOpt = "auto",
    allow_other_data: AllowOtherDataOpt = False,
    threads: ThreadsOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Compression report of a checkpoint's chain: every step, its costs, accuracy, latency and settings."""
    from sdtool import chain_render, plotting, report
    from sdtool.chain_report import ReportOptions, collect
    from sdtool.device import set_threads

    opts = ReportOptions(latency, warmup, repeats, evaluate, data, device, allow_other_data)
    opts.check()
    set_threads(threads)
    path = resolve_target(run)
    chain_render.check_out(out)  # before any work: a report that cannot be written fails first
    rep = collect(path, opts, log=report.make_logger(False))
    rep["target"] = str(run)
    chain_render.write_report(rep, out)
    for w in rep["warnings"] + ([plotting.PLOT_HINT] if rep["plots"]["note"] else []):
        report.err.print(f"warning: {w}", highlight=False, markup=False, soft_wrap=True)
    if json_:
        report.print_json(rep)
    else:
        chain_render.terminal_view(rep)
