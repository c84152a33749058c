"""Per-exit and ensemble accuracy of a multi-exit network on a data loader."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sdtool.losses import ensemble_logits
from sdtool.meta import CheckpointMeta


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k predictions, for each k (capped at #classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (N, kmax)
    hit = top.eq(y[:, None])
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def collect_logits(
    model: nn.Module,
    loader,
    prepare: Callable,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    *,
    progress: bool = True,
    label: str = "evaluating",
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """All exits' logits for a whole loader: ([K x (N, classes)] on the CPU in float32, labels (N,)).

    progress: a bar "label ... images done/total" on stderr (sdtool.progress: only on a terminal)."""
    from sdtool.progress import images_in
    from sdtool.progress import progress as bar

    model.eval()
    outs: list[list[torch.Tensor]] = []
    ys = []
    total = images_in(loader)
    with bar(f"{label} (images)", total, progress) as b:
        for x, y in loader:
            x = prepare(x.to(device, non_blocking=True), train=False)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits, _ = model(x)
            outs.append([z.float().cpu() for z in logits])
            ys.append(y.cpu())
            b.advance(len(y))
    if not outs:
        from sdtool.errors import SdtoolError

        raise SdtoolError("the evaluation split is empty; check data.limit_test, data.val_size and the data files")
    return [torch.cat(z) for z in zip(*outs, strict=True)], torch.cat(ys)


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
    progress: bool = True,
) -> dict:
    """`accuracy_report` of `model` over `loader` (a progress bar on stderr unless not `progress`)."""
    logits, y = collect_logits(model, loader, prepare, device, amp_dtype, progress=progress)
    return accuracy_report(logits, y, ensemble)


def data_for_checkpoint(meta: dict | CheckpointMeta, data: str | None = None, overrides: list[str] | None = None):
    """The data config to evaluate a checkpoint on (see `sdtool.checkpoint_data.data_config`)."""
    from sdtool.checkpoint_data import data_config

    return data_config(
        meta if isinstance(meta, CheckpointMeta) else CheckpointMeta.from_json(meta, "metadata"), data, overrides
    )


def eval_checkpoint(
    path: str,
    data: str | None = None,
    overrides: list[str] | None = None,
    split: str = "test",
    device: str = "auto",
    batch_size: int | None = None,
    *,
    allow_other_data: bool = False,
    progress: bool = True,
) -> dict:
    """`sdtool eval`: per-exit and ensemble accuracy of a checkpoint on a split of its data set.

    allow_other_data: score it on a data set other than the one it was trained on (refused otherwise);
    progress: show a progress bar on stderr (when stderr is a terminal).
    """
    from sdtool.checkpoint import load_checkpoint
    from sdtool.checkpoint_data import checkpoint_data
    from sdtool.device import resolve_device

    dev = resolve_device(device)
    ckpt = load_checkpoint(path, dev)
    cfg, bundle = checkpoint_data(ckpt, data, overrides, split, allow_other_data=allow_other_data)
    loader = bundle.loader(split, batch_size or cfg.eval_batch_size, shuffle=False, seed=0, workers=cfg.workers)
    rep = evaluate(ckpt.model, loader, bundle.prepare, dev, ckpt.meta.ensemble, progress=progress)
    return {"checkpoint": str(path), "split": split, "data": cfg.name, **rep}
