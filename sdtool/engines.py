"""Inference engines for every place sdtool measures a time: eager PyTorch and ONNX Runtime.

An engine runs one multi-exit network three ways on prepared (normalized, NCHW float) CPU batches:
`early_exit(x)` (real early exit with the engine's policy), `deepest(x)` (the deepest exit alone,
the reference) and `piece_times(...)` (per-image time of each exit's stages and of its head, the cost
table of latency-aware fitting). Results come back as torch tensors so the callers stay the same.

  * torch        - eager PyTorch on the model with batch norm folded into the preceding convolution
                   (torch.fx, per stage and per head: an eval-mode BN after a conv is an affine map, so
                   the fold changes results only by rounding) in channels_last memory format - the
                   honest optimised eager baseline; `fold_bn=False` gives the plain eager model.
  * onnxruntime  - the graphs of an early-exit bundle (sdtool.onnx_graphs), driven by
                   sdtool.runtime.EarlyExitSession: one session per exit step, rows dropped between
                   steps, spinning thread pools off.

`settings` says what produced a time (engine, threads, versions); every timing's JSON carries it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from sdtool.choices import ENGINES
from sdtool.errors import SdtoolError
from sdtool.meta import InputSpec

if TYPE_CHECKING:
    from sdtool.exit_policy import ExitPolicy
    from sdtool.models.multi_exit import MultiExitNet
    from sdtool.runtime import EarlyExitSession


class InferenceEngine(Protocol):
    """What timing early exit needs of an engine (TorchEngine, OrtEngine, exit_eval's accelerator one).
    Engines with `times_pieces` (the CPU ones) also measure `piece_times(size, batch, warmup, repeats)`."""

    name: str
    settings: dict[str, Any]
    times_pieces: bool

    def set_policy(self, policy: ExitPolicy) -> None: ...

    def early_exit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def deepest(self, x: torch.Tensor) -> torch.Tensor: ...

    def piece_times(
        self, size: int, batch: int, warmup: int = 2, repeats: int = 5, progress: bool = True
    ) -> dict[str, Any]:
        """Per-image time of each exit's stages and head (only where `times_pieces`)."""
        ...


def check_engine(name: str) -> str:
    if name not in ENGINES:
        raise SdtoolError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}")
    return name


def fold_batchnorm(model: nn.Module) -> MultiExitNet:
    """A copy of a multi-exit net with every eval-mode BatchNorm that follows a Conv2d folded into it.

    Each stage, attention module and head is traced with torch.fx and fused on its own (the multi-exit
    structure and `forward_until` / `stages_to_exit` stay); a part that does not trace stays unfused.
    """
    from torch.fx.experimental.optimization import fuse

    net = cast("MultiExitNet", copy.deepcopy(model).eval())

    def fused(m: nn.Module) -> nn.Module:
        if not any(isinstance(c, nn.BatchNorm2d) for c in m.modules()):
            return m
        try:
            return fuse(m, inplace=True)
        except Exception:  # noqa: BLE001 - not traceable: keep it as it is (still correct, just unfused)
            return m

    for group in (net.stages, net.attention, net.heads):
        for i in range(len(group)):
            group[i] = fused(group[i])
    return net


def _times_report(
    batch: int, stages: list[list[float]], heads: list[dict], deep: list[float], repeats: int, settings: dict[str, Any]
) -> dict[str, Any]:
    """What `piece_times` returns, in every engine: per-image ms of each exit's stages and head, and of the
    deepest exit alone (medians; `_min` / `_max`: the fastest and slowest repeat), with the engine's settings.

    stages, deep: ms per image of each repeat; heads: a `timing.spread("head_ms", ...)` per exit."""
    from sdtool.timing import spread, spread_lists

    return {
        "batch": batch,
        **spread_lists("stages_ms", stages),
        **{k: [h[k] for h in heads] for k in ("head_ms", "head_ms_min", "head_ms_max")},
        **spread("deepest_ms", deep),
        "unit": "ms per image",
        "statistic": f"median of {repeats}",
        "spread": "min and max over the repeats (_min, _max)",
        **settings,
    }


def _ms_per_image(fn: Callable[[], object], n: int, warmup: int, repeats: int, tick: Callable[[], None]) -> list[float]:
    """ms per image of each repeat of `fn` (a batch of `n`)."""
    from sdtool.timing import repeat_seconds

    return [1000.0 * t / n for t in repeat_seconds(fn, torch.device("cpu"), warmup, repeats, tick)]


def _pieces_bar(engine: str, k_all: int, batch: int, runs: int, progress: bool):
    """The progress bar of a `piece_times`: `runs` timed functions, each run warmup + repeats times."""
    from sdtool.progress import progress as bar

    return bar(f"timing {k_all} exits' pieces ({engine}), batch {batch}", runs, progress)


