"""`sdtool eval --early-exit` and threshold choice: fit or load thresholds, run real early exit over a
split in an engine (sdtool.engines), and time it against the deepest exit alone on the same machine in
the same run. The mechanism itself (policies, `early_exit_forward`, costs) is sdtool.early_exit.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from sdtool.early_exit import ExitPolicy, early_exit_forward, leave_costs, leave_times
from sdtool.errors import SdtoolError
from sdtool.meta import CheckpointMeta, ValSplit
from sdtool.profile import sync as _sync

SEARCH_NOTE = (
    "per-exit thresholds from confidence percentiles, coordinate descent from two starts "
    "(deepest exit alone; best shared threshold)"
)


def _timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


def run_split(engine, loader, prepare) -> dict:
    """Early exit and the deepest exit alone over a whole split, batch by batch, side by side, in one engine.

    Each batch is run by both (alternating which goes first) and only the model calls are timed, so
    data loading does not dilute the ratio. The first batch is also run once untimed (warm-up).
    """
    exit_all, right_all, deep_right = [], [], 0
    t_ee = t_deep = 0.0
    with torch.no_grad():
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
    if not exit_all:
        raise SdtoolError("the evaluation split is empty")
    return {
        "exit_at": torch.cat(exit_all),
        "right": torch.cat(right_all),
        "deepest_right": deep_right,
        "early_exit_s": t_ee,
        "deepest_s": t_deep,
    }


def time_batch1(engine, xs: torch.Tensor, repeats: int = 3, warmup: int = 3) -> dict:
    """Per-image latency at batch 1 over the images `xs` (prepared, (M, C, H, W), CPU): early exit vs the
    deepest exit alone in one engine, interleaved image by image; the median over `repeats` passes."""
    ones = [xs[j : j + 1].contiguous() for j in range(len(xs))]
    with torch.no_grad():
        for x in ones[:warmup]:
            engine.early_exit(x)
            engine.deepest(x)
        tot_e, tot_d = [], []
        for _ in range(repeats):
            te = td = 0.0
            for x in ones:
                te += _timed(partial(engine.early_exit, x))[1]
                td += _timed(partial(engine.deepest, x))[1]
            tot_e.append(te)
            tot_d.append(td)
    e, d = statistics.median(tot_e), statistics.median(tot_d)
    return {
        "images": len(ones),
        "repeats": repeats,
        "early_exit_ms_per_image": 1000 * e / len(ones),
        "deepest_ms_per_image": 1000 * d / len(ones),
        "speedup": d / e,
    }


@dataclass
class FitOptions:
    """How early-exit thresholds are chosen: the one option set of `eval --early-exit` and
    `export --early-exit` (and the pipeline's eval section).

    fit: fit on the validation split (else the checkpoint's stored thresholds are used);
    max_drop (points) or budget (fraction of the reference cost); policy, fallback: None = default
    (max_softmax, deepest) or the stored ones; cost: macs | latency (measured in the engine at the
    fitting batch size); sweep_out: write the accuracy-vs-MACs sweep there.
    """

    fit: bool = False
    max_drop: float | None = None
    budget: float | None = None
    policy: str | None = None
    fallback: str | None = None
    cost: str = "macs"
    sweep_out: str | None = None

    def check(self, out: str | None = None) -> None:
        from sdtool.thresholds import COSTS

        if not self.fit and (
            self.max_drop is not None or self.budget is not None or self.sweep_out or out or self.cost != "macs"
        ):
            raise SdtoolError(
                "--max-drop, --budget, --cost, --sweep-out and --out belong to threshold fitting; add --fit-thresholds"
            )
        if self.max_drop is not None and self.budget is not None:
            raise SdtoolError("give either --max-drop D or --budget F, not both")
        if self.cost not in COSTS:
            raise SdtoolError(f"unknown --cost {self.cost!r}; use one of {', '.join(COSTS)}")
        if self.policy is not None or self.fallback is not None:
            ExitPolicy(self.policy or "max_softmax", [], self.fallback or "deepest")  # validates the names
        if self.fit and self.budget is None and self.max_drop is None:
            self.max_drop = 0.5


def _fit_context(meta: CheckpointMeta, bundle, cfg) -> tuple[dict, list[str]]:
    """Where thresholds are fitted, and a warning when that split overlaps the training images."""
    rec = meta.val_split
    now_val = ValSplit.from_json(bundle.val_info, "the validation split") if bundle.val_info else None
    if rec is None or now_val is None:
        overlaps = True
    elif rec.fingerprint is not None:
        overlaps = rec != now_val
    else:  # older files: no fingerprint, only the size and seed of the cut
        overlaps = (rec.size, rec.seed) != (now_val.size, now_val.seed)
    warnings = []
    if overlaps:
        same_cut = rec is not None and now_val is not None and (rec.size, rec.seed) == (now_val.size, now_val.seed)
        fix = (
            "evaluate on the data set the model was trained on, or retrain on this one"
            if same_cut
            else "retrain with data.val_size set for a clean split"
        )
        warnings.append(
            f"the validation split (data.val_size={cfg.val_size:g}, seed {cfg.val_seed}) is not the one "
            f"held out in training{' (same size and seed, other data)' if same_cut else ''}, so it may "
            f"overlap images the model was trained on; the fitted thresholds will be optimistic ({fix})"
        )
    return {
        "split": "val",
        "data": cfg.name,
        "val_size": now_val.size if now_val else None,
        "val_seed": now_val.seed if now_val else None,
        "overlaps_training": bool(overlaps),
        "search": SEARCH_NOTE,
    }, warnings


def choose_policy(
    path: str,
    model: nn.Module,
    meta: CheckpointMeta,
    cfg,
    bundle,
    opts: FitOptions,
    costs: dict,
    dev: torch.device,
    bs: int,
    engine=None,
    log=None,
) -> tuple[ExitPolicy, dict | None, dict | None, list[str]]:
    """The policy early exit runs: fitted on the validation split (`opts.fit`) or the checkpoint's own.

    `engine` (sdtool.engines) measures the piece times of `--cost latency` at batch `bs`.

    Returns (policy, fit report or None, sweep report or None, warnings).
    """
    from sdtool import report
    from sdtool import thresholds as th
    from sdtool.evaluate import collect_logits

    ens = meta.ensemble
    if not opts.fit:
        stored = meta.thresholds
        if stored is None:
            raise SdtoolError(
                f"{path} has no fitted thresholds; run sdtool eval {path} --early-exit "
                "--fit-thresholds --out NEW.safetensors first, or add --fit-thresholds"
            )
        if opts.policy and opts.policy != stored.policy:
            raise SdtoolError(
                f"{path} stores {stored.policy} thresholds; refit with --fit-thresholds "
                f"--policy {opts.policy} to use {opts.policy}"
            )
        return ExitPolicy.stored(stored, ens, opts.fallback), None, None, []
    if not cfg.val_size:
        raise SdtoolError(
            f"{path} was trained without a validation split (data.val_size=0) and thresholds are "
            "never fitted on the test split; pass --set data.val_size=0.1 to hold one out of the "
            "training images (warning: they overlap what the model trained on, so the fit will be "
            "optimistic) or retrain with data.val_size set"
        )
    pol_name, fb = opts.policy or "max_softmax", opts.fallback or "deepest"
    (log or (lambda *a: None))(f"fitting thresholds on the validation split ({len(bundle.val)} images)")
    logits, y = collect_logits(
        model, bundle.loader("val", bs, shuffle=False, seed=0, workers=cfg.workers), bundle.prepare, dev
    )
    times = None
    if opts.cost == "latency":
        if engine is None or not hasattr(engine, "piece_times"):
            raise SdtoolError("--cost latency measures times on the CPU engines; add --device cpu")
        (log or (lambda *a: None))(f"timing each exit's stages and head ({engine.name}, batch {bs})")
        times = engine.piece_times(bundle.input_size, bs)
    table = th.make_table(logits, y, costs, pol_name, fb, ens, times=times, cost=opts.cost)
    context, warnings = _fit_context(meta, bundle, cfg)
    fit_rep = {**th.fit(table, pol_name, max_drop=opts.max_drop, budget=opts.budget), **context}
    if times is not None:
        fit_rep["piece_times"] = times
    if not fit_rep["feasible"]:
        warnings.append("no thresholds meet the constraint on the validation split; the closest ones are used")
    sweep_rep = None
    if opts.sweep_out:
        sw = th.sweep(table, pol_name)
        keys = ("values", "top1", "macs_fraction", "objective", "max_drop", "budget")
        sw["chosen"] = {k: fit_rep[k] for k in keys}
        sweep_rep = {"dir": str(opts.sweep_out), "files": report.write_sweep(sw, opts.sweep_out)}
    return ExitPolicy(pol_name, fit_rep["values"], fb, ens), fit_rep, sweep_rep, warnings


def eval_early_exit(
    path: str,
    data: str | None = None,
    overrides: list[str] | None = None,
    split: str = "test",
    device: str = "auto",
    fit: bool = False,
    max_drop: float | None = None,
    budget: float | None = None,
    policy: str | None = None,
    fallback: str | None = None,
    sweep_out: str | None = None,
    out: str | None = None,
    batch_size: int | None = None,
    latency_images: int = 128,
    repeats: int = 3,
    quiet: bool = False,
    engine: str = "torch",
    cost: str = "macs",
    threads: int | None = None,
) -> dict:
    """`sdtool eval --early-exit`: see docs/early-exit.md for the options and the JSON it returns.

    engine: torch (eager, batch norm folded) or onnxruntime (the bundle's graphs, in memory); the
    timings compare early exit with the deepest exit alone in that engine. threads: the engine's CPU
    threads (torch's global setting, or every ONNX Runtime session's).
    """
    from sdtool import checkpoint, report
    from sdtool.device import resolve_device
    from sdtool.engines import check_engine, make_engine
    from sdtool.profile import exit_costs

    log = report.make_logger(quiet)
    started = checkpoint.now()
    if split not in ("test", "val"):
        raise SdtoolError(f"--split {split!r} is not allowed; use test or val")
    opts = FitOptions(fit, max_drop, budget, policy, fallback, cost, sweep_out)
    opts.check(out)
    check_engine(engine)
    if out and Path(out).resolve() == Path(path).resolve():
        raise SdtoolError(f"--out {out} is the checkpoint being evaluated; write the fitted one to a new path")
    if threads is not None:
        if threads < 1:
            raise SdtoolError(f"--threads must be at least 1, got {threads}")
        if engine == "torch":
            torch.set_num_threads(threads)
    dev = resolve_device(device)
    if engine == "onnxruntime" and dev.type != "cpu":
        raise SdtoolError("--engine onnxruntime runs on the CPU; add --device cpu")
    ckpt = checkpoint.load_checkpoint(path, dev)
    model, meta = ckpt.model, ckpt.meta
    if model.num_exits < 2:
        raise SdtoolError(f"{path} has a single exit; early exit needs a multi-exit model")
    cfg, bundle = ckpt.data(data, overrides, split)
    costs = exit_costs(model, (bundle.input_size, bundle.input_size))
    bs = batch_size or cfg.eval_batch_size
    eng = (
        make_engine(engine, model, bundle.input_size, None, threads, meta.ensemble)
        if dev.type == "cpu"
        else _DeviceTorchEngine(model, dev)
    )
    pol, fit_rep, sweep_rep, warnings = choose_policy(path, model, meta, cfg, bundle, opts, costs, dev, bs, eng, log)
    if fit and split == "val":
        warnings.append("reported on the split the thresholds were fitted on; use --split test for an unbiased figure")
    eng.set_policy(pol)
    times = (fit_rep or {}).get("piece_times")
    if times is None and hasattr(eng, "piece_times"):
        log(f"timing each exit's stages and head ({engine}, batch {bs})")
        times = eng.piece_times(bundle.input_size, bs)

    log(f"early exit on the {split} split ({engine}), timed against the deepest exit alone")
    ds = getattr(bundle, split)
    prepare = (lambda x, train: bundle.prepare(x.to(dev), train=train)) if dev.type != "cpu" else bundle.prepare
    run = run_split(eng, bundle.loader(split, bs, shuffle=False, seed=0, workers=cfg.workers), prepare)
    b1 = None
    if latency_images > 0:
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:latency_images].tolist()
        xs = prepare(torch.stack([ds[i][0] for i in idx]), train=False)
        b1 = time_batch1(eng, xs, repeats=repeats)
    rep = _report(path, split, cfg.name, model.num_exits, pol, costs, run, b1, bs, dev, eng.settings, times)
    rep.update(fit=fit_rep, sweep=sweep_rep, warnings=warnings, written=None)
    if out:
        keys = ("top1", "deepest_top1", "expected_macs", "macs_speedup")
        metrics = {"early_exit": {"fit (val)": {k: fit_rep[k] for k in keys}, split: {k: rep[k] for k in keys}}}
        thresholds = pol.to_thresholds(_stored_fit(fit_rep))
        ckpt.derive(
            "eval --early-exit --fit-thresholds", step_metrics=metrics, started=started, thresholds=thresholds
        ).save(out)
        rep["written"] = str(out)
    return rep


def _stored_fit(fit_rep: dict | None) -> dict | None:
    """What a checkpoint keeps of a fit (the piece times are a measurement of this machine, kept in the report)."""
    return None if fit_rep is None else {k: v for k, v in fit_rep.items() if k != "piece_times"}


class _DeviceTorchEngine:
    """Eager PyTorch on an accelerator (the unfolded model, synchronised around each call for timing)."""

    name = "torch"

    def __init__(self, model: nn.Module, dev: torch.device):
        self.model, self.policy, self.dev = model, None, dev
        self.settings = {"engine": "torch", "torch": torch.__version__, "device": str(dev), "batchnorm_folded": False}

    def set_policy(self, policy: ExitPolicy) -> None:
        self.policy = policy

    def early_exit(self, x):
        _sync(self.dev)  # the batch's own preparation is not billed to this call
        r = early_exit_forward(self.model, x, self.policy)
        _sync(self.dev)
        return r[0].cpu(), r[1].cpu()

    def deepest(self, x):
        _sync(self.dev)
        with torch.no_grad():
            z = self.model.forward_until(x, self.model.num_exits - 1)
        _sync(self.dev)
        return z.cpu()


def _report(path, split, data_name, k_all, pol, costs, run, b1, bs, dev, settings, times=None) -> dict:
    exit_at, right = run["exit_at"], run["right"]
    n = len(exit_at)
    leave = leave_costs(costs, pol.computed())
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
    expected = float(sum(leave[k] * int(counts[k]) for k in range(k_all)) / n)
    ref = costs["reference"]["macs"]
    top1, deep = 100.0 * int(right.sum()) / n, 100.0 * run["deepest_right"] / n
    bn = {
        "batch_size": bs,
        "images": n,
        "early_exit_s": run["early_exit_s"],
        "deepest_s": run["deepest_s"],
        "speedup": run["deepest_s"] / run["early_exit_s"],
    }
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
        "engine": settings["engine"],
        "wall_clock_speedup": {"batch_1": b1["speedup"] if b1 else None, "batch_n": bn["speedup"]},
        "timing": {
            "device": str(dev),
            "threads": settings.get("intra_op_threads", torch.get_num_threads()),
            "engine": settings,
            "batch_n": bn,
            "batch_1": b1,
            "note": "model calls only (data loading excluded); the same machine, one run",
        },
    }
    if times:
        ms = leave_times(times, pol.computed())
        exp_ms = float(sum(ms[k] * int(counts[k]) for k in range(k_all)) / n)
        rep.update(piece_times=times, expected_ms=exp_ms, predicted_speedup=times["deepest_ms"] / exp_ms)
        for k, e in enumerate(exits):
            e["leave_ms"] = ms[k]
    return rep
