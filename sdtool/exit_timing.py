"""How `eval --early-exit` times early exit against the deepest exit alone, in one engine.

`run_split` times a whole split batch by batch; `time_batch1` times single images (the latency a
server answering one request at a time sees); `DeviceTorchEngine` is the engine on an accelerator.
Both time only the model calls (data loading excluded) and alternate which side goes first, so neither
side always runs on caches the other warmed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import torch

from sdtool.early_exit import early_exit_forward
from sdtool.errors import SdtoolError
from sdtool.timing import ratio_spread, spread, sync

if TYPE_CHECKING:
    from sdtool.exit_policy import ExitPolicy
    from sdtool.models.multi_exit import MultiExitNet

T = TypeVar("T")


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


def run_split(engine, loader, prepare, progress: bool = True) -> dict:
    """Early exit and the deepest exit alone over a whole split, batch by batch, side by side, in one engine.

    Each batch is run by both (alternating which goes first) and only the model calls are timed, so
    data loading does not dilute the ratio. The first batch is also run once untimed (warm-up).
    """
    from sdtool.progress import images_in
    from sdtool.progress import progress as bar

    exit_all, right_all, deep_right = [], [], 0
    t_ee = t_deep = 0.0
    total = images_in(loader)
    with torch.no_grad(), bar("early exit vs deepest (images)", total, progress) as b:
        for i, (x, y) in enumerate(loader):
            x = prepare(x, train=False).contiguous()
            if i == 0:
                engine.early_exit(x), engine.deepest(x)
            if i % 2:
                zd, dt_d = _timed(partial(engine.deepest, x))
                (z, e), dt_e = _timed(partial(engine.early_exit, x))
            else:
                (z, e), dt_e = _timed(partial(engine.early_exit, x))
                zd, dt_d = _timed(partial(engine.deepest, x))
            t_ee, t_deep = t_ee + dt_e, t_deep + dt_d
            exit_all.append(e)
            right_all.append(z.argmax(1) == y)
            deep_right += int((zd.argmax(1) == y).sum())
            b.advance(len(y))
    if not exit_all:
        raise SdtoolError("the evaluation split is empty")
    return {
        "exit_at": torch.cat(exit_all),
        "right": torch.cat(right_all),
        "deepest_right": deep_right,
        "early_exit_s": t_ee,
        "deepest_s": t_deep,
    }


def time_batch1(engine, xs: torch.Tensor, repeats: int = 3, warmup: int = 1, progress: bool = True) -> dict:
    """Per-image latency at batch 1 over the images `xs` (prepared, (M, C, H, W), CPU): early exit vs the
    deepest exit alone in one engine, interleaved image by image (alternating which goes first).

    `warmup` untimed passes over all the images come first: one pass runs every exit early exit will
    take on them, so none pays its first-call costs (kernel selection, buffer allocation) in a timed
    pass. Then `repeats` timed passes; per-image ms are the median over the passes, with the fastest and
    slowest pass (`_min`, `_max`); the speed-up is the ratio of the medians, its range that of the
    per-pass ratios (both sides of a ratio are timed in the same pass).
    """
    from sdtool.progress import progress as bar

    ones = [xs[j : j + 1].contiguous() for j in range(len(xs))]
    tot_e, tot_d = [], []
    with torch.no_grad(), bar("timing batch 1 (images)", (warmup + repeats) * len(ones), progress) as b:
        for r in range(warmup + repeats):
            te = td = 0.0
            for j, x in enumerate(ones):
                if j % 2:
                    td += _timed(partial(engine.deepest, x))[1]
                    te += _timed(partial(engine.early_exit, x))[1]
                else:
                    te += _timed(partial(engine.early_exit, x))[1]
                    td += _timed(partial(engine.deepest, x))[1]
                b.advance()
            if r >= warmup:
                tot_e.append(te)
                tot_d.append(td)
    n = len(ones)
    return {
        "images": n,
        "repeats": repeats,
        "warmup_passes": warmup,
        **spread("early_exit_ms_per_image", tot_e, 1000 / n),
        **spread("deepest_ms_per_image", tot_d, 1000 / n),
        **ratio_spread("speedup", tot_d, tot_e),
    }


class DeviceTorchEngine:
    """Eager PyTorch on an accelerator (the unfolded model, synchronised around each call for timing)."""

    name = "torch"
    times_pieces = False  # accelerator timings of single pieces are not what the fit's costs assume

    def __init__(self, model: MultiExitNet, dev: torch.device):
        self.model, self.dev = model, dev
        self.policy: ExitPolicy | None = None
        self.settings = {"engine": "torch", "torch": torch.__version__, "device": str(dev), "batchnorm_folded": False}

    def set_policy(self, policy: ExitPolicy) -> None:
        self.policy = policy

    def piece_times(self, size: int, batch: int, warmup: int = 2, repeats: int = 5, progress: bool = True) -> dict:
        raise SdtoolError("--cost latency measures times on the CPU engines; add --device cpu")

    def early_exit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.policy is not None, "set_policy first"
        sync(self.dev)  # the batch's own preparation is not billed to this call
        r = early_exit_forward(self.model, x, self.policy)
        sync(self.dev)
        return r[0].cpu(), r[1].cpu()

    def deepest(self, x: torch.Tensor) -> torch.Tensor:
        sync(self.dev)
        with torch.no_grad():
            z = self.model.forward_until(x, self.model.num_exits - 1)
        sync(self.dev)
        return z.cpu()
