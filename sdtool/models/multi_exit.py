"""MultiExitNet: a backbone cut into stages, with an exit (attention, head, classifier) after some.

Layout (K exits, shallow to deep; the last exit sits after the last stage and has no attention):

    x -> stages[0] -> ... -> stages[s_1] -> attention[0] -> heads[0] -> classifiers[0]  (exit 1)
                          -> ... -> stages[-1] -> heads[K-1] (pooling) -> classifiers[K-1] (exit K)

Attention after a stage feeds only that exit's head: the next stage receives the stage output, not the
attended one (as the official code does). `forward` computes every exit, because training, pruning
and profiling must see every module; `forward_until` and `exit_iter` compute only what is needed, which
is what makes early exit save real time and lets a truncated exit stand alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from sdtool.errors import SdtoolError
from sdtool.models.blocks import Attention, make_head


class MultiExitNet(nn.Module):
    # Declared for type checkers (nn.Module's attribute lookup is otherwise untyped). `spec` is set by
    # the registry when the model is built: the builder's name and arguments, what rebuilds it.
    spec: dict[str, Any]
    stages: nn.ModuleList
    attention: nn.ModuleList
    heads: nn.ModuleList
    classifiers: nn.ModuleList
    num_classes: int

    def __init__(
        self,
        stages: Sequence[nn.Module],
        widths: list[int],
        num_classes: int,
        exits: list[int] | None = None,
        head: str = "byot",
        attention: bool = True,
        strides: list[int] | None = None,
        stage_names: list[str] | None = None,
    ):
        """stages: the backbone cut into sequential pieces; widths: each stage's output channels.

        exits: 1-based stage indices followed by an exit; None = after every stage. The last stage
        always gets the final exit (global pooling + the backbone's own classifier).
        strides: each stage's downsampling factor (output side = input side / stride); the byot heads
        follow it. None = 2 for every stage after the first (the ResNet layout).
        stage_names: what each stage holds, e.g. "stem+layer1[:2]" (documentation; `model.spec`
        records it for backbones whose stages are not the paper's).
        """
        super().__init__()
        n = len(stages)
        if len(widths) != n:
            raise ValueError("one width per stage is needed")
        exits = sorted(set(exits if exits is not None else range(1, n + 1)) | {n})
        if exits[0] < 1 or exits[-1] > n:
            raise SdtoolError(f"model.exits must name stages between 1 and {n}, got {exits}")
        self.stages = nn.ModuleList(stages)
        self.exit_stages = [e - 1 for e in exits]  # 0-based stage index of each exit
        self.num_classes = num_classes
        self.strides = list(strides) if strides is not None else [1] + [2] * (n - 1)
        self.stage_names = list(stage_names) if stage_names is not None else None
        if len(self.strides) != n or (self.stage_names is not None and len(self.stage_names) != n):
            raise ValueError("one stride and one name per stage are needed")
        att: list[nn.Module] = []
        heads: list[nn.Module] = []
        fcs: list[nn.Module] = []
        for s in self.exit_stages:
            if s == n - 1:  # final exit: the backbone's own pooling and classifier
                att.append(nn.Identity())
                h, d = make_head("pool", [], widths[s])
            else:
                att.append(Attention(widths[s]) if attention else nn.Identity())
                h, d = make_head(head, widths[s + 1 :], widths[s], self.strides[s + 1 :])
            heads.append(h)
            fcs.append(nn.Linear(d, num_classes))
        self.attention = nn.ModuleList(att)
        self.heads = nn.ModuleList(heads)
        self.classifiers = nn.ModuleList(fcs)

    @property
    def feature_dims(self) -> list[int]:
        """Pooled feature width of each exit, shallow to deep (derived, so it follows pruning)."""
        return [cast(nn.Linear, fc).in_features for fc in self.classifiers]

    @property
    def num_exits(self) -> int:
        return len(self.exit_stages)

    def exit_output(self, k: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exit k (0-based) on its stage output h: (logits (N, classes), pooled feature (N, d_k))."""
        f = self.heads[k](self.attention[k](h))
        return self.classifiers[k](f), f

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """All exits: (logits, features), each a list shallow to deep."""
        logits, feats = [], []
        k = 0
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if k < self.num_exits and self.exit_stages[k] == s:
                z, f = self.exit_output(k, x)
                logits.append(z)
                feats.append(f)
                k += 1
        return logits, feats

    def forward_until(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Logits of exit k (0-based) alone, computing only the stages it needs."""
        if not 0 <= k < self.num_exits:
            raise SdtoolError(f"exit {k + 1} does not exist; this model has exits 1..{self.num_exits}")
        for stage in self.stages[: self.exit_stages[k] + 1]:
            x = stage(x)
        return self.exit_output(k, x)[0]

    def stages_to_exit(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """Run the stages between exit k-1 and exit k (0-based); h is the input (k = 0) or exit k-1's stage output.

        Early exit drives the network with this: after each exit, the rows that left are dropped from h.
        """
        start = 0 if k == 0 else self.exit_stages[k - 1] + 1
        for s in range(start, self.exit_stages[k] + 1):
            h = self.stages[s](h)
        return h
