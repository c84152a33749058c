"""How much memory this machine has, and one-line refusals of what would not fit in it.

Used where a setting or a file would size an allocation: recipe values and in-memory data sets
(`check_fits`), and the model a checkpoint describes (`check_model_fits`: its parameters and buffers
plus one image's activations, measured on PyTorch's meta device). The estimate is compared with the
machine's physical memory and the numbers are printed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, cast

import torch

from sdtool.errors import SdtoolError

if TYPE_CHECKING:
    from sdtool.meta import CheckpointMeta
    from sdtool.models.multi_exit import MultiExitNet


def machine_memory() -> int | None:
    """The machine's physical memory in bytes; None where the OS does not say (os.sysconf is POSIX only)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    return total if total > 0 else None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(need: int, what: str, fix: str) -> None:
    """Refuse `what` when it needs more bytes than the machine has memory (a lower bound: the estimates
    count one copy of the data at stake, so nothing that could have run is refused)."""
    total = machine_memory()
    if total is not None and need > total:
        raise SdtoolError(f"{what} needs {gib(need)}, more than this machine's {gib(total)} of memory; {fix}")


def _activation_bytes(skeleton: MultiExitNet, channels: int, side: int, room: int) -> int:
    """One image's activations: a generous bound (each leaf module's output as wide as the widest tensor, at
    the input's side) where it fits in `room`, as the meta forward costs ~50 ms; else the input and each leaf's
    output on the meta device, or the input alone where that does not run (never refuse a file that loads)."""
    x = torch.empty(1, channels, side, side, device="meta")
    sizes = [x.numel() * x.element_size()]
    leaves = [m for m in skeleton.modules() if next(m.children(), None) is None]
    widest = max([channels] + [t.shape[0] for t in skeleton.state_dict().values() if t.dim()])
    if (bound := (channels + len(leaves) * widest) * side * side * x.element_size()) <= room:
        return bound

    def count(_m: torch.nn.Module, _args: Any, out: Any) -> None:
        sizes.extend(t.numel() * t.element_size() for t in (out if isinstance(out, tuple) else (out,)))

    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            skeleton.eval()(x)
    except Exception:  # noqa: BLE001 - see the docstring
        del sizes[1:]
    finally:
        for h in hooks:
            h.remove()
    return sum(sizes)


def check_model_fits(where: str, meta: CheckpointMeta, skeleton: MultiExitNet) -> None:
    """Refuse a structure this machine cannot hold: its state dict's bytes (meta device) and one image's activations."""
    have = machine_memory() or 2**40  # where the OS does not say, assume a large machine: never refuse a file
    weights = sum(t.numel() * t.element_size() for t in skeleton.state_dict().values())
    sides, args = [meta.input_size], cast(Any, meta.model.args)  # a wrapped model's builder runs one image
    while isinstance(args, dict):  # of input_size; truncated(base, base_args, exit) nests the base's arguments
        sides.append(args["input_size"] if isinstance(args.get("input_size"), int) else 0)
        args = args.get("base_args")
    channels = meta.input.channels if meta.input is not None else 3
    acts = _activation_bytes(skeleton, channels, max(sides), have - weights) if weights <= have else 0
    if weights + acts > have:
        total, w, a, m = ((n / 1e9) for n in (weights + acts, weights, acts, have))
        raise SdtoolError(
            f"{where}: the model described needs {total:.1f} GB ({w:.1f} GB of parameters and buffers, {a:.1f} GB "
            f"of activations for one {max(sides)}x{max(sides)} image), more than this machine's {m:.1f} GB of "
            "memory; the file is damaged or was edited"
        )
