"""`sdtool profile`: parameters, MACs and measured latency of every exit of a multi-exit network.

Costs, per exit k (1-based, shallow to deep):
  * alone       - what exit k costs as a standalone model: the stages up to its stage plus its
                  attention, head and classifier (the paper's "shallow classifier as a smaller model");
  * cumulative  - what a sample that leaves at exit k costs in early exit when every earlier exit was
                  tried: the stages up to its stage plus the attention, head and classifier of exits 1..k.
The *reference cost* is the deepest exit alone (the plain network's path); "full" is the whole
multi-exit net with every exit computed, which is also what the ensemble costs (its averaging of
logits is a few hundred additions and is not counted).

MACs come from fvcore's FlopCountAnalysis, which counts one multiply-add once (it calls them
"flops"). It also counts batch-norm and bilinear upsampling, but not element-wise additions,
multiplications or sigmoids (residual sums, the attention mask), so totals agree with other
counters to about 1 %. One traced forward is split per module (`by_module`), so per-exit figures add
up exactly to the total.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from sdtool.errors import SdtoolError

# The timing moved to sdtool.timing; its names stay importable from here.
from sdtool.timing import measure_latency, measure_latency_ort, median_seconds, sync

__all__ = [
    "ProfileOptions",
    "exit_costs",
    "measure_latency",
    "measure_latency_ort",
    "median_seconds",
    "module_macs",
    "profile",
    "sync",
]

if TYPE_CHECKING:
    from sdtool.models.multi_exit import MultiExitNet

MACS_NOTE = (
    "fvcore FlopCountAnalysis: one multiply-add = 1 MAC; batch-norm and upsampling included, "
    "element-wise add/mul/sigmoid not counted"
)


@contextlib.contextmanager
def _quiet_fvcore():
    """fvcore logs a warning per unsupported op (add, mul, sigmoid) and torch warns that tracing is
    deprecated; neither says anything about the counts, so both are silenced here."""
    logger = logging.getLogger("fvcore")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def module_macs(model: nn.Module, input_size: tuple[int, int]) -> dict[str, int]:
    """MACs per module name (fvcore, batch 1, on the CPU), from one traced forward of the whole net."""
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, *input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with _quiet_fvcore(), torch.no_grad():
            from fvcore.nn import FlopCountAnalysis  # its import warns about torch.jit.script

            fa = FlopCountAnalysis(model, x)
            fa.unsupported_ops_warnings(False)
            fa.uncalled_modules_warnings(False)
            fa.tracer_warnings("none")
            return {k: int(v) for k, v in fa.by_module().items()}
    finally:
        model.train(was_training)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def exit_costs(model: MultiExitNet, input_size: tuple[int, int]) -> dict:
    """Parameters and MACs per exit (alone and cumulative), reference, ensemble and full net.

    Returns {"input_size", "parameters", "reference": {"exit", "macs", "params"}, "full": {...},
    "ensemble": {...} | None, "exits": [{"exit", "stage", "params", "macs", "share_of_reference",
    "head_params", "head_macs", "stages_macs", "cumulative_macs", "cumulative_params"}]}.
    """
    from sdtool.models.multi_exit import MultiExitNet

    if not isinstance(model, MultiExitNet):
        raise SdtoolError("sdtool profile needs an sdtool multi-exit model (a checkpoint or recipe)")
    by = module_macs(model, input_size)
    stage_macs = [by.get(f"stages.{i}", 0) for i in range(len(model.stages))]
    stage_params = [_params(s) for s in model.stages]
    exits: list[dict[str, Any]] = []  # ints, and each exit's share of the reference (a float or None)
    head_sum_macs = head_sum_params = 0
    for k, s in enumerate(model.exit_stages):
        parts = (f"attention.{k}", f"heads.{k}", f"classifiers.{k}")
        head_macs = sum(by.get(p, 0) for p in parts)
        head_params = sum(_params(m[k]) for m in (model.attention, model.heads, model.classifiers))
        stages_macs, stages_params = sum(stage_macs[: s + 1]), sum(stage_params[: s + 1])
        head_sum_macs += head_macs
        head_sum_params += head_params
        exits.append(
            {
                "exit": k + 1,
                "stage": s + 1,
                "params": stages_params + head_params,
                "macs": stages_macs + head_macs,
                "head_params": head_params,
                "head_macs": head_macs,
                "stages_macs": stages_macs,
                "cumulative_macs": stages_macs + head_sum_macs,
                "cumulative_params": stages_params + head_sum_params,
            }
        )
    ref = exits[-1]
    for e in exits:
        e["share_of_reference"] = e["macs"] / ref["macs"] if ref["macs"] else None
    total_macs, total_params = by.get("", sum(stage_macs) + head_sum_macs), _params(model)
    full = {
        "params": total_params,
        "macs": total_macs,
        "share_of_reference": total_macs / ref["macs"] if ref["macs"] else None,
    }
    return {
        "input_size": list(input_size),
        "parameters": total_params,
        "reference": {"exit": ref["exit"], "macs": ref["macs"], "params": ref["params"]},
        "full": full,
        "ensemble": dict(full) if len(exits) > 1 else None,
        "exits": exits,
        "macs_counter": MACS_NOTE,
    }


def _recipe_model(path: str, overrides: list[str] | None) -> tuple[MultiExitNet, int, str]:
    """Model from a recipe, built as training builds it: (model, input side, where num_classes came from)."""
    from sdtool.models import create_model
    from sdtool.models.from_recipe import model_args
    from sdtool.recipe import load_recipe

    r = load_recipe(path, overrides)
    classes, side, note = _data_info(r.data)
    if r.model.num_classes is not None:
        classes, note = r.model.num_classes, "model.num_classes"
    if side is None:
        side = r.data.input_size or (224 if r.model.stem == "imagenet" else 32)
    model = cast("MultiExitNet", create_model(r.model.name, **model_args(r, classes, side)))  # every builder makes one
    return model, side, note


def _data_info(cfg) -> tuple[int, int | None, str]:
    """(class count, input side, where the count came from) of the recipe's data set.

    Read from the data when it is at hand (the side a training run would use: digits are upscaled to
    32, image folders default to 224, npz files have their own); otherwise 10 classes (the classifier
    is a tiny part of the cost, and the output says which was used) and no side.
    """
    import dataclasses

    from sdtool.data import build_data

    try:
        bundle = build_data(dataclasses.replace(cfg, val_size=0, download=False), train=False)  # never fetch
        return bundle.num_classes, bundle.input_size, f"data set {cfg.name}"
    except SdtoolError:
        fixed = {"digits": 10, "fake": 10, "cifar10": 10, "cifar100": 100}
        if cfg.name in fixed:
            return fixed[cfg.name], None, f"data set {cfg.name}"
        return 10, None, f"assumed 10 (data set {cfg.name} not readable here; set model.num_classes)"


@dataclass
class ProfileOptions:
    """How `profile` measures (the defaults are the CLI's).

    input_size: (height, width), None = the checkpoint's or data set's side; batch: the latency batch N
    (batch 1 is always measured); device: where torch latency runs; latency: False counts parameters
    and MACs only; warmup, repeats: untimed runs, then timed ones (their median, min and max are reported); threads:
    torch's or ONNX Runtime's thread count (None = their default); overrides: `--set` values, for a
    recipe only; engine: torch (eager; the model as it is) or onnxruntime (its graphs, on the CPU);
    progress: a progress bar on stderr while timing (shown only when stderr is a terminal).
    """

    input_size: tuple[int, int] | None = None
    batch: int = 32
    device: str = "cpu"
    latency: bool = True
    warmup: int = 3
    repeats: int = 10
    threads: int | None = None
    overrides: list[str] | None = None
    engine: str = "torch"
    progress: bool = True

    def check(self) -> None:
        """Refuse bad counts, an unknown engine or a bad thread count, before any model is built."""
        from sdtool.engines import check_engine

        if self.batch < 1 or self.repeats < 1 or self.warmup < 0:
            raise SdtoolError("--batch-size and --repeats must be at least 1 and --warmup at least 0")
        check_engine(self.engine)
        if self.threads is not None and self.threads < 1:
            raise SdtoolError(f"--threads must be at least 1, got {self.threads}")


def profile(target: str, opts: ProfileOptions | None = None) -> dict:
    """`sdtool profile`: costs of a checkpoint (.safetensors) or of the model a recipe (.yaml) builds.

    opts: input size, latency settings and engine (default ProfileOptions()). Returns the target,
    where the class count came from, the model spec, `exit_costs` and "latency" (None without it).
    """
    opts = opts or ProfileOptions()
    opts.check()
    if opts.threads and opts.engine == "torch":
        torch.set_num_threads(opts.threads)
    model, side, source = _load_target(target, opts.overrides)
    size = (opts.input_size[0], opts.input_size[1]) if opts.input_size else (side, side)
    if min(size) < 1:
        raise SdtoolError(f"--input-size must be positive, got {size}")
    model.eval()
    rep = {
        "target": str(target),
        **source,
        "model": model.spec,
        "num_classes": model.num_classes,
        **exit_costs(model, size),
    }
    rep["latency"] = _latency(model, size, opts) if opts.latency else None
    return rep


def _load_target(target: str, overrides: list[str] | None) -> tuple[MultiExitNet, int, dict]:
    """(model, input side, source fields of the report) of a recipe or a checkpoint."""
    if Path(target).suffix in (".yaml", ".yml"):
        model, side, classes_from = _recipe_model(target, overrides)
        return model, side, {"kind": "recipe", "num_classes_from": classes_from}
    if overrides:
        raise SdtoolError("--set applies to recipes only; a checkpoint's model is fixed")
    from sdtool.checkpoint import load_checkpoint

    ckpt = load_checkpoint(target)
    return ckpt.model, ckpt.meta.input_size, {"kind": "checkpoint", "num_classes_from": "checkpoint"}


def _latency(model: MultiExitNet, size: tuple[int, int], opts: ProfileOptions) -> dict:
    """The report's "latency": measured in ONNX Runtime (CPU only) or in eager torch on `opts.device`."""
    from sdtool.device import resolve_device

    if opts.engine == "onnxruntime":
        if opts.device not in ("cpu", "auto"):
            raise SdtoolError("--engine onnxruntime runs on the CPU; drop --device or use --device cpu")
        return measure_latency_ort(model, size, opts.batch, opts.threads, opts.warmup, opts.repeats, opts.progress)
    dev = resolve_device(opts.device)
    lat = measure_latency(model.to(dev), size, opts.batch, dev, opts.warmup, opts.repeats, opts.progress)
    lat["engine"] = {
        "engine": "torch",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batchnorm_folded": False,
    }
    return lat
