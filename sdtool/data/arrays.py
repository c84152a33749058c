"""In-memory image data: uint8 tensors, the `.npz` reader, resizing and channel statistics.

In-memory data sets keep every image as uint8 (N, C, H, W) in one tensor: a batch is a single index
operation, and augmentation runs on the batch on the training device (`augment.py`) instead of per
image in PIL.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sdtool.errors import SdtoolError
from sdtool.memory import check_fits

NPZ_EXPECTED = "an .npz file with arrays x (uint8, N x H x W x C pixels) and y (N integer labels)"


class ArrayDataset(Dataset):
    """Images x uint8 (N, C, H, W) and labels y int64 (N,), held in memory.

    Item i is (x[i] uint8 (C, H, W), y[i] int64 scalar tensor); with a `transform` (the per-image
    AutoAugment pipeline) the image goes through it first. `indices` are the positions of these
    images in the split they were cut from (the validation split and limits are index subsets).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: np.ndarray,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        assert x.dtype == torch.uint8 and x.ndim == 4 and len(x) == len(y) == len(indices)
        self.x, self.y, self.indices, self.transform = x, y, indices, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.x[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.y[i]

    def get_batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch (x (B, C, H, W) uint8, y (B,)) in one indexing op, or None when items need a transform."""
        if self.transform is not None:
            return None
        t = torch.as_tensor(idx, dtype=torch.long)
        return self.x[t], self.y[t]


class TensorSplit:
    """A whole split in memory; `subset` copies the chosen rows (cheap next to an epoch of training)."""

    def __init__(self, x: torch.Tensor, y: np.ndarray) -> None:
        self.x = x  # uint8 (N, C, H, W), contiguous
        self.labels = np.asarray(y, dtype=np.int64)
        self._y = torch.from_numpy(self.labels)

    def subset(self, indices: np.ndarray, transform: Callable[[Any], Any] | None) -> ArrayDataset:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == len(self.labels) and np.array_equal(indices, np.arange(len(indices))):
            return ArrayDataset(self.x, self._y, indices, transform)  # whole split: share, don't copy
        t = torch.from_numpy(indices)
        return ArrayDataset(self.x[t], self._y[t], indices, transform)


def load_images_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read `x` (uint8 N x H x W x C, or N x H x W for grey) and `y` (N ints) from an .npz file.

    Returns x uint8 (N, H, W, C) and y int64 (N,). Never unpickles (allow_pickle=False); anything a
    user can get wrong (missing file, missing key, wrong dtype or shape) raises SdtoolError.
    """
    p = Path(path)
    if not p.is_file():
        raise SdtoolError(f"{p.absolute()} not found; expected {NPZ_EXPECTED} there")
    try:
        with np.load(p, allow_pickle=False) as d:
            if not isinstance(d, np.lib.npyio.NpzFile):
                raise SdtoolError(f"{p.absolute()} is a single array, not {NPZ_EXPECTED}")
            missing = [k for k in ("x", "y") if k not in d.files]
            if missing:
                raise SdtoolError(
                    f"{p.absolute()} has no array {', '.join(missing)} (it has: "
                    f"{', '.join(d.files) or 'none'}); expected {NPZ_EXPECTED}"
                )
            x, y = d["x"], d["y"]
    except SdtoolError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise SdtoolError(f"{p.absolute()} could not be read ({first}); expected {NPZ_EXPECTED}") from None
    if x.dtype != np.uint8:
        raise SdtoolError(
            f"{p.absolute()}: x is {x.dtype}, expected uint8 pixels 0-255 (convert with "
            f"np.clip(x * 255, 0, 255).astype(np.uint8) if they are floats in [0, 1])"
        )
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise SdtoolError(f"{p.absolute()}: x has shape {x.shape}, expected N x H x W x C with C = 1 or 3")
    if 0 in x.shape[1:3]:  # nothing to resize or crop: every later step would fail on empty images
        raise SdtoolError(
            f"{p.absolute()}: x holds {x.shape[1]}x{x.shape[2]}-pixel images (shape {x.shape}); "
            f"images need at least 1x1 pixels: rewrite the file with the real pixels"
        )
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise SdtoolError(f"{p.absolute()}: y must be {len(x)} integer labels, got {y.dtype} {y.shape}")
    if len(y) and y.min() < 0:
        raise SdtoolError(f"{p.absolute()}: y has negative labels; labels must be 0..num_classes-1")
    return x, y.astype(np.int64)


def read_npz_labels(path: Path) -> np.ndarray:
    """Only `y` of an .npz (arrays in an npz load lazily, so the pixels are not read)."""
    with np.load(path, allow_pickle=False) as d:
        return np.asarray(d["y"], dtype=np.int64)


def to_nchw(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) array -> contiguous uint8 (N, 3, H, W) tensor; grey is replicated to RGB
    because every backbone takes three channels."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t.contiguous()


def resize_uint8(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear resize of uint8 (N, C, H, W) to (N, C, size, size), rounded back to uint8.

    Done once at load time so the per-batch path never resizes. Antialiased when shrinking; chunked
    so a float copy of a whole data set never sits in memory.
    """
    if x.shape[-2:] == (size, size):
        return x
    # In-memory data sets hold every image at the input size: refuse a size they cannot fit (uint8, one copy).
    check_fits(
        len(x) * x.shape[1] * size * size,
        f"data.input_size={size}: holding {len(x)} images at {size}x{size} in memory",
        "lower data.input_size (imagefolder reads images per batch instead)",
    )
    shrink = size < max(x.shape[-2:])
    out = [
        F.interpolate(c.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        .round_()
        .clamp_(0, 255)
        .to(torch.uint8)
        for c in x.split(chunk)
    ]
    return torch.cat(out).contiguous()


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 (N, C, H, W) images on the [0, 1] scale,
    rounded to 4 decimals (they are recorded in checkpoints)."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for part in x.split(chunk):
        v = part.to(torch.float64).div_(255).transpose(0, 1).reshape(c, -1)
        s += v.sum(1)
        s2 += (v * v).sum(1)
    n = x.numel() // c
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt()
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(v), 4) for v in std)
