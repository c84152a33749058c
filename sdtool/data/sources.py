"""In-memory data sets: digits, npz, fake (cifar10 and cifar100: cifar.py).

Each loader returns uint8 (N, 3, H, W) tensors at the network's input size; everything after that
(splits, augmentation, loaders) is shared (`bundle.py`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from sdtool.data.arrays import (
    NPZ_EXPECTED,
    TensorSplit,
    channel_stats,
    load_images_npz,
    read_npz_labels,
    resize_uint8,
    to_nchw,
)
from sdtool.data.registry import Source, register
from sdtool.data.splits import stratified_split
from sdtool.errors import SdtoolError

if TYPE_CHECKING:
    from sdtool.recipe import DataConfig

# The official code's Normalize values (used for CIFAR-10 and CIFAR-100 alike, as the paper's code does).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

# digits: channel_stats of the 1437 training images at 32x32 (the same value for the 3 replicated
# channels); recomputed when another input size is asked for. tests/test_data.py checks the constants.
DIGITS_SIZE = 32
DIGITS_TEST = 360  # 1797 images -> 1437 train / 360 test, stratified, seed 0
DIGITS_MEAN = (0.3049,) * 3
DIGITS_STD = (0.3234,) * 3
DIGITS_FILE = "digits.npz"  # package data next to this module


def _needs_stats(cfg: DataConfig) -> bool:
    return cfg.augment.mean is None or cfg.augment.std is None


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 digits shipped in the package: images (1797, 8, 8) uint8 in 0..16, labels (1797,) int64.

    The same values, in the same order, as scikit-learn's `load_digits()` (the UCI test set, CC BY 4.0:
    DIGITS_LICENSE.txt beside the file; tests/data/make_digits.py wrote it), without needing scikit-learn.
    """
    ref = resources.files("sdtool.data").joinpath(DIGITS_FILE)
    if not ref.is_file():
        raise SdtoolError(f"digits: {DIGITS_FILE} is missing from the installed sdtool package; reinstall sdtool")
    with ref.open("rb") as f, np.load(f, allow_pickle=False) as z:
        return z["images"], z["target"].astype(np.int64)


@register("digits")
def load_digits_source(cfg: DataConfig, need_train: bool) -> Source:
    """The bundled 8x8 digits (offline): values 0-16 -> 0-255, bilinear to 32x32, grey -> RGB."""
    images, y = digits_arrays()
    # Scaled in float64 as scikit-learn's float images were, so the rounding (and every pixel) is unchanged.
    grey = torch.from_numpy(np.round(images.astype(np.float64) * (255 / 16)).astype(np.uint8))[:, None]
    size = cfg.input_size or DIGITS_SIZE
    x = resize_uint8(grey, size).expand(-1, 3, -1, -1).contiguous()
    test_idx, train_idx = stratified_split(y, DIGITS_TEST, seed=0)
    xt = torch.from_numpy(train_idx)
    mean, std = (DIGITS_MEAN, DIGITS_STD) if size == DIGITS_SIZE else channel_stats(x[xt])
    return Source(
        train=TensorSplit(x[xt], y[train_idx]),
        test=TensorSplit(x[torch.from_numpy(test_idx)], y[test_idx]),
        class_names=[str(i) for i in range(10)],
        input_size=size,
        mean=mean,
        std=std,
        in_memory=True,
    )


def _square(x: torch.Tensor, size: int | None, what: Path) -> torch.Tensor:
    h, w = x.shape[-2:]
    if size is None and h != w:
        raise SdtoolError(
            f"{what.absolute()}: images are {h}x{w}, not square; set data.input_size to "
            f"the square side they should be resized to"
        )
    return resize_uint8(x, size or h)


def npz_paths(cfg: DataConfig) -> tuple[Path, Path]:
    """The npz data set's (training file, test file)."""
    root = Path(cfg.root)
    return root / (cfg.train_file or "train.npz"), root / (cfg.test_file or "test.npz")


