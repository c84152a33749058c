"""Which early-exit thresholds run: fitted on the validation split, or the checkpoint's stored ones.

The one threshold choice of `eval --early-exit` and `export --early-exit` (and the pipeline's eval
section): `FitOptions` says how, `ExitContext` what the fit runs on, `choose_policy` decides. The
search itself is sdtool.thresholds.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar, cast

import torch

from sdtool.choices import COSTS
from sdtool.errors import SdtoolError
from sdtool.exit_policy import ExitPolicy
from sdtool.meta import CheckpointMeta, ValSplit

if TYPE_CHECKING:
    from sdtool.checkpoint import Checkpoint
    from sdtool.data import DataBundle
    from sdtool.engines import InferenceEngine
    from sdtool.recipe import DataConfig

T = TypeVar("T")

SEARCH_NOTE = (
    "per-exit thresholds from confidence percentiles, coordinate descent from two starts "
    "(deepest exit alone; best shared threshold)"
)


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

    def given(self) -> bool:
        """Whether any option differs from its default (an error where thresholds are not chosen)."""
        return self != FitOptions()

    def check(self, out: str | None = None) -> None:
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


def _quiet(msg: str) -> None:
    pass


@dataclass
class ExitContext:
    """What choosing (and running) early exit on a checkpoint's data needs besides the options: the data
    (`cfg`, `bundle`; a fit uses its validation split), the device and batch size of its passes, the
    exits' costs (profile.exit_costs), the engine that runs and times it (it measures the piece times of
    `--cost latency`; only CPU engines can), where log lines go, and whether progress bars are shown."""

    cfg: DataConfig
    bundle: DataBundle
    device: torch.device
    batch_size: int
    costs: dict
    engine: InferenceEngine | None = None
    log: Callable[[str], None] = _quiet
    progress: bool = True


@dataclass
class PolicyChoice:
    """The policy early exit runs, the fit report and sweep report when it was fitted, and warnings.

    `sweep_table` is the sweep still to be written to `sweep["dir"]`: the command writes it together
    with its main output (`written_with_sweep`), so a failure leaves neither."""

    policy: ExitPolicy
    fit: dict | None = None
    sweep: dict | None = None
    warnings: list[str] = field(default_factory=list)
    sweep_table: dict | None = field(default=None, repr=False)


def written_with_sweep(choice: PolicyChoice, write: Callable[[], T]) -> T:
    """Run `write` (the command's main output; it may write nothing) and write the chosen sweep with it:
    the sweep files are staged under temporary names first and renamed into place only after `write`
    succeeded, so a failure of either leaves neither."""
    from sdtool import report_exit
    from sdtool.outputs import staged_write

    if choice.sweep is None or choice.sweep_table is None:
        return write()
    table, folder = choice.sweep_table, choice.sweep["dir"]
    return staged_write(lambda st: report_exit.stage_sweep(table, folder, st), write)


def _split_info(meta: CheckpointMeta, bundle: DataBundle, cfg: DataConfig) -> tuple[dict, list[str]]:
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


def choose_policy(path: str, ckpt: Checkpoint, opts: FitOptions, ctx: ExitContext | None = None) -> PolicyChoice:
    """The policy early exit runs for checkpoint `ckpt` (loaded from `path`): fitted on the validation
    split (`opts.fit`, which needs `ctx`) or the checkpoint's own."""
    meta = ckpt.meta
    if opts.fit:
        if ctx is None:
            raise ValueError("fitting thresholds needs an ExitContext")  # a caller's bug, not a user error
        return _fit_policy(path, ckpt, opts, ctx)
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
    return PolicyChoice(ExitPolicy.stored(stored, meta.ensemble, opts.fallback))


def _fit_policy(path: str, ckpt: Checkpoint, opts: FitOptions, ctx: ExitContext) -> PolicyChoice:
    from sdtool import report_exit
    from sdtool import thresholds as th
    from sdtool.evaluate import collect_logits

    cfg, bundle, bs = ctx.cfg, ctx.bundle, ctx.batch_size
    if not cfg.val_size:
        raise SdtoolError(
            f"{path} was trained without a validation split (data.val_size=0) and thresholds are "
            "never fitted on the test split; pass --set data.val_size=0.1 to hold one out of the "
            "training images (warning: they overlap what the model trained on, so the fit will be "
            "optimistic) or retrain with data.val_size set"
        )
    ens = ckpt.meta.ensemble
    pol_name, fb = opts.policy or "max_softmax", opts.fallback or "deepest"
    n_val = len(cast("Sized", bundle.val))  # torch's Dataset declares no __len__; sdtool's data sets all have one
    ctx.log(f"fitting thresholds on the validation split ({n_val} images)")
    loader = bundle.loader("val", bs, shuffle=False, seed=0, workers=cfg.workers)
    logits, y = collect_logits(
        ckpt.model, loader, bundle.prepare, ctx.device, progress=ctx.progress, label="scoring val split"
    )
    times = None
    if opts.cost == "latency":
        if ctx.engine is None or not ctx.engine.times_pieces:
            raise SdtoolError("--cost latency measures times on the CPU engines; add --device cpu")
        ctx.log(f"timing each exit's stages and head ({ctx.engine.name}, batch {bs})")
        times = ctx.engine.piece_times(bundle.input_size, bs, progress=ctx.progress)
    table = th.make_table(logits, y, ctx.costs, pol_name, fb, ens, times=times, cost=opts.cost)
    context, warnings = _split_info(ckpt.meta, bundle, cfg)
    fit_rep = {**th.fit(table, pol_name, max_drop=opts.max_drop, budget=opts.budget), **context}
    if times is not None:
        fit_rep["piece_times"] = times
    if not fit_rep["feasible"]:
        warnings.append("no thresholds meet the constraint on the validation split; the closest ones are used")
    sweep_rep = sw = None
    if opts.sweep_out:  # written by the command with its main output (written_with_sweep), not here
        sw = th.sweep(table, pol_name)
        keys = ("values", "top1", "macs_fraction", "objective", "max_drop", "budget")
        sw["chosen"] = {k: fit_rep[k] for k in keys}
        sweep_rep = report_exit.sweep_report(opts.sweep_out)
    return PolicyChoice(ExitPolicy(pol_name, fit_rep["values"], fb, ens), fit_rep, sweep_rep, warnings, sw)


def stored_fit(fit_rep: dict | None) -> dict | None:
    """What a checkpoint or bundle keeps of a fit (the piece times are a measurement of this machine, kept in
    the report)."""
    return None if fit_rep is None else {k: v for k, v in fit_rep.items() if k != "piece_times"}
