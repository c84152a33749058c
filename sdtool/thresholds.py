"""Fitting early-exit thresholds on held-out logits (the validation split, never the test split).

Every exit's logits are collected once with the all-exits forward; early exit is then simulated
exactly on them (which exit answers each sample, whether it is right, what it cost), so a candidate
set of thresholds is scored in a few vectorised numpy operations.

Search. Thresholds are chosen per exit among candidates: the 0, 1, ..., 100th percentiles of that
exit's confidence on the fitting data (so every candidate changes which samples leave) plus "never
answer". Coordinate descent then changes one exit's threshold at a time to the candidate that best
improves a lexicographic key, sweeping shallow to deep until a full round changes nothing:
  * `max_drop` (a): (shortfall below deepest top-1 - max_drop, expected MACs, -top-1);
  * `budget`   (b): (MACs above budget x reference, -top-1, expected MACs).
The shortfall / excess term comes first, so a feasible start stays feasible and an infeasible one
moves towards feasibility. It starts twice - from "no shallow exit answers" (the deepest exit alone)
and from the best point of a shared-threshold sweep (one confidence threshold for all exits) - and
keeps the better result; the key strictly decreases, so it always ends. Coordinate descent finds a
local optimum, not a proven global one; the shared start makes it at least as good as the best
single shared threshold.

Costs. With `cost="macs"` (default) a sample's cost is the MACs of what it ran (profile's
counts); with `cost="latency"` it is the sum of the measured per-image times of the pieces on its
way - the stages up to its exit and the heads of the exits tried - in the engine and at the batch
size that will run it (`engines.*.piece_times`), and the budget is a fraction of the deepest exit's
measured time. Either way the result reports both expected MACs and, when times are known, the
expected time.

Fitted thresholds are tuned to the fitting data; expect the test split to land near, not exactly
on, the constraint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sdtool.choices import COSTS
from sdtool.errors import SdtoolError
from sdtool.exit_policy import confidence, values_from_scores
from sdtool.losses import ensemble_logits

N_QUANTILES = 100


@dataclass
class ExitTable:
    """What the simulation needs, from all exits' logits on the fitting data."""

    scores: np.ndarray  # (K-1, N) confidence of each shallow exit, higher = more confident
    correct: np.ndarray  # (K+1, N) bool: exit k's prediction is right (k < K); row K: the ensemble's
    stages_macs: np.ndarray  # (K,) MACs of the stages up to each exit's stage
    head_macs: np.ndarray  # (K,) MACs of each exit's attention + head + classifier
    reference_macs: float  # the deepest exit alone
    fallback: str  # deepest | ensemble
    stages_ms: np.ndarray | None = None  # (K,) measured ms per image of the stages up to each exit
    head_ms: np.ndarray | None = None  # (K,) measured ms per image of each exit's head
    reference_ms: float | None = None  # measured ms per image of the deepest exit alone
    cost: str = "macs"  # what the objective counts: macs | latency

    @property
    def num_exits(self) -> int:
        return len(self.stages_macs)

    @property
    def n(self) -> int:
        return self.correct.shape[1]

    def costs(self, cost: str | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """(stages (K,), heads (K,), reference) in MACs or in ms per image."""
        if (cost or self.cost) == "macs":
            return self.stages_macs, self.head_macs, self.reference_macs
        if self.stages_ms is None or self.head_ms is None or self.reference_ms is None:
            raise SdtoolError("latency costs were not measured for this table")
        return self.stages_ms, self.head_ms, float(self.reference_ms)


def make_table(
    logits: list[torch.Tensor],
    y: torch.Tensor,
    costs: dict,
    policy: str,
    fallback: str,
    ensemble: str,
    times: dict | None = None,
    cost: str = "macs",
) -> ExitTable:
    """`costs`: profile.exit_costs; `times`: an engine's piece_times (cumulative stages are summed here)."""
    if cost not in COSTS:
        raise SdtoolError(f"unknown cost {cost!r}; use one of {', '.join(COSTS)}")
    if cost == "latency" and times is None:
        raise SdtoolError("--cost latency needs measured piece times")
    scores = np.stack([confidence(z, policy).double().numpy() for z in logits[:-1]])
    correct = [(z.argmax(1) == y).numpy() for z in logits]
    correct.append((ensemble_logits(logits, ensemble).argmax(1) == y).numpy())
    ex = costs["exits"]
    t = ExitTable(
        scores=scores,
        correct=np.stack(correct),
        fallback=fallback,
        cost=cost,
        stages_macs=np.array([e["stages_macs"] for e in ex], dtype=np.float64),
        head_macs=np.array([e["head_macs"] for e in ex], dtype=np.float64),
        reference_macs=float(costs["reference"]["macs"]),
    )
    if times is not None:
        if len(times["stages_ms"]) != t.num_exits or len(times["head_ms"]) != t.num_exits:
            raise SdtoolError("the measured piece times do not match the model's exits")
        t.stages_ms = np.cumsum(np.asarray(times["stages_ms"], dtype=np.float64))
        t.head_ms = np.asarray(times["head_ms"], dtype=np.float64)
        t.reference_ms = float(times["deepest_ms"])
    return t


def simulate(t: ExitTable, thr: np.ndarray, cost: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score C candidate threshold vectors at once.

    thr: (C, K-1) score thresholds (+inf = the exit never answers). Returns (top-1 % (C,),
    expected cost (C,) in the table's unit (or `cost`'s), exit index (C, N), with K-1 meaning the
    fallback answered).
    """
    k_all, n = t.num_exits, t.n
    c = thr.shape[0]
    exit_at = np.full((c, n), k_all - 1, dtype=np.int64)
    undecided = np.ones((c, n), dtype=bool)
    for k in range(k_all - 1):
        leave = undecided & (t.scores[k][None, :] >= thr[:, k : k + 1])
        exit_at[leave] = k
        undecided &= ~leave
    last = t.correct[k_all] if t.fallback == "ensemble" else t.correct[k_all - 1]
    rows = np.vstack([t.correct[: k_all - 1], last[None]])  # (K, N) correctness per answering exit
    right = rows[exit_at, np.arange(n)[None, :]]  # (C, N)
    return 100.0 * right.mean(axis=1), expected_cost(t, thr, exit_at, cost), exit_at


def expected_cost(t: ExitTable, thr: np.ndarray, exit_at: np.ndarray, cost: str | None = None) -> np.ndarray:
    """Mean cost per sample (C,) of thresholds thr (C, K-1) whose exits are exit_at (C, N)."""
    stages, heads, _ = t.costs(cost)
    computed = np.ones((thr.shape[0], t.num_exits), dtype=bool)
    if t.fallback != "ensemble":
        computed[:, :-1] = np.isfinite(thr)
    leave_cost = stages[None, :] + np.cumsum(computed * heads[None, :], axis=1)  # (C, K)
    return np.take_along_axis(leave_cost, exit_at, axis=1).mean(axis=1)


def candidates(t: ExitTable) -> list[np.ndarray]:
    """Per shallow exit: its confidence percentiles (observed values, deduplicated) and +inf."""
    q = np.linspace(0, 1, N_QUANTILES + 1)
    return [np.unique(np.append(np.quantile(s, q, method="lower"), np.inf)) for s in t.scores]


def _keys(objective: str, limit: float, acc: np.ndarray, macs: np.ndarray) -> list[np.ndarray]:
    if objective == "max_drop":  # limit = the accuracy target
        return [np.maximum(0.0, np.round(limit - acc, 9)), macs, -acc]
    return [np.maximum(0.0, macs - limit), -acc, macs]  # limit = the MACs budget


def _best(keys: list[np.ndarray]) -> int:
    return int(np.lexsort(keys[::-1])[0])


def _descend(
    t: ExitTable, thr: np.ndarray, cands: list[np.ndarray], objective: str, limit: float, max_rounds: int = 50
) -> tuple[np.ndarray, tuple]:
    acc, macs, _ = simulate(t, thr[None])
    key = tuple(float(k[0]) for k in _keys(objective, limit, acc, macs))
    for _ in range(max_rounds):
        changed = False
        for k in range(t.num_exits - 1):
            trial = np.repeat(thr[None], len(cands[k]), axis=0)
            trial[:, k] = cands[k]
            acc, macs, _ = simulate(t, trial)
            keys = _keys(objective, limit, acc, macs)
            i = _best(keys)
            new = tuple(float(kk[i]) for kk in keys)
            if new < key:
                thr, key, changed = trial[i].copy(), new, True
        if not changed:
            break
    return thr, key


def shared_sweep(t: ExitTable, n: int = N_QUANTILES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One threshold for every shallow exit: (thresholds (M,), top-1 (M,), MACs (M,)), shallow to deep."""
    pooled = t.scores.ravel()
    levels = np.unique(np.append(np.quantile(pooled, np.linspace(0, 1, n + 1), method="lower"), np.inf))
    thr = np.repeat(levels[:, None], t.num_exits - 1, axis=1)
    acc, macs, _ = simulate(t, thr)
    return levels, acc, macs


def fit(t: ExitTable, policy: str, max_drop: float | None = None, budget: float | None = None) -> dict:
    """Fit thresholds for objective (a) `max_drop` (points) or (b) `budget` (fraction of the reference
    cost: MACs, or the deepest exit's measured time with `t.cost == "latency"`)."""
    if (max_drop is None) == (budget is None):
        raise SdtoolError("fit thresholds for either --max-drop D or --budget F, not both")
    if max_drop is not None and max_drop < 0:
        raise SdtoolError(f"--max-drop must be >= 0 percentage points, got {max_drop}")
    if budget is not None and not budget > 0:
        raise SdtoolError(f"--budget must be a positive fraction of the reference cost, got {budget}")
    deepest = 100.0 * float(t.correct[t.num_exits - 1].mean())
    reference = t.costs()[2]
    if max_drop is not None:
        objective, limit = "max_drop", deepest - max_drop
    else:
        assert budget is not None  # exactly one of the two is given (checked above)
        objective, limit = "budget", budget * reference
    cands = candidates(t)
    levels, acc, cost = shared_sweep(t)
    i = _best(_keys(objective, limit, acc, cost))
    starts = [np.full(t.num_exits - 1, np.inf), np.full(t.num_exits - 1, levels[i])]
    thr, key = min((_descend(t, s, cands, objective, limit) for s in starts), key=lambda r: r[1])
    acc, _, exit_at = simulate(t, thr[None])
    macs = float(expected_cost(t, thr[None], exit_at, "macs")[0])
    counts = np.bincount(exit_at[0], minlength=t.num_exits)
    res = {
        "objective": objective,
        "max_drop": max_drop,
        "budget": budget,
        "cost": t.cost,
        "n": t.n,
        "deepest_top1": deepest,
        "top1": float(acc[0]),
        "accuracy_drop": deepest - float(acc[0]),
        "expected_macs": macs,
        "macs_fraction": macs / t.reference_macs,
        "macs_speedup": t.reference_macs / macs,
        "feasible": key[0] == 0.0,
        "exit_fractions": (counts / t.n).tolist(),
        "values": values_from_scores(policy, thr.tolist()),
    }
    if t.stages_ms is not None and t.reference_ms is not None:  # measured times: both are set together
        ms = float(expected_cost(t, thr[None], exit_at, "latency")[0])
        res.update(
            expected_ms=ms,
            reference_ms=t.reference_ms,
            time_fraction=ms / t.reference_ms,
            predicted_speedup=t.reference_ms / ms,
        )
    if objective == "max_drop":
        res["target_top1"] = limit
    else:
        res["budget_" + ("macs" if t.cost == "macs" else "ms")] = limit
    return res


def sweep(t: ExitTable, policy: str, n_budgets: int = 16) -> dict:
    """(c) The accuracy-vs-MACs curve: a shared-threshold sweep, per-exit fits over a grid of budgets,
    and every exit alone. MACs as fractions of the reference cost, accuracy in percent."""
    if t.cost != "macs":  # the sweep is drawn in MACs, whatever the fit counted
        import dataclasses

        t = dataclasses.replace(t, cost="macs")
    ref = t.reference_macs
    levels, acc, macs = shared_sweep(t)
    shared = [
        {
            "threshold": values_from_scores(policy, [float(v)])[0],
            "top1": float(a),
            "expected_macs": float(m),
            "macs_fraction": float(m) / ref,
        }
        for v, a, m in zip(levels, acc, macs, strict=True)
    ]
    cheapest = float(macs.min()) / ref
    fitted = []
    for b in np.linspace(cheapest, 1.0, n_budgets):
        r = fit(t, policy, budget=float(b))
        fitted.append(
            {
                "budget": float(b),
                "values": r["values"],
                "top1": r["top1"],
                "expected_macs": r["expected_macs"],
                "macs_fraction": r["macs_fraction"],
            }
        )
    alone = [
        {
            "exit": k + 1,
            "top1": 100.0 * float(t.correct[k].mean()),
            "macs_fraction": float(t.stages_macs[k] + t.head_macs[k]) / ref,
        }
        for k in range(t.num_exits)
    ]
    return {
        "policy": policy,
        "fallback": t.fallback,
        "n": t.n,
        "reference_macs": ref,
        "deepest_top1": alone[-1]["top1"],
        "shared": shared,
        "fitted": fitted,
        "exits_alone": alone,
    }
