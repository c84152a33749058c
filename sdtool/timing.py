"""Wall-clock timing with its spread: every measured time is the median over repeats, with the fastest
and the slowest repeat beside it.

JSON convention, the same everywhere (profile, eval --early-exit, the bundle's manifest): a key `X`
keeps its meaning (the median) and `X_min` / `X_max`, of the same shape, hold the fastest and slowest
repeat. A speed-up's range comes from paired repeats: repeat i times both sides, interleaved, and its
ratio is one sample; `speedup_min` / `speedup_max` are the extremes of those ratios (the ratio of the
medians always lies between them). Tables show "median (min–max)".
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is loaded by the functions that time: report's views use this module too
    import torch

Tick = Callable[[], None]  # called after each run, outside the timed window (a progress bar's advance)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def repeat_seconds(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, tick: Tick | None = None
) -> list[float]:
    """Wall-clock seconds of `fn()` for each of `repeats` runs after `warmup` untimed ones (synchronised
    on CUDA); `tick()` after every run, untimed."""
    import torch

    with torch.no_grad():
        for _ in range(warmup):
            fn()
            if tick:
                tick()
        sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
            if tick:
                tick()
    return times


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` runs after `warmup` untimed ones."""
    return statistics.median(repeat_seconds(fn, device, warmup, repeats))


