"""`sdtool prune`: physical structured pruning of a multi-exit network with Torch-Pruning.

Torch-Pruning's DependencyGraph traces one forward through *every* exit (the logits list of
`MultiExitNet.forward`) and groups the layers whose channels must be removed together: a stage's
convolutions and batch norms, the residual additions, the attention module after the stage (its
mask multiplies the stage output, `x * sigmoid(up(...))`, so the attention convolutions, the
bilinear resize and the product share the stage's channels), the first depthwise convolution of the
exit head and, for the deepest exit, the classifier's input features. Removing channel i of such a
group removes it everywhere at once, so the pruned network stays consistent and really shrinks.

Which channels go is decided per group by an importance criterion (`CRITERIA`). Two invariants hold
whatever the options: every classifier keeps `num_classes` outputs (its input features follow the
pruning, and `model.feature_dims` with them), and every exit still runs (checked after pruning).

Targets: `ratio` removes that fraction of the channels of every prunable group (or of all channels
ranked together, `global_pruning`); `target_macs` keeps that fraction of the full multi-exit MACs
(fvcore, every exit computed) by bisection on the ratio, re-pruning a fresh copy each time, until
the result is within 2 % (relative) of the target.

The pruned shapes are not stored with Torch-Pruning's `tp.state_dict` (it pickles module
attributes): `checkpoint.save` records the modules whose shapes differ from a fresh build as plain
JSON (`sdtool.models.shapes`), and `checkpoint.load` rebuilds the pruned model from that.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from sdtool.errors import SdtoolError
from sdtool.meta import CheckpointMeta
from sdtool.prune_options import CRITERIA, PruneOptions
from sdtool.prune_rules import make_importance
from sdtool.pruner import _threads, full_macs, prune_model, prune_once

if TYPE_CHECKING:
    from sdtool.checkpoint import Checkpoint

__all__ = ["CRITERIA", "PruneOptions", "full_macs", "make_importance", "prune_checkpoint", "prune_model", "prune_once"]


def taylor_loss(meta: CheckpointMeta | dict, num_exits: int) -> Callable:
    """The gradient signal for taylor: the self-distillation loss of the recorded recipe (feature hints
    off: their adaptation layers are not in the checkpoint), or CE for a single-exit model."""
    from sdtool.losses import SelfDistillLoss
    from sdtool.recipe import from_dict

    if not isinstance(meta, CheckpointMeta):
        meta = CheckpointMeta.from_json(meta, "metadata")
    if num_exits == 1:
        crit = SelfDistillLoss("plain", [1])
    else:
        # The recipe's sd section with its defaults filled in from the one place that states them.
        sd = from_dict({"sd": (meta.recorded_recipe() or {}).get("sd") or {}}).sd
        crit = SelfDistillLoss.from_recipe(replace(sd, mode="self_distill", beta=0.0, hint_exits=None), [1] * num_exits)
    return lambda logits, feats, y: crit(logits, feats, y)[0]


def _first_batches(loader, prepare, n: int) -> list:
    out = []
    for x, y in loader:
        out.append((prepare(x, train=False), y))
        if len(out) >= n:
            break
    return out


def prune_checkpoint(
    path: str | Path,
    out: str | Path,
    opts: PruneOptions,
    evaluate: bool = False,
    data: str | None = None,
    overrides: list[str] | None = None,
    device: str = "auto",
    *,
    allow_other_data: bool = False,
    progress: bool = True,
) -> dict:
    """`sdtool prune`: prune the checkpoint at `path` and write the pruned one to `out` (atomically).

    Nothing is written unless every step succeeds, and nothing is printed but progress bars on stderr
    (`progress`; only when stderr is a terminal): a failure is one line. `allow_other_data`: use a data
    set other than the one the checkpoint was trained on (else refused). Returns the report (see
    docs/pruning.md).
    """
    from sdtool import checkpoint
    from sdtool.profile import exit_costs

    opts.check()
    path, out = Path(path), Path(out)
    _check_out(path, out)
    ckpt = checkpoint.load_checkpoint(path)
    started, size = checkpoint.now(), ckpt.meta.input_size
    batches, ev = _data_for_pruning(
        ckpt, opts, evaluate, _DataArgs(data, overrides, allow_other_data), device, progress
    )

    with _threads(1):
        before = exit_costs(ckpt.model, (size, size))
    acc_before = ev(ckpt.model) if ev else None
    t0 = time.perf_counter()
    loss = taylor_loss(ckpt.meta, ckpt.model.num_exits) if batches else None
    pruned, info = prune_model(ckpt.model, opts, size, batches, loss, progress=progress)
    seconds = time.perf_counter() - t0
    with _threads(1):
        after = exit_costs(pruned, (size, size))
    acc_after = ev(pruned) if ev else None

    metrics = {
        "before": _brief(before, acc_before),
        "after": _brief(after, acc_after),
        "macs_fraction": round(info["macs_fraction"], 4),
        "params_fraction": round(after["parameters"] / before["parameters"], 4),
        "seconds": round(seconds, 2),
    }
    options = asdict(opts)
    # Early-exit thresholds were fitted on the unpruned model: the child has none.
    child = ckpt.derive(
        "prune",
        pruned,
        step_metrics=metrics,
        metrics=metrics,
        started=started,
        thresholds=None,
        lineage={"options": options, "ratio_used": info["ratio"]},
    ).save(out)
    return {
        "checkpoint": str(path),
        "out": str(out),
        "sha256": child.sha256,
        "options": options,
        "ratio": info["ratio"],
        "macs_fraction": info["macs_fraction"],
        "params_fraction": after["parameters"] / before["parameters"],
        "seconds": seconds,
        "search": info["search"],
        "before": before,
        "after": after,
        "accuracy": {"split": "test", "data": ev.data, "before": acc_before, "after": acc_after} if ev else None,
        "pruned_modules": len(child.meta.shapes),
    }


def _check_out(path: Path, out: Path) -> None:
    """Before any work (sdtool.outputs): a file path whose folder can be written, with room for about the
    source checkpoint's size (the pruned one is smaller)."""
    from sdtool.outputs import check_file, source_size

    if out.exists() and out.resolve() == path.resolve():
        raise SdtoolError("--out must differ from the input checkpoint (the pruned model is a new file)")
    if out.exists() and out.is_dir():
        raise SdtoolError(f"--out {out} is a folder; give the path of the pruned .safetensors file")
    check_file(out, "--out", need_bytes=source_size(path))


