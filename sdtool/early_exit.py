"""Dynamic inference that really stops: each sample leaves at the first exit confident enough.

A batch is driven exit by exit with `model.stages_to_exit(h, k)` and `model.exit_output(k, h)`; the
rows that leave at exit k are written to the output and dropped from `h` (`index_select`) before the
next stages run, so later stages only see the samples still undecided. A batch of one simply stops.

Policies (max_softmax, entropy; sdtool.exit_policy) say when a shallow exit answers. Samples no
shallow exit takes are answered by the deepest exit, or by the ensemble of all exits
(`losses.ensemble_logits` with the checkpoint's ensemble kind), which needs every exit computed.

Costs: a sample leaving at exit k costs the stages up to exit k's stage plus the attention, head and
classifier of every exit computed on its way (exits 1..k). With the deepest fallback an exit that
never answers is skipped altogether (its head is not run and not counted); with the ensemble
fallback every head is run, since the ensemble needs them.

`sdtool eval --early-exit` (fitting, engines, timing) lives in sdtool.exit_eval; the ONNX Runtime
twin of `early_exit_forward` in sdtool.runtime.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import torch

from sdtool.errors import SdtoolError

# The policies live in the leaf module sdtool.exit_policy (shared with sdtool.thresholds); their names
# stay importable from here.
from sdtool.exit_policy import FALLBACKS, POLICIES, ExitPolicy, confidence, values_from_scores
from sdtool.losses import ensemble_logits

if TYPE_CHECKING:
    from sdtool.models.multi_exit import MultiExitNet

__all__ = [
    "FALLBACKS",
    "POLICIES",
    "ExitPolicy",
    "confidence",
    "early_exit_forward",
    "leave_costs",
    "leave_times",
    "values_from_scores",
]


def leave_costs(costs: dict, computed: list[bool]) -> list[int]:
    """MACs of a sample that leaves at each exit, given which exits' heads are computed (profile's costs)."""
    out, heads = [], 0
    for e, c in zip(costs["exits"], computed, strict=True):
        heads += e["head_macs"] if c else 0
        out.append(e["stages_macs"] + heads)
    return out


def leave_times(times: dict, computed: list[bool]) -> list[float]:
    """Measured ms per image of a sample that leaves at each exit (an engine's `piece_times`)."""
    stages = list(itertools.accumulate(times["stages_ms"]))
    out, heads = [], 0.0
    for k, c in enumerate(computed):
        heads += times["head_ms"][k] if c else 0.0
        out.append(stages[k] + heads)
    return out


@torch.no_grad()
def early_exit_forward(model: MultiExitNet, x: torch.Tensor, policy: ExitPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """Real early exit on a batch: (logits (N, classes), exit index (N,), 0-based; K-1 = the fallback).

    Each row's logits equal those of the all-exits forward for the exit that answered it (or the
    ensemble of all exits for the ensemble fallback), up to floating-point noise from batch size.
    """
    k_all = model.num_exits
    if len(policy.values) != k_all - 1:
        raise SdtoolError(
            f"the thresholds name {len(policy.values)} shallow exits but the model has "
            f"{k_all - 1}; refit them for this model"
        )
    thr = policy.score_thresholds()
    keep_all = policy.fallback == "ensemble"
    n = x.shape[0]
    out: torch.Tensor | None = None
    exit_at = torch.full((n,), k_all - 1, dtype=torch.long, device=x.device)
    rows = torch.arange(n, device=x.device)  # original positions of the rows still in h
    h = x
    seen: list[torch.Tensor] = []  # earlier exits' logits of the remaining rows (ensemble fallback only)
    for k in range(k_all):
        h = model.stages_to_exit(h, k)
        last = k == k_all - 1
        if not (last or keep_all or math.isfinite(thr[k])):
            continue  # this exit never answers and nobody needs its logits: skip its head
        z, _ = model.exit_output(k, h)
        if out is None:
            out = torch.empty(n, z.shape[1], dtype=z.dtype, device=z.device)
        if last:
            out[rows] = ensemble_logits(seen + [z], policy.ensemble).to(z.dtype) if keep_all else z
            break
        if keep_all:
            seen.append(z)
        leave = confidence(z, policy.policy) >= thr[k]
        n_leave = int(leave.sum())
        if n_leave == 0:
            continue
        out[rows[leave]] = z[leave]
        exit_at[rows[leave]] = k
        if n_leave == len(rows):
            break  # everyone left (batch 1: the network simply stops here)
        stay = (~leave).nonzero().squeeze(1)
        h, rows = h.index_select(0, stay), rows.index_select(0, stay)
        seen = [s.index_select(0, stay) for s in seen]
    assert out is not None  # allocated at the first exit computed, and the last exit always is
    return out, exit_at