class TorchEngine:
    times_pieces = True
    name = "torch"

    def __init__(self, model: nn.Module, policy=None, fold_bn: bool = True, channels_last: bool | None = None):
        """fold_bn: fold batch norm into convolutions; channels_last: None = as `fold_bn` (the optimised
        engine uses channels_last; with the fold it ran width-16 ResNet18s at 0.98-2.05x the images/s of
        the plain eager model on a 2-core CPU at batch 1 and 256; that baseline stays contiguous)."""
        from sdtool.cpu import runtime_settings

        self.model = fold_batchnorm(model) if fold_bn else cast("MultiExitNet", model.eval())
        self.channels_last = fold_bn if channels_last is None else channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.policy = policy
        self.settings = {
            "engine": "torch",
            "torch": torch.__version__,
            **runtime_settings(),
            "batchnorm_folded": fold_bn,
            "memory_format": "channels_last" if self.channels_last else "contiguous",
        }

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def num_exits(self) -> int:
        return self.model.num_exits

    def set_policy(self, policy) -> None:
        self.policy = policy

    @torch.no_grad()
    def early_exit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from sdtool.early_exit import early_exit_forward

        return early_exit_forward(self.model, self._in(x), self.policy)

    @torch.no_grad()
    def deepest(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_until(self._in(x), self.model.num_exits - 1)

    @torch.no_grad()
    def piece_times(self, size: int, batch: int, warmup: int = 2, repeats: int = 5, progress: bool = True) -> dict:
        """Per-image ms at `batch` of each exit's stages (from the previous exit's stage output) and of
        its attention + head + classifier; and of the deepest exit alone (see `_times_report`)."""
        from sdtool.timing import spread

        m = self.model
        x = self._in(torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)))
        stages, heads, h = [], [], x
        with _pieces_bar("torch", m.num_exits, batch, (2 * m.num_exits + 1) * (warmup + repeats), progress) as b:
            for k in range(m.num_exits):
                h_in = h
                stages.append(_ms_per_image(partial(m.stages_to_exit, h_in, k), batch, warmup, repeats, b.advance))
                h = m.stages_to_exit(h_in, k)
                t = _ms_per_image(partial(m.exit_output, k, h), batch, warmup, repeats, b.advance)
                heads.append(spread("head_ms", t))
            deep = _ms_per_image(lambda: self.deepest(x), batch, warmup, repeats, b.advance)
        return _times_report(batch, stages, heads, deep, repeats, self.settings)


class OrtEngine:
    times_pieces = True
    """ONNX Runtime over the pieces of `model` (exported here once) or over given `pieces`."""

    name = "onnxruntime"

    def __init__(
        self,
        model: nn.Module,
        size: int,
        policy=None,
        threads: int | None = None,
        pieces=None,
        ensemble: str = "logits",
        num_classes: int | None = None,
    ):
        from sdtool import runtime
        from sdtool.onnx_graphs import model_pieces, require_onnx

        require_onnx()
        self.pieces = pieces if pieces is not None else model_pieces(model, size, identity={"source_sha256": None})
        self.size, self.threads = size, threads
        self.num_classes = num_classes if num_classes is not None else cast("MultiExitNet", model).num_classes
        self._so, self.settings = runtime.session_options(threads)
        self._deep = runtime.make_session(self.pieces.graphs["deepest"], self._so, "deepest")
        self._sessions: dict = {}  # pieces timed by piece_times, made on first use
        self.session: EarlyExitSession | None = None  # made by set_policy
        self.policy = policy
        if policy is not None:
            self.set_policy(policy)

    @property
    def num_exits(self) -> int:
        return self.pieces.num_exits

    def set_policy(self, policy) -> None:
        """Sessions for `policy` (an early_exit.ExitPolicy): the steps it runs, stages-only where an exit never
        answers."""
        from sdtool.runtime import EarlyExitSession

        normalized = InputSpec(size=self.size, channels=3, mean=[0.0] * 3, std=[1.0] * 3)  # x comes normalized
        manifest, graphs = bundle_layout(
            self.pieces,
            policy,
            normalized,
            self.num_classes,
            source_sha256=(self.pieces.identity or {}).get("source_sha256"),
        )
        self.session = EarlyExitSession.from_memory(manifest, graphs, threads=self.threads)
        self.policy = policy

    def early_exit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.session is not None, "set_policy first"
        z, e = self.session.predict(x.numpy())
        return torch.from_numpy(z), torch.from_numpy(e)

    def deepest(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._deep.run(None, {"input": x.numpy()})[0])

    def _piece_session(self, name: str):
        from sdtool import runtime

        if name not in self._sessions:
            self._sessions[name] = runtime.make_session(self.pieces.graphs[name], self._so, name)
        return self._sessions[name]

    def piece_times(self, size: int, batch: int, warmup: int = 2, repeats: int = 5, progress: bool = True) -> dict:
        """As TorchEngine.piece_times; a head's time is (step time - stages-only time) of its exit: the
        difference of the medians, its range that of the differences within a repeat (each repeat times
        the step and then the stages-only graph)."""
        from sdtool.onnx_graphs import h_name

        x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
        stages, heads, h = [], [], x
        k_all = self.num_exits
        with _pieces_bar("onnxruntime", k_all, batch, 2 * k_all * (warmup + repeats), progress) as b:
            for k in range(k_all):
                src = "input" if k == 0 else h_name(k - 1)
                step = self._piece_session(f"step{k + 1}")
                if k == k_all - 1:  # the last step: its stages with the final pooling + classifier
                    stages.append(_ms_per_image(partial(step.run, None, {src: h}), batch, warmup, repeats, b.advance))
                    heads.append({"head_ms": 0.0, "head_ms_min": 0.0, "head_ms_max": 0.0})
                    break
                st = self._piece_session(f"stages{k + 1}")
                t_step, t_st = _paired_ms(
                    partial(step.run, None, {src: h}), partial(st.run, None, {src: h}), batch, warmup, repeats, b
                )
                stages.append(t_st)
                heads.append(_head_spread(t_step, t_st))
                h = st.run(None, {src: h})[0]
            deep = _ms_per_image(lambda: self._deep.run(None, {"input": x}), batch, warmup, repeats, b.advance)
        return _times_report(batch, stages, heads, deep, repeats, self.settings)


