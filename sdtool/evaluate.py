"""Per-exit and ensemble accuracy of a multi-exit network on a data loader."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sdtool.losses import ensemble_logits


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k predictions, for each k (capped at #classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (N, kmax)
    hit = top.eq(y[:, None])
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def collect_logits(
    model: nn.Module, loader, prepare: Callable, device: torch.device, amp_dtype: torch.dtype | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """All exits' logits for a whole loader: ([K x (N, classes)] on the CPU in float32, labels (N,))."""
    model.eval()
    outs: list[list[torch.Tensor]] = []
    ys = []
    for x, y in loader:
        x = prepare(x.to(device, non_blocking=True), train=False)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, _ = model(x)
        outs.append([z.float().cpu() for z in logits])
        ys.append(y.cpu())
    if not outs:
        from sdtool.errors import SdtoolError

        raise SdtoolError("the evaluation split is empty; check data.limit_test, data.val_size and the data files")
    return [torch.cat(z) for z in zip(*outs)], torch.cat(ys)


def accuracy_report(logits: list[torch.Tensor], y: torch.Tensor, ensemble: str = "logits") -> dict:
    """Accuracy (percent) of every exit and of the ensemble, plus each exit's mean cross-entropy.

    Returns {"n": N, "exits": [{"exit": k (1-based), "top1", "top5", "loss"}, ...] shallow to deep,
    "ensemble": {"top1", "top5", "loss"} or None for a single-exit model}.
    """
    n = len(y)

    def one(z: torch.Tensor) -> dict:
        c1, c5 = topk_correct(z, y)
        return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": float(F.cross_entropy(z, y))}

    exits = [{"exit": k + 1, **one(z)} for k, z in enumerate(logits)]
    ens = one(ensemble_logits(logits, ensemble)) if len(logits) > 1 else None
    return {"n": n, "exits": exits, "ensemble": ens}


def evaluate(
    model: nn.Module,
    loader,
    prepare: Callable,
    device: torch.device,
    ensemble: str = "logits",
    amp_dtype: torch.dtype | None = None,
) -> dict:
    logits, y = collect_logits(model, loader, prepare, device, amp_dtype)
    return accuracy_report(logits, y, ensemble)


def recorded_recipe(meta: dict) -> dict | None:
    """The resolved recipe of the latest lineage step that trained the checkpoint (prune steps have none)."""
    for entry in reversed(meta.get("lineage", [])):
        if entry.get("recipe"):
            return entry["recipe"]
    return None


def data_for_checkpoint(meta: dict, data: str | None = None, overrides: list[str] | None = None):
    """The data config to evaluate a checkpoint on: its recorded recipe's data section, or `data`.

    `data` is a recipe file (its data section is used) or a data set name; `overrides` are
    `data.key=value` settings applied on top.
    """
    from pathlib import Path

    from sdtool.recipe import apply_overrides, from_dict, load_yaml
    from sdtool.errors import SdtoolError

    base = recorded_recipe(meta) or {}
    raw = {"data": dict(base.get("data") or {})}
    if data is not None:
        if Path(data).suffix in (".yaml", ".yml"):
            raw["data"] = load_yaml(data).get("data") or {}
        else:
            raw["data"] = {"name": data}
    for o in overrides or []:
        if not o.startswith("data."):
            raise SdtoolError(f"--set {o}: only data.* keys apply when evaluating a checkpoint")
    if not raw["data"]:
        raise SdtoolError("the checkpoint records no data set; pass --data RECIPE.yaml or --data NAME")
    return from_dict(apply_overrides(raw, overrides or [])).data


def bundle_for_checkpoint(path, meta: dict, cfg, split: str):
    """Build `cfg`'s data for evaluating the checkpoint at `path`; refuse a class-count mismatch and a
    missing validation split when `split` is val."""
    from sdtool.data import build_data
    from sdtool.errors import SdtoolError

    bundle = build_data(cfg, train=False)
    spec = meta.get("input") or {}
    if spec.get("size") and bundle.input_size != spec["size"]:
        raise SdtoolError(
            f"{path} takes {spec['size']}x{spec['size']} inputs but data set {cfg.name} gives "
            f"{bundle.input_size}x{bundle.input_size}; pass --set data.input_size={spec['size']}"
        )
    if spec.get("mean") and spec.get("std") and bundle.in_memory:
        # The network expects the normalisation it was trained with, whatever the data set's default.
        bundle.mean, bundle.std = tuple(spec["mean"]), tuple(spec["std"])
        bundle._stats.clear()
    if bundle.num_classes != meta["num_classes"]:
        raise SdtoolError(
            f"{path} predicts {meta['num_classes']} classes but data set {cfg.name} has "
            f"{bundle.num_classes}; evaluate it on a matching data set"
        )
    if split == "val" and bundle.val is None:
        raise SdtoolError(
            "this data configuration has no validation split; set data.val_size "
            "(e.g. --set data.val_size=0.1) or use --split test"
        )
    return bundle


def eval_checkpoint(
    path: str,
    data: str | None = None,
    overrides: list[str] | None = None,
    split: str = "test",
    device: str = "auto",
    batch_size: int | None = None,
) -> dict:
    """`sdtool eval`: per-exit and ensemble accuracy of a checkpoint on a split of its data set."""
    from sdtool.checkpoint import load
    from sdtool.device import resolve_device

    dev = resolve_device(device)
    model, meta = load(path, dev)
    cfg = data_for_checkpoint(meta, data, overrides)
    bundle = bundle_for_checkpoint(path, meta, cfg, split)
    loader = bundle.loader(split, batch_size or cfg.eval_batch_size, shuffle=False, seed=0, workers=cfg.workers)
    rep = evaluate(model, loader, bundle.prepare, dev, meta.get("ensemble", "logits"))
    return {"checkpoint": str(path), "split": split, "data": cfg.name, **rep}
