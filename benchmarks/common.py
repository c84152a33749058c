"""Shared pieces of the benchmark scripts: where the CIFAR-10 copy lives, decoding it once, recipes."""

from __future__ import annotations

import io
import json
import platform
import statistics
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"
CACHE = REPO / "runs" / "bench" / "cache"


def cifar10_files() -> tuple[Path, Path]:
    """(full training split decoded to x/y arrays, test split): decodes the JPEG bytes once into a cache."""
    if not (CIFAR / "train_jpeg.npz").is_file():
        raise SystemExit(f"CIFAR-10 not found at {CIFAR}: place train_jpeg.npz and test.npz there")
    out = CACHE / "cifar10_train.npz"
    if not out.is_file():
        from PIL import Image

        d = np.load(CIFAR / "train_jpeg.npz")
        buf, off = d["jpeg"], d["offsets"]
        x = np.stack(
            [
                np.asarray(Image.open(io.BytesIO(buf[off[i] : off[i + 1]].tobytes())).convert("RGB"))
                for i in range(len(off) - 1)
            ]
        )
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(out, x=x, y=d["y"].astype(np.int64))
    return out, CIFAR / "test.npz"


def cifar10_recipe(
    mode: str, seed: int, epochs: int, width: int = 16, val_size: int = 5000, limit_train: int | None = None
) -> dict:
    """The benchmarks' short-budget CIFAR-10 recipe (crop + flip, SGD, cosine)."""
    train, test = cifar10_files()
    return {
        "model": {"name": "resnet18", "width": width, "head": "byot", "attention": True},
        "data": {
            "name": "npz",
            "root": str(CIFAR),
            "train_file": str(train),
            "test_file": str(test),
            "val_size": val_size,
            "val_seed": 0,
            "batch_size": 128,
            "eval_batch_size": 500,
            "limit_train": limit_train,
        },
        "train": {
            "epochs": epochs,
            "lr": 0.1,
            "schedule": "cosine",
            "warmup_epochs": 0.2,
            "nesterov": True,
            "seed": seed,
        },
        "sd": {"mode": mode},
    }


def machine() -> dict:
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