def _paired_ms(
    step: Callable[[], object], stages: Callable[[], object], n: int, warmup: int, repeats: int, bar
) -> tuple[list[float], list[float]]:
    """ms per image of `step` and of `stages`, timed one after the other in each repeat."""
    t_step: list[float] = []
    t_st: list[float] = []
    for r in range(warmup + repeats):
        a = _ms_per_image(step, n, 0, 1, bar.advance)[0]
        c = _ms_per_image(stages, n, 0, 1, bar.advance)[0]
        if r >= warmup:
            t_step.append(a)
            t_st.append(c)
    return t_step, t_st


def _head_spread(t_step: list[float], t_st: list[float]) -> dict[str, float]:
    """A head's ms per image: median(step) - median(stages), with the range of the per-repeat differences."""
    import statistics

    diffs = [max(0.0, a - c) for a, c in zip(t_step, t_st, strict=True)]
    med = max(0.0, statistics.median(t_step) - statistics.median(t_st))
    return {"head_ms": med, "head_ms_min": min(diffs), "head_ms_max": max(diffs)}


def bundle_layout(
    pieces,
    policy,
    spec: InputSpec,
    num_classes: int,
    source_sha256: str | None,
    class_names: list[str] | None = None,
) -> tuple[dict, dict[str, bytes]]:
    """The manifest core (steps, policy, input) and graph files an ExitPolicy needs from `pieces`.

    spec: the input the graphs take (size, channels and the normalisation, which must be given).
    Step k uses the fused step graph, or the stages-only graph where exit k never answers under the
    deepest fallback (its head is neither run nor shipped).
    """
    from sdtool.onnx_graphs import INPUT, h_name, logits_name
    from sdtool.runtime import BUNDLE_FORMAT, BUNDLE_VERSION, sha256_bytes

    assert spec.mean is not None and spec.std is not None, "the callers refuse a checkpoint without them"
    k_all = pieces.num_exits
    if len(policy.values) != k_all - 1:
        raise SdtoolError(
            f"the thresholds name {len(policy.values)} shallow exits but the model has {k_all - 1}; "
            "refit them for this model"
        )
    computed = policy.computed()
    steps, graphs = [], {}
    for k in range(k_all):
        name = f"step{k + 1}" if computed[k] else f"stages{k + 1}"
        data = pieces.graphs[name]
        file = f"{name}.onnx"
        graphs[file] = data
        steps.append(
            {
                "exit": k + 1,
                "file": file,
                "sha256": sha256_bytes(data),
                "input": INPUT if k == 0 else h_name(k - 1),
                "h": None if k == k_all - 1 else h_name(k),
                "logits": logits_name(k) if computed[k] else None,
            }
        )
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "num_classes": num_classes,
        "class_names": class_names,
        "input": {
            "size": spec.size,
            "channels": spec.channels,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "layout": "uint8 (N, H, W, C) images, or float32 (N, C, H, W) already normalized",
        },
        "policy": {
            "policy": policy.policy,
            "values": list(policy.values),
            "fallback": policy.fallback,
            "ensemble": policy.ensemble,
        },
        "source": {"sha256": source_sha256},
        "steps": steps,
    }
    return manifest, graphs


def make_engine(
    name: str, model: nn.Module, size: int, policy=None, threads: int | None = None, ensemble: str = "logits"
):
    """An engine by name over `model` (CPU); `threads` sets ONNX Runtime's threads (torch's are global)."""
    if check_engine(name) == "torch":
        return TorchEngine(model.cpu(), policy)
    return OrtEngine(model.cpu(), size, policy, threads, ensemble=ensemble)
