"""`sdtool eval --early-exit`: choose thresholds (sdtool.exit_fit), run real early exit over a split in an
engine (sdtool.engines), and time it against the deepest exit alone on the same machine in the same run.
The mechanism itself (`early_exit_forward`, costs) is sdtool.early_exit; the policies sdtool.exit_policy.

Two option sets say what to do: `RunOptions` (data, split, device, engine, timing) and `FitOptions`
(how the thresholds are chosen, shared with `export --early-exit`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdtool.choices import SPLITS
from sdtool.early_exit import leave_costs, leave_times
from sdtool.errors import SdtoolError

# The threshold choice moved to sdtool.exit_fit; its names stay importable from here.
from sdtool.exit_fit import (
    SEARCH_NOTE,
    ExitContext,
    FitOptions,
    PolicyChoice,
    choose_policy,
    stored_fit,
    written_with_sweep,
)
from sdtool.exit_policy import ExitPolicy

# The timing moved to sdtool.exit_timing; its names stay importable from here.
from sdtool.exit_timing import DeviceTorchEngine, run_split, time_batch1

if TYPE_CHECKING:
    from sdtool.checkpoint import Checkpoint
    from sdtool.engines import InferenceEngine
    from sdtool.models.multi_exit import MultiExitNet

__all__ = [
    "SEARCH_NOTE",
    "ExitContext",
    "FitOptions",
    "PolicyChoice",
    "RunOptions",
    "choose_policy",
    "eval_early_exit",
    "run_split",
    "time_batch1",
]


@dataclass
class RunOptions:
    """How `eval --early-exit` runs (FitOptions say how its thresholds are chosen).

    data, overrides: the data to run on, as for `sdtool eval` (default: the checkpoint's); split: test
    or val; device: auto, cpu, cuda, mps; batch_size: None = the recipe's eval_batch_size;
    latency_images: images timed one by one for the batch-1 speed-up (0 = skip), over `repeats`
    passes after one untimed pass (the median pass, and the fastest and slowest); engine: torch
    (eager, batch norm folded) or onnxruntime (the bundle's graphs, in memory);
    threads: the engine's CPU threads (torch's global setting, or every ONNX Runtime session's);
    allow_other_data: run on a data set other than the one the checkpoint was trained on (else refused).
    """

    data: str | None = None
    overrides: list[str] | None = None
    split: str = "test"
    device: str = "auto"
    batch_size: int | None = None
    latency_images: int = 128
    repeats: int = 3
    engine: str = "torch"
    threads: int | None = None
    allow_other_data: bool = False


def eval_early_exit(
    path: str,
    run: RunOptions | None = None,
    fit: FitOptions | None = None,
    out: str | None = None,
    quiet: bool = False,
    progress: bool = True,
) -> dict:
    """`sdtool eval --early-exit`: see docs/early-exit.md for the options and the JSON it returns.

    run: what to run and how (default RunOptions()); fit: how thresholds are chosen (default: the
    checkpoint's stored ones); out: write the checkpoint with the fitted thresholds there; quiet: no
    log lines on stderr; progress: progress bars on stderr (only when it is a terminal; not silenced by
    `quiet`). The timings compare early exit with the deepest exit alone in `run.engine`.
    """
    from sdtool import checkpoint, report
    from sdtool.checkpoint_data import checkpoint_data
    from sdtool.device import resolve_device
    from sdtool.profile import exit_costs

    log = report.make_logger(quiet)
    started = checkpoint.now()
    run = run or RunOptions()
    fit = _checked(path, run, fit or FitOptions(), out)
    if run.threads is not None and run.engine == "torch":
        torch.set_num_threads(run.threads)
    dev = resolve_device(run.device)
    if run.engine == "onnxruntime" and dev.type != "cpu":
        raise SdtoolError("--engine onnxruntime runs on the CPU; add --device cpu")
    ckpt = checkpoint.load_checkpoint(path, dev)
    model = ckpt.model
    if model.num_exits < 2:
        raise SdtoolError(f"{path} has a single exit; early exit needs a multi-exit model")
    cfg, bundle = checkpoint_data(ckpt, run.data, run.overrides, run.split, allow_other_data=run.allow_other_data)
    costs = exit_costs(model, (bundle.input_size, bundle.input_size))
    bs = run.batch_size or cfg.eval_batch_size
    eng = _engine(run, model, bundle.input_size, dev, ckpt.meta.ensemble)
    ctx = ExitContext(cfg, bundle, dev, bs, costs, eng, log, progress)
    choice = choose_policy(path, ckpt, fit, ctx)
    if fit.fit and run.split == "val":
        choice.warnings.append(
            "reported on the split the thresholds were fitted on; use --split test for an unbiased figure"
        )
    rep = _report(path, run.split, cfg.name, choice.policy, costs, _measure(eng, ctx, run, choice))
    rep.update(fit=choice.fit, sweep=choice.sweep, warnings=choice.warnings, written=None)
    if out:
        written_with_sweep(choice, lambda: _write_fitted(ckpt, choice, rep, started, out))
        rep["written"] = str(out)
    else:
        written_with_sweep(choice, lambda: None)
    return rep


def _checked(path: str, run: RunOptions, fit: FitOptions, out: str | None) -> FitOptions:
    """Refuse bad options before any work; returns the checked copy of `fit` (defaults filled in)."""
    from sdtool.engines import check_engine

    if run.split not in SPLITS:
        raise SdtoolError(f"--split {run.split!r} is not allowed; use {' or '.join(SPLITS)}")
    fit = dataclasses.replace(fit)  # check() fills in defaults; the caller's options stay as given
    fit.check(out)
    check_engine(run.engine)
    if out and Path(out).resolve() == Path(path).resolve():
        raise SdtoolError(f"--out {out} is the checkpoint being evaluated; write the fitted one to a new path")
    if run.threads is not None and run.threads < 1:
        raise SdtoolError(f"--threads must be at least 1, got {run.threads}")
    check_outputs(path, out, fit.sweep_out)
    return fit


def check_outputs(path: str, out: str | None, sweep_out: str | None) -> None:
    """Both outputs of a fit, checked before any work (sdtool.outputs): the fitted checkpoint `out` (a
    file about the size of checkpoint `path`) and the `sweep_out` folder. Both are checked first, so
    neither is written when the other could not be."""
    from sdtool.outputs import SWEEP_BYTES, check_dir, check_file, source_size

    if sweep_out:
        if out and Path(out).resolve() == Path(sweep_out).resolve():
            raise SdtoolError(f"--sweep-out {sweep_out} is also --out; give the sweep a folder of its own")
        check_dir(sweep_out, "--sweep-out", need_bytes=SWEEP_BYTES)
    if out:
        check_file(out, "--out", need_bytes=source_size(path))


def _engine(run: RunOptions, model: MultiExitNet, size: int, dev: torch.device, ensemble: str) -> InferenceEngine:
    """The engine early exit is run and timed in: `run.engine` on the CPU, eager PyTorch elsewhere."""
    from sdtool.engines import make_engine

    if dev.type == "cpu":
        return make_engine(run.engine, model, size, None, run.threads, ensemble)
    return DeviceTorchEngine(model, dev)


@dataclass
class _Measured:
    """What `_measure` recorded: run_split's result, time_batch1's (None: skipped), the batch size and
    device they ran at, the engine's settings and its piece times (None: not measurable there)."""

    split: dict
    batch_1: dict | None
    batch_size: int
    device: torch.device
    settings: dict
    piece_times: dict | None


def _measure(eng: InferenceEngine, ctx: ExitContext, run: RunOptions, choice: PolicyChoice) -> _Measured:
    """Run early exit with the chosen policy over the split in `eng`, timed against the deepest exit alone."""
    bundle, bs, dev = ctx.bundle, ctx.batch_size, ctx.device
    eng.set_policy(choice.policy)
    times = (choice.fit or {}).get("piece_times")
    if times is None and eng.times_pieces:
        ctx.log(f"timing each exit's stages and head ({run.engine}, batch {bs})")
        times = eng.piece_times(bundle.input_size, bs, progress=ctx.progress)

    ctx.log(f"early exit on the {run.split} split ({run.engine}), timed against the deepest exit alone")
    ds = getattr(bundle, run.split)
    prepare = (lambda x, train: bundle.prepare(x.to(dev), train=train)) if dev.type != "cpu" else bundle.prepare
    loader = bundle.loader(run.split, bs, shuffle=False, seed=0, workers=ctx.cfg.workers)
    split = run_split(eng, loader, prepare, ctx.progress)
    b1 = None
    if run.latency_images > 0:
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[: run.latency_images].tolist()
        xs = prepare(torch.stack([ds[i][0] for i in idx]), train=False)
        b1 = time_batch1(eng, xs, repeats=run.repeats, progress=ctx.progress)
    return _Measured(split, b1, bs, dev, eng.settings, times)


def _write_fitted(ckpt: Checkpoint, choice: PolicyChoice, rep: dict, started: str, out: str) -> None:
    """Save the checkpoint with the fitted thresholds, its metrics on the fitting split and on `rep`'s."""
    assert choice.fit is not None  # --out belongs to fitting (FitOptions.check)
    keys = ("top1", "deepest_top1", "expected_macs", "macs_speedup")
    metrics = {"early_exit": {"fit (val)": {k: choice.fit[k] for k in keys}, rep["split"]: {k: rep[k] for k in keys}}}
    thresholds = choice.policy.to_thresholds(stored_fit(choice.fit))
    ckpt.derive(
        "eval --early-exit --fit-thresholds", step_metrics=metrics, started=started, thresholds=thresholds
    ).save(out)


def _exit_rows(pol: ExitPolicy, leave: list, exit_at: torch.Tensor, right: torch.Tensor) -> list[dict]:
    """One row per exit: its threshold, who answers there, how many samples and how well, what they cost."""
    k_all = len(leave)
    n = len(exit_at)
    counts = torch.bincount(exit_at, minlength=k_all)
    exits = []
    for k in range(k_all):
        mask = exit_at == k
        c = int(counts[k])
        exits.append(
            {
                "exit": k + 1,
                "threshold": pol.values[k] if k < k_all - 1 else None,
                "answered_by": "ensemble" if k == k_all - 1 and pol.fallback == "ensemble" else f"exit {k + 1}",
                "count": c,
                "fraction": c / n,
                "top1": 100.0 * int(right[mask].sum()) / c if c else None,
                "leave_macs": leave[k],
            }
        )
    return exits


def _timing(m: _Measured) -> dict:
    """The report's timing section: where and how it was measured, batch N and batch 1."""
    run = m.split
    bn = {
        "batch_size": m.batch_size,
        "images": len(run["exit_at"]),
        "early_exit_s": run["early_exit_s"],
        "deepest_s": run["deepest_s"],
        "speedup": run["deepest_s"] / run["early_exit_s"],
    }
    return {
        "device": str(m.device),
        "threads": m.settings.get("intra_op_threads", torch.get_num_threads()),
        "engine": m.settings,
        "batch_n": bn,
        "batch_1": m.batch_1,
        "note": "model calls only (data loading excluded); the same machine, one run",
    }


def _report(path: str, split: str, data_name: str, pol: ExitPolicy, costs: dict, m: _Measured) -> dict:
    exit_at, right = m.split["exit_at"], m.split["right"]
    n = len(exit_at)
    leave = leave_costs(costs, pol.computed())
    exits = _exit_rows(pol, leave, exit_at, right)
    counts = [e["count"] for e in exits]
    expected = float(sum(leave[k] * counts[k] for k in range(len(exits))) / n)
    ref = costs["reference"]["macs"]
    top1, deep = 100.0 * int(right.sum()) / n, 100.0 * m.split["deepest_right"] / n
    timing = _timing(m)
    rep = {
        "checkpoint": str(path),
        "split": split,
        "data": data_name,
        "n": n,
        "policy": pol.policy,
        "thresholds": list(pol.values),
        "fallback": pol.fallback,
        "top1": top1,
        "deepest_top1": deep,
        "accuracy_drop": deep - top1,
        "exits": exits,
        "expected_macs": expected,
        "reference_macs": ref,
        "full_macs": costs["full"]["macs"],
        "macs_fraction": expected / ref,
        "macs_speedup": ref / expected,
        "engine": m.settings["engine"],
        "wall_clock_speedup": {
            "batch_1": m.batch_1["speedup"] if m.batch_1 else None,
            # the range of the per-pass speed-ups (sdtool.timing); batch N is one pass over the split
            "batch_1_min": m.batch_1["speedup_min"] if m.batch_1 else None,
            "batch_1_max": m.batch_1["speedup_max"] if m.batch_1 else None,
            "batch_n": timing["batch_n"]["speedup"],
        },
        "timing": timing,
    }
    times = m.piece_times
    if times:
        ms = leave_times(times, pol.computed())
        exp_ms = float(sum(ms[k] * counts[k] for k in range(len(exits))) / n)
        rep.update(piece_times=times, expected_ms=exp_ms, predicted_speedup=times["deepest_ms"] / exp_ms)
        for k, e in enumerate(exits):
            e["leave_ms"] = ms[k]
    return rep
