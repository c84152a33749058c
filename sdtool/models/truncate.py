"""One exit of a multi-exit network as a standalone single-exit network (the paper's "shallow
classifier as a smaller model").

`truncate(net, k)` keeps the stages exit k needs and that exit's attention, head and classifier; the
result is an ordinary `MultiExitNet` with one exit, so checkpoints, profiling, evaluation and export
treat it like any other model. Its spec is the registered builder `truncated(base, base_args, exit)`,
which rebuilds the same structure from the base model's spec; pruned shapes are recorded on top of
that by `checkpoint.save` as for any model. Module names inside the kept stages stay the same; the
kept exit's modules become `attention.0`, `heads.0` and `classifiers.0`.
"""

from __future__ import annotations

from typing import cast

from torch import nn

from sdtool.errors import SdtoolError
from sdtool.models.multi_exit import MultiExitNet
from sdtool.models.registry import create_model, register_model


def truncate(net: MultiExitNet, k: int) -> MultiExitNet:
    """Exit k (0-based) of `net` alone; shares the modules with `net` (no copies)."""
    if not 0 <= k < net.num_exits:
        raise SdtoolError(f"exit {k + 1} does not exist; this model has exits 1..{net.num_exits}")
    s = net.exit_stages[k]
    # Build a one-exit shell over the kept stages, then put exit k's own modules in place of the
    # shell's placeholder exit (a final exit would otherwise get a pooling head of its own).
    out = MultiExitNet(
        list(net.stages[: s + 1]), [1] * (s + 1), net.num_classes, exits=[s + 1], head="pool", attention=False
    )
    out.attention = nn.ModuleList([net.attention[k]])
    out.heads = nn.ModuleList([net.heads[k]])
    out.classifiers = nn.ModuleList([net.classifiers[k]])
    spec = getattr(net, "spec", None)
    if spec is not None:
        if spec["name"] == "truncated":  # truncating a truncated net: it has one exit, so k == 0
            out.spec = spec
        else:
            out.spec = {
                "name": "truncated",
                "args": {"base": spec["name"], "base_args": dict(spec["args"]), "exit": k + 1},
            }
    return out


@register_model
def truncated(base: str, base_args: dict, exit: int) -> MultiExitNet:  # noqa: A002 - the CLI's word
    """Exit `exit` (1-based) of model `base` built with `base_args`, as a standalone single-exit network."""
    net = cast(MultiExitNet, create_model(base, **base_args))  # builders return multi-exit nets (users: wrap_model)
    if not isinstance(exit, int) or not 1 <= exit <= net.num_exits:
        raise SdtoolError(f"exit {exit} does not exist; {base} has exits 1..{net.num_exits}")
    return truncate(net, exit - 1)
