"""`sdtool prune`: its options take their names' help and defaults from sdtool.prune_options.PruneOptions.

The pruning settings are stated once (sdtool/prune_options.py); this command only spells them as flags
(`--global-pruning` for `prune.global_pruning`), so `--help`, a recipe's `prune` section and the range
checks cannot disagree. As in sdtool.cli, no torch code lives here.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from sdtool.cli_options import AllowOtherDataOpt, DataOpt, DataSetOpt, DeviceOpt, JsonOpt, ThreadsOpt, deprecated
from sdtool.prune_options import CRITERIA, PruneOptions, help_of

PRUNE_EPILOG = (
    "Example: sdtool prune runs/sd/best.safetensors --target-macs 0.5 --criterion "
    "taylor --eval --out runs/pruned.safetensors"
)
_D = PruneOptions()  # the defaults


def _h(name: str) -> str:
    return help_of(PruneOptions, name)


class Criterion(str, Enum):
    """--criterion: sdtool.prune_options.CRITERIA (tests/test_cli_choices.py checks they match)."""

    l1, l2, taylor, bn_scale, fpgm, lamp, random = CRITERIA


_DEFAULT_CRITERION = Criterion(_D.criterion)


def prune(
    ckpt: Annotated[Path, typer.Argument(help="sdtool checkpoint (.safetensors).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the pruned checkpoint.")],
    ratio: Annotated[float | None, typer.Option("--ratio", help=_h("ratio"))] = _D.ratio,
    target_macs: Annotated[float | None, typer.Option("--target-macs", help=_h("target_macs"))] = _D.target_macs,
    criterion: Annotated[Criterion, typer.Option("--criterion", help=_h("criterion"))] = _DEFAULT_CRITERION,
    global_pruning: Annotated[bool, typer.Option("--global-pruning", help=_h("global_pruning"))] = (_D.global_pruning),
    iterative_steps: Annotated[int, typer.Option("--iterative-steps", help=_h("iterative_steps"))] = (
        _D.iterative_steps
    ),
    round_to: Annotated[int | None, typer.Option("--round-to", help=_h("round_to"))] = _D.round_to,
    protect_exits: Annotated[
        bool, typer.Option("--protect-exits/--no-protect-exits", help=_h("protect_exits"))
    ] = _D.protect_exits,
    taylor_batches: Annotated[int, typer.Option("--taylor-batches", help=_h("taylor_batches"))] = _D.taylor_batches,
    eval_: Annotated[bool, typer.Option("--eval", help="Also report test accuracy per exit before and after.")] = False,
    data: DataOpt = None,
    set_: DataSetOpt = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    allow_other_data: AllowOtherDataOpt = False,
    json_: JsonOpt = False,
    global_: Annotated[bool, typer.Option("--global", hidden=True)] = False,  # the old --global-pruning
) -> None:
    """Structured pruning (Torch-Pruning) of every exit at once; writes a smaller checkpoint that reloads anywhere.

    --data and --set choose the images of --criterion taylor and --eval; --device is where --eval runs
    (pruning itself runs on the CPU).
    """
    from sdtool import report
    from sdtool.device import set_threads
    from sdtool.prune import prune_checkpoint

    if global_:
        deprecated("--global", "--global-pruning")
    opts = PruneOptions(
        criterion=criterion.value,
        ratio=ratio,
        target_macs=target_macs,
        global_pruning=global_pruning or global_,
        iterative_steps=iterative_steps,
        round_to=round_to,
        protect_exits=protect_exits,
        taylor_batches=taylor_batches,
    )
    set_threads(threads)  # the pruner's own single-image passes run on one thread; taylor and --eval on these
    rep = prune_checkpoint(str(ckpt), str(out), opts, eval_, data, set_, device, allow_other_data=allow_other_data)
    report.print_json(rep) if json_ else report.prune_view(rep)