def spread(key: str, samples: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """{key: median, key_min: fastest, key_max: slowest} of `samples`, each times `scale`."""
    return {
        key: scale * statistics.median(samples),
        f"{key}_min": scale * min(samples),
        f"{key}_max": scale * max(samples),
    }


def spread_lists(key: str, rows: Sequence[Sequence[float]], scale: float = 1.0) -> dict[str, list[float]]:
    """As `spread` for a list of figures (one list of samples per figure): lists of medians, mins, maxes."""
    figs = [spread(key, r, scale) for r in rows]
    return {k: [f[k] for f in figs] for k in (key, f"{key}_min", f"{key}_max")}


def ratio_spread(key: str, num: Sequence[float], den: Sequence[float]) -> dict[str, float]:
    """A speed-up `median(num) / median(den)` with the range of the paired ratios num[i] / den[i]."""
    ratios = [n / d for n, d in zip(num, den, strict=True)]
    return {
        key: statistics.median(num) / statistics.median(den),
        f"{key}_min": min(ratios),
        f"{key}_max": max(ratios),
    }


def by_batch(row: dict, key: str, batch: str) -> dict:
    """The figure `key` of one batch size out of a row keyed {key: {batch: ...}, key_min: ..., key_max: ...}."""
    return {k: row[k][batch] for k in (key, f"{key}_min", f"{key}_max") if k in row}


def fmt_range(fig: dict, key: str, fmt: str = ".2f", unit: str = "") -> str:
    """'median (min–max)' of figure `key` in `fig` (just the median when the spread is absent)."""
    med = f"{fig[key]:{fmt}}{unit}"
    lo, hi = fig.get(f"{key}_min"), fig.get(f"{key}_max")
    if lo is None or hi is None:
        return med
    return f"{med} ({lo:{fmt}}–{hi:{fmt}}{unit})"


# --- `sdtool profile`'s latency: each exit alone and the full net, at batch 1 and N -----------------------


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory allocated during one call (weights included); None off CUDA, where torch
    offers no allocator statistics and process RSS would mostly measure the Python heap."""
    if device.type != "cuda":
        return None
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def _latency_row(name: str, samples: dict[str, list[float]], peak: int | None) -> dict:
    """One row of the latency report: median, fastest and slowest ms per batch size."""
    figs = {b: spread("latency_ms", s, 1000.0) for b, s in samples.items()}
    row: dict = {"name": name}
    for k in ("latency_ms", "latency_ms_min", "latency_ms_max"):
        row[k] = {b: f[k] for b, f in figs.items()}
    row["peak_memory_bytes"] = peak
    return row


def _timed_runs(
    runs: list[tuple[str, Callable[[object], object]]],
    inputs: dict,
    device: torch.device,
    warmup: int,
    repeats: int,
    what: str,
    progress: bool,
) -> list[dict[str, list[float]]]:
    """Seconds per repeat of every run at every batch size (`inputs` by size), under one progress bar."""
    from functools import partial

    from sdtool.progress import progress as bar

    sizes = sorted(inputs)
    total = len(runs) * len(sizes) * (warmup + repeats)
    with bar(f"timing {what}, batch {'+'.join(map(str, sizes))}", total, progress) as b:
        return [
            {str(s): repeat_seconds(partial(fn, inputs[s]), device, warmup, repeats, b.advance) for s in sizes}
            for _, fn in runs
        ]


def measure_latency(
    model,
    input_size: tuple[int, int],
    batch: int,
    device: torch.device,
    warmup: int = 3,
    repeats: int = 10,
    progress: bool = True,
) -> dict:
    """Latency (ms) of each exit alone (`forward_until`) and of the full net, at batch 1 and `batch`: the
    median over `repeats` (`latency_ms`) and the fastest and slowest repeat (`latency_ms_min`, `_max`).

    Returns {"device", "threads", "warmup", "repeats", "statistic": "median", "batch_sizes", "exits":
    [{"name", "latency_ms": {"1": ..., "N": ...}, "latency_ms_min", "latency_ms_max",
    "peak_memory_bytes"}], "full": {...}}.
    """
    from functools import partial

    import torch

    model.eval()
    sizes = sorted({1, batch})
    inputs = {b: torch.randn(b, 3, *input_size, generator=torch.Generator().manual_seed(0)).to(device) for b in sizes}
    runs: list[tuple[str, Callable[[object], object]]] = [
        (f"exit {k + 1}", partial(model.forward_until, k=k)) for k in range(model.num_exits)
    ]
    runs.append(("full", model))
    timed = _timed_runs(runs, inputs, device, warmup, repeats, "exits (torch)", progress)
    rows = [
        _latency_row(name, t, _peak_bytes(partial(fn, inputs[batch]), device))
        for (name, fn), t in zip(runs, timed, strict=True)
    ]
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "repeats": repeats,
        "statistic": "median",
        "spread": "min and max over the repeats (latency_ms_min, latency_ms_max)",
        "batch_sizes": sizes,
        "peak_memory": (
            f"CUDA max_memory_allocated at batch {batch}, weights included"
            if device.type == "cuda"
            else "not measured on CPU (no allocator statistics)"
        ),
        "exits": rows[:-1],
        "full": rows[-1],
    }


def measure_latency_ort(
    model,
    input_size: tuple[int, int],
    batch: int,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    progress: bool = True,
) -> dict:
    """As `measure_latency`, in ONNX Runtime: each exit alone and the full net as graphs cut from one
    export (sdtool.onnx_graphs), every session with the bundle runtime's settings."""
    from functools import partial

    import numpy as np
    import torch

    from sdtool import runtime
    from sdtool.errors import SdtoolError
    from sdtool.onnx_graphs import model_pieces

    if input_size[0] != input_size[1]:
        raise SdtoolError("--engine onnxruntime profiles square inputs; give --input-size S S")
    side = input_size[0]
    pieces = model_pieces(model.cpu().eval(), side)
    so, settings = runtime.session_options(threads)
    sizes = sorted({1, batch})
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, side, side)).astype(np.float32) for b in sizes}
    k_all = model.num_exits
    names = [(f"exit {k + 1}", "deepest" if k == k_all - 1 else f"alone{k + 1}") for k in range(k_all)]
    runs: list[tuple[str, Callable[[object], object]]] = []
    for label, piece in names + [("full", "full")]:
        sess = runtime.make_session(pieces.graphs[piece], so, piece)
        runs.append((label, partial(_run_session, sess)))
    timed = _timed_runs(runs, inputs, torch.device("cpu"), warmup, repeats, "exits (onnxruntime)", progress)
    return {
        "device": "cpu",
        "engine": settings,
        "threads": settings["intra_op_threads"],
        "warmup": warmup,
        "repeats": repeats,
        "statistic": "median",
        "spread": "min and max over the repeats (latency_ms_min, latency_ms_max)",
        "batch_sizes": sizes,
        "peak_memory": "not measured on CPU",
        "exits": [_latency_row(name, t, None) for (name, _), t in zip(runs[:-1], timed[:-1], strict=True)],
        "full": _latency_row("full", timed[-1], None),
    }


def _run_session(sess, x) -> object:
    """One ONNX Runtime call on the graph input `x`."""
    return sess.run(None, {"input": x})