@register("npz")
def load_npz_source(cfg: DataConfig, need_train: bool) -> Source:
    """`root/train_file` and `root/test_file` (x uint8 N x H x W x C, y ints); classes from `root/classes.txt`."""
    root = Path(cfg.root)
    train_path, test_path = npz_paths(cfg)
    for path, key in ((test_path, "test_file"), (train_path, "train_file")):
        if not path.is_file() and (key == "test_file" or need_train):
            raise SdtoolError(
                f"npz: {path.absolute()} not found; expected {NPZ_EXPECTED} there (set data.root and data.{key})"
            )
    x_test, y_test = load_images_npz(test_path)
    cifar_like = x_test.shape[1:] == (32, 32, 3)
    # The training pixels are read only when needed: to train, to carve a validation split, or to
    # compute default mean/std for data that is not CIFAR-shaped.
    read_train = need_train or (_needs_stats(cfg) and not cifar_like)
    train = None
    if read_train:
        x_train, y_train = load_images_npz(train_path)
        if x_train.shape[1:3] != x_test.shape[1:3]:
            raise SdtoolError(
                f"{train_path.absolute()} holds {x_train.shape[1]}x{x_train.shape[2]} images but "
                f"{test_path.absolute()} holds {x_test.shape[1]}x{x_test.shape[2]}; both must match"
            )
        train = TensorSplit(_square(to_nchw(x_train), cfg.input_size, train_path), y_train)
    test = TensorSplit(_square(to_nchw(x_test), cfg.input_size, test_path), y_test)

    names_file = root / "classes.txt"
    if names_file.is_file():
        class_names = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
    else:
        # Without names, the class count is the largest label + 1 over both files (the train labels
        # are read even for eval-only runs, so the count never depends on what the caller needed).
        labels = [y_test]
        if train is not None:
            labels.append(train.labels)
        elif train_path.is_file():
            labels.append(read_npz_labels(train_path))
        class_names = [str(i) for i in range(max(int(lab.max(initial=-1)) for lab in labels) + 1)]
    for split, path in ((train, train_path), (test, test_path)):
        if split is not None and len(split.labels) and split.labels.max() >= len(class_names):
            raise SdtoolError(
                f"{path.absolute()}: label {split.labels.max()} but {names_file.absolute()} names "
                f"only {len(class_names)} classes (one per line, line i = label i)"
            )

    mean: tuple[float, ...]
    std: tuple[float, ...]
    if cifar_like:  # 32x32 RGB source images: the official CIFAR values, even when resized
        mean, std = CIFAR_MEAN, CIFAR_STD
    elif train is not None:
        mean, std = channel_stats(train.x)
    else:  # the caller gave mean and std, so these are never used
        mean, std = (0.5,) * 3, (0.25,) * 3
    return Source(
        train=train if need_train else None,
        test=test,
        class_names=class_names,
        input_size=test.x.shape[-1],
        mean=mean,
        std=std,
        in_memory=True,
    )


@register("fake")
def load_fake_source(cfg: DataConfig, need_train: bool) -> Source:
    """Tiny deterministic data for tests: `fake_size` training and max(10, fake_size // 4) test images.

    Unlike torchvision's FakeData (pure noise) each class has its own coarse 4x4 colour pattern under
    the noise, so a tiny model can learn it in a few steps and tests can check that training works.
    """
    size = cfg.input_size or 32
    protos = torch.randint(0, 256, (10, 3, 4, 4), generator=torch.Generator().manual_seed(0)).float()

    def make(n: int, seed: int) -> TensorSplit:
        g = torch.Generator().manual_seed(seed)
        y = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]  # balanced classes, shuffled
        base = F.interpolate(protos[y], size=(size, size), mode="nearest")
        noise = torch.randint(-64, 65, (n, 3, size, size), generator=g)
        return TensorSplit((base + noise).clamp_(0, 255).to(torch.uint8), y.numpy())

    train = make(cfg.fake_size, 1)
    mean, std = channel_stats(train.x)
    return Source(
        train=train if need_train else None,
        test=make(max(10, cfg.fake_size // 4), 2),
        class_names=[str(i) for i in range(10)],
        input_size=size,
        mean=mean,
        std=std,
        in_memory=True,
    )
