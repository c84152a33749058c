"""Tiny sdtool checkpoints for tests that need one without training (profile, early exit, export)."""

from pathlib import Path

import torch

from sdtool import checkpoint
from sdtool.data import build_data
from sdtool.models import create_model
from sdtool.recipe import from_dict


def make_ckpt(
    path: Path,
    val_size: float = 100,
    seed: int = 0,
    width: int = 4,
    sharpen: float = 1.0,
    size: int = 16,
    val_split: dict | None = None,
    **model_args,
) -> Path:
    """An untrained width-4 resnet18 on the built-in `fake` data (400 train / 100 test images, 16x16).

    The lineage entry carries the resolved recipe, so `sdtool eval` rebuilds the data exactly as
    for a trained checkpoint; `val_split` records the held-out split (None when val_size is 0).
    `sharpen` scales the classifiers so that confidences spread out over (0, 1). `val_split`
    replaces the recorded split (e.g. to pretend it was cut from other data).
    """
    torch.manual_seed(seed)
    model = create_model("resnet18", num_classes=10, width=width, **model_args).eval()
    with torch.no_grad():
        for fc in model.classifiers:
            fc.weight.mul_(sharpen)
    r = from_dict(
        {"data": {"name": "fake", "fake_size": 400, "val_size": val_size, "input_size": size, "eval_batch_size": 64}}
    )
    recipe = r.to_dict()
    if val_split is None:
        val_split = build_data(r.data, train=False).val_info
    meta = {
        "num_classes": 10,
        "class_names": [str(i) for i in range(10)],
        "input": {"size": size, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3},
        "data": {"name": "fake"},
        "val_split": val_split,
        "ensemble": "logits",
        "mode": "self_distill",
        "lineage": [checkpoint.lineage_entry("train", recipe, None, checkpoint.now())],
    }
    checkpoint.save(path, model, meta)
    return Path(path)