@dataclass(frozen=True)
class _DataArgs:
    """The data options of `prune_checkpoint`, as given."""

    data: str | None
    overrides: list[str] | None
    allow_other_data: bool


def _data_for_pruning(
    ckpt: Checkpoint, opts: PruneOptions, evaluate: bool, d: _DataArgs, device: str, progress: bool
) -> tuple[list | None, _Evaluator | None]:
    """taylor's gradient batches (training split) and the test-set evaluator for --eval, when asked for."""
    from sdtool.checkpoint_data import checkpoint_data

    if opts.criterion != "taylor" and not evaluate:
        return None, None
    cfg, bundle = checkpoint_data(
        ckpt, d.data, d.overrides, "test", train=opts.criterion == "taylor", allow_other_data=d.allow_other_data
    )
    batches = None
    if opts.criterion == "taylor":
        loader = bundle.loader("train", cfg.batch_size, shuffle=True, seed=opts.seed, workers=cfg.workers)
        batches = _first_batches(loader, bundle.prepare, opts.taylor_batches)
    return batches, (_Evaluator(bundle, cfg, ckpt.meta.ensemble, device, progress) if evaluate else None)


def _brief(costs: dict, acc: dict | None) -> dict:
    """What the lineage keeps of a cost report: totals and per-exit params/MACs (and accuracy)."""
    d = {
        "params": costs["full"]["params"],
        "macs": costs["full"]["macs"],
        "exits": [{"exit": e["exit"], "params": e["params"], "macs": e["macs"]} for e in costs["exits"]],
    }
    if acc is not None:
        d["test"] = acc
    return d


class _Evaluator:
    """Test accuracy per exit of a model, before and after pruning (on the device asked for)."""

    def __init__(self, bundle, cfg, ensemble: str, device: str, progress: bool = True):
        from sdtool.device import resolve_device

        self.dev, self.bundle, self.ensemble, self.data = resolve_device(device), bundle, ensemble, cfg.name
        self.progress = progress
        self.loader = bundle.loader("test", cfg.eval_batch_size, shuffle=False, seed=0, workers=cfg.workers)

    def __call__(self, model: nn.Module) -> dict:
        from sdtool.evaluate import evaluate

        try:
            return evaluate(
                model.to(self.dev), self.loader, self.bundle.prepare, self.dev, self.ensemble, progress=self.progress
            )
        finally:
            model.to("cpu")
