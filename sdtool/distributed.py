"""Process-group handling for `torchrun`: rank detection, the backend, reductions. The only place that
knows about ranks; everything else asks `ctx.is_main` or calls the reductions here.

    torchrun --nproc_per_node 4 -m sdtool train RECIPE --out RUN_DIR     # one node, 4 processes
Backends: nccl on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from sdtool.errors import SdtoolError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistContext:
    """Ranks as torchrun sets them (RANK, WORLD_SIZE, LOCAL_RANK); a single process otherwise."""
    return DistContext(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


def init(ctx: DistContext, device: torch.device) -> None:
    if not ctx.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=_dt.timedelta(minutes=60))


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    """Each process drives the GPU of its local rank."""
    if device.type == "cuda" and ctx.enabled:
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return device


def all_reduce_sums(values: list[float], device: torch.device, ctx: DistContext) -> list[float]:
    """Sum a few scalars over all ranks (a no-op for one process)."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_tensors(t: torch.Tensor, device: torch.device, ctx: DistContext) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor (e.g. RNG states), on the CPU."""
    if not ctx.enabled:
        return [t]
    src = t.to(device)
    out = [torch.empty_like(src) for _ in range(ctx.world_size)]
    dist.all_gather(out, src)
    return [o.cpu() for o in out]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def any_flag(flag: bool, device: torch.device, ctx: DistContext) -> bool:
    """True on every rank when any rank says True (e.g. 'my loss is not finite', 'saving failed'), so all
    processes stop together instead of some waiting forever in the next collective."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def on_main(ctx: DistContext, device: torch.device, fn: Callable[[], T]) -> T | None:
    """`fn()` on rank 0 alone (e.g. checking and locking the run folder); if it raises, every process raises
    too (rank 0 its own error), so none goes on to wait for the others. None on the other ranks."""
    if not ctx.enabled:
        return fn()
    result: T | None = None
    failure: Exception | None = None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure = exc
    if any_flag(failure is not None, device, ctx):
        raise failure or SdtoolError("process 0 stopped; see its message")
    return result
