"""Early-exit policies: when a shallow exit answers, in terms both running and fitting them share.

Policies (the threshold of exit k is in the policy's own unit; `None` = exit k never answers):
  * max_softmax - leave when max_c softmax(z)_c >= threshold;
  * entropy     - leave when the entropy of softmax(z) (nats) <= threshold.
Both are compared as a confidence score, higher = more confident (`confidence`; the entropy is
negated), so one threshold test serves both.

A leaf module: sdtool.early_exit (running a policy) and sdtool.thresholds (fitting one) both import
it, and it imports neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdtool.choices import FALLBACKS, POLICIES
from sdtool.errors import SdtoolError
from sdtool.meta import Thresholds

__all__ = ["FALLBACKS", "POLICIES", "ExitPolicy", "confidence", "values_from_scores"]


@dataclass
class ExitPolicy:
    """Thresholds for the shallow exits (K-1 values, shallow to deep) and what answers the rest."""

    policy: str
    values: list[float | None]
    fallback: str = "deepest"
    ensemble: str = "logits"  # how the ensemble fallback combines logits

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise SdtoolError(f"unknown early-exit policy {self.policy!r}; use one of {', '.join(POLICIES)}")
        if self.fallback not in FALLBACKS:
            raise SdtoolError(f"unknown fallback {self.fallback!r}; use one of {', '.join(FALLBACKS)}")

    def score_thresholds(self) -> list[float]:
        """Thresholds on the confidence score (higher = more confident; +inf = never leave)."""
        return [
            math.inf if v is None else (float(v) if self.policy == "max_softmax" else -float(v)) for v in self.values
        ]

    def computed(self) -> list[bool]:
        """Which exits' outputs are computed on a sample's way through (the last one always)."""
        return [self.fallback == "ensemble" or v is not None for v in self.values] + [True]

    @classmethod
    def stored(cls, thresholds: Thresholds, ensemble: str, fallback: str | None = None) -> ExitPolicy:
        """The policy a checkpoint's fitted thresholds describe (`fallback` overrides the stored one)."""
        return cls(thresholds.policy, list(thresholds.values), fallback or thresholds.fallback, ensemble)

    def to_thresholds(self, fitted_on: dict | None = None) -> Thresholds:
        """What a checkpoint stores of this policy (`fitted_on`: the report of the fit that chose it)."""
        return Thresholds(self.policy, list(self.values), self.fallback, fitted_on)

    def to_meta(self, fitted_on: dict | None = None) -> dict:
        return self.to_thresholds(fitted_on).to_json()


def values_from_scores(policy: str, scores: list[float]) -> list[float | None]:
    """Score thresholds back to the policy's unit (inf -> None, i.e. the exit never answers)."""
    return [None if s == math.inf else (float(s) if policy == "max_softmax" else -float(s)) for s in scores]


def confidence(logits: torch.Tensor, policy: str) -> torch.Tensor:
    """Confidence score per row (N,), higher = more confident: max softmax, or minus the entropy."""
    logp = F.log_softmax(logits.float(), dim=1)
    if policy == "max_softmax":
        return logp.max(dim=1).values.exp()
    return (logp.exp() * logp).sum(dim=1)  # -H(p)
