"""Loss modules: self-distillation (DESIGN.md, "The method, exactly") and external-teacher KD.

Conventions: exits are ordered shallow to deep, z_K / f_K is the deepest exit's logits / pooled
features, `sg` is stop-gradient (`.detach()`). Every module is a small `nn.Module` whose docstring holds
its formula; the only parameters on the loss side are adaptation layers (self-distillation hints,
FitNet), so "optimise / weight-decay / checkpoint the loss" is just `loss.parameters()` /
`loss.state_dict()`.

Two distillation terms with different conventions live here on purpose:
  * `soft_cross_entropy` (self-distillation, as the official code): cross-entropy against the teacher's
    softened distribution, batch mean, **no T^2 factor**.
  * `KDLoss` (external teacher, Hinton et al. 2015): T^2 * KL(teacher || student), batchmean. The T^2
    keeps gradient magnitudes comparable across temperatures; KL and cross-entropy differ only by the
    teacher's entropy, a constant for the student.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdtool.errors import SdtoolError
from sdtool.recipe import SdConfig

_SD = SdConfig()  # the defaults of the sd section, stated once in the recipe schema

MODES = ("self_distill", "deep_supervision", "plain")
TEACHERS = ("deepest", "ensemble")
ENSEMBLES = ("logits", "softmax")


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """softCE_T(s, t) = -sum_c softmax(t/T)_c * log_softmax(s/T)_c, mean over the batch, no T^2.

    The teacher is used as given: callers pass `teacher.detach()` where a stop-gradient is meant.
    """
    # float32 even under autocast: log-probabilities of bf16 logits are too coarse to distil from.
    log_p = F.log_softmax(student_logits.float() / T, dim=1)
    q = F.softmax(teacher_logits.float() / T, dim=1)
    return -(q * log_p).sum(dim=1).mean()


def ensemble_logits(logits: list[Tensor], kind: str = "logits") -> Tensor:
    """Combine every exit's logits (N x C each) into one N x C prediction.

    * "logits" (official): mean of the logits.
    * "softmax": log of the mean of the softmax probabilities. Returning log-probabilities rather
      than probabilities keeps the result usable as logits: argmax, softmax (which gives back the
      mean probabilities exactly) and cross-entropy all work on it unchanged.
    """
    if kind == "logits":
        return torch.stack(logits).mean(dim=0)
    if kind == "softmax":
        # log(mean_k p_k) = logsumexp_k(log p_k) - log K, stable where probabilities underflow.
        log_p = torch.stack([F.log_softmax(z.float(), dim=1) for z in logits])
        return torch.logsumexp(log_p, dim=0) - math.log(len(logits))
    raise SdtoolError(f"unknown ensemble kind {kind!r}; use one of {', '.join(ENSEMBLES)}")


def default_hint_exits(K: int) -> list[int]:
    """The official code's H: every shallow exit except exit K-1 (1-based, shallow to deep).

    K=4 -> [1, 2]; K=3 -> [1]; K<=2 -> [] (the only shallow exit of K=2 is exit K-1).
    The official comment says the *shallowest* exit is skipped, but its loop skips the deepest
    shallow one; we reproduce the code (mmrazor's port agrees: stage-3 hint weight 0).
    """
    return list(range(1, K - 1))


def resolve_hint_exits(K: int, hint_exits: list[int] | None) -> list[int]:
    """Validate user-given hint exits (1-based shallow exits, 1..K-1) or return the default."""
    if hint_exits is None:
        return default_hint_exits(K)
    allowed = f"use values in 1..{K - 1}" if K > 1 else "this model has no shallow exits, use []"
    seen: list[int] = []
    for i in hint_exits:
        if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= K - 1:
            raise SdtoolError(
                f"sd.hint_exits: {i!r} is not a shallow exit of this {K}-exit model; {allowed} "
                f"(or null for the official default {default_hint_exits(K)})"
            )
        if i in seen:
            raise SdtoolError(f"sd.hint_exits: exit {i} is listed twice; list each shallow exit once")
        seen.append(i)
    return sorted(seen)


class SelfDistillLoss(nn.Module):
    """Multi-exit training loss, mode `self_distill`, `deep_supervision` or `plain`.

    self_distill (exits z_1..z_K, pooled features f_1..f_K, labels y):

        L = CE(z_K, y)
          + sum_{i<K} [ alpha * softCE_T(z_i, sg(z_T)) + (1 - alpha) * CE(z_i, y) ]
          + beta * sum_{i in H} || A_i(f_i) - sg(f_K) ||_2

    z_T is z_K (teacher="deepest") or `ensemble_logits(all exits, ensemble)` (teacher="ensemble"),
    always detached. ||.||_2 is `torch.dist`: one L2 norm over the whole N x C_K tensor, not squared
    and not averaged per sample (official code). A_i = Linear(feature_dims[i-1], feature_dims[-1]),
    stored in `self.adapters[str(i)]`; H defaults to `default_hint_exits(K)`. With beta = 0 no
    adapters are built (they would receive no gradient, only weight decay).

    deep_supervision: L = sum_i CE(z_i, y) (no distillation, no adapters).
    plain:            L = CE(z_K, y)       (a single-exit model; only the deepest logits are used).

    Hard CE terms use `label_smoothing`; soft terms never do. `forward` returns (L, parts) where
    parts are the weighted terms as detached 0-dim tensors and sum to L: ce_deepest, and per mode ce_shallow
    ((1-alpha)*sum CE in self_distill, sum CE in deep_supervision), kd (alpha*sum softCE), hint.
    """

    def __init__(
        self,
        mode: str,
        feature_dims: list[int],
        alpha: float = _SD.alpha,
        beta: float = _SD.beta,
        temperature: float = _SD.temperature,
        teacher: str = _SD.teacher,
        hint_exits: list[int] | None = _SD.hint_exits,
        label_smoothing: float = 0.0,
        ensemble: str = _SD.ensemble,
    ):
        super().__init__()
        for name, value, allowed in (
            ("mode", mode, MODES),
            ("teacher", teacher, TEACHERS),
            ("ensemble", ensemble, ENSEMBLES),
        ):
            if value not in allowed:
                raise SdtoolError(f"sd.{name}: {value!r} is not allowed; use one of {', '.join(allowed)}")
        if temperature <= 0:
            raise SdtoolError(f"sd.temperature must be positive, got {temperature}")
        if not feature_dims:
            raise SdtoolError("the model has no exits; a multi-exit loss needs at least one")
        self.mode, self.alpha, self.beta, self.temperature = mode, alpha, beta, temperature
        self.teacher, self.ensemble, self.label_smoothing = teacher, ensemble, label_smoothing
        self.feature_dims = [int(d) for d in feature_dims]
        K = len(self.feature_dims)
        # Only self_distill reads H: the other modes ignore the sd.* knobs, as their defaults are
        # always present in a resolved recipe.
        hints = resolve_hint_exits(K, hint_exits) if mode == "self_distill" else []
        self.hint_exits = hints if beta != 0 else []
        self.adapters = nn.ModuleDict(
            {str(i): nn.Linear(self.feature_dims[i - 1], self.feature_dims[-1]) for i in self.hint_exits}
        )

    @classmethod
    def from_recipe(cls, sd: Any, feature_dims: list[int], label_smoothing: float = 0.0) -> SelfDistillLoss:
        """Build from a recipe's `sd` section (an `SdConfig`) and the model's exit feature widths."""
        return cls(
            sd.mode,
            feature_dims,
            alpha=sd.alpha,
            beta=sd.beta,
            temperature=sd.temperature,
            teacher=sd.teacher,
            hint_exits=sd.hint_exits,
            label_smoothing=label_smoothing,
            ensemble=sd.ensemble,
        )

    def _ce(self, z: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(z.float(), y, label_smoothing=self.label_smoothing)

    def forward(self, logits: list[Tensor], features: list[Tensor], target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        K = len(self.feature_dims)
        zK = logits[-1]
        if self.mode == "plain":
            parts = {"ce_deepest": self._ce(zK, target)}
        else:
            if len(logits) != K:
                raise ValueError(f"loss built for {K} exits but got {len(logits)} logits")
            zero = zK.new_zeros((), dtype=torch.float32)
            parts = {"ce_deepest": self._ce(zK, target), "ce_shallow": zero}
            if self.mode == "deep_supervision":
                for z in logits[:-1]:
                    parts["ce_shallow"] = parts["ce_shallow"] + self._ce(z, target)
            else:
                parts["kd"] = parts["hint"] = zero
                if self.teacher == "deepest":
                    teacher = zK.detach()
                else:
                    teacher = ensemble_logits([z.detach() for z in logits], self.ensemble)
                for z in logits[:-1]:
                    # Skip a zero-weighted term rather than multiply it by 0: 0 * inf would be NaN.
                    if self.alpha != 0:
                        parts["kd"] = parts["kd"] + self.alpha * soft_cross_entropy(z, teacher, self.temperature)
                    if self.alpha != 1:
                        parts["ce_shallow"] = parts["ce_shallow"] + (1 - self.alpha) * self._ce(z, target)
                if self.hint_exits:
                    if len(features) != K:
                        raise ValueError(f"loss built for {K} exits but got {len(features)} features")
                    fK = features[-1].detach().float()
                    for i in self.hint_exits:
                        adapted = self.adapters[str(i)](features[i - 1]).float()
                        parts["hint"] = parts["hint"] + self.beta * torch.dist(adapted, fK)
        total = cast(Tensor, sum(parts.values()))  # parts is never empty, so not sum's start value 0
        # Detached 0-dim tensors, not floats: reading a value would wait for the GPU on every step.
        return total, {k: v.detach().float() for k, v in parts.items()}


class KDLoss(nn.Module):
    """Hinton KD from an external teacher: T^2 * KL(softmax(t/T) || softmax(s/T)), batchmean.

    Unlike the self-distillation term (`soft_cross_entropy`: cross-entropy, no T^2), this is the
    standard Hinton scaling: T^2 keeps its gradients on the scale of the hard-label loss. The teacher
    logits are detached.
    """

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        if temperature <= 0:
            raise SdtoolError(f"distill.temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        T = self.temperature
        log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
        log_p_t = F.log_softmax(teacher_logits.detach().float() / T, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T


class FitNetLoss(nn.Module):
    """FitNets hint (Romero et al. 2015): MSE(resize(conv1x1(f_s)), sg(f_t)), mean over all elements.

    f_s: N x C_s x H_s x W_s student map, f_t: N x C_t x H_t x W_t teacher map. The 1x1 conv adapter
    (C_s -> C_t, training only) is this module's parameter. When spatial sizes differ the adapted
    student map is resized bilinearly to the teacher's, so the target stays untouched.
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.adapter = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)

    def forward(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        s = self.adapter(student_feature)
        t = teacher_feature.detach()
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        return F.mse_loss(s.float(), t.float())


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention of an N x C x H x W map: mean_c |f|^p, N x H x W (not normalised)."""
    return feature.float().abs().pow(p).mean(dim=1)


class ATLoss(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis 2017), as their reference code:

        a(f) = normalize_L2(flatten(mean_c |f|^p)),   L = mean((a(f_s) - a(sg(f_t)))^2)

    Channel counts may differ (the map averages over channels); if the spatial sizes differ the
    student's attention map is resized bilinearly to the teacher's before normalising. The paper
    weights this term by beta/2 with beta = 1000; scale it with `distill.feature_weight`.
    """

    def __init__(self, p: float = 2.0):
        super().__init__()
        self.p = p

    def forward(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        a_s = attention_map(student_feature, self.p)
        a_t = attention_map(teacher_feature.detach(), self.p)
        if a_s.shape[-2:] != a_t.shape[-2:]:
            a_s = F.interpolate(a_s.unsqueeze(1), size=a_t.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
        a_s = F.normalize(a_s.flatten(1), dim=1)
        a_t = F.normalize(a_t.flatten(1), dim=1)
        return (a_s - a_t).pow(2).mean()
