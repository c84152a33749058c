"""`imagefolder`: ImageNet layout, decoded and transformed per image with PIL (the standard pipeline).

    root/train/<class>/*.jpg   training split (the validation split, if any, is held out of it)
    root/val/<class>/*.jpg     the test split (ImageNet's "val", as every paper reports it)

Classes are the sorted folder names of train/ (the labels follow that order). Items are already
normalized float (3, S, S) tensors, so `DataBundle.prepare` passes them through.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2

from sdtool.data.augment import Cutout, autoaugment
from sdtool.data.registry import Source, register
from sdtool.errors import SdtoolError

if TYPE_CHECKING:
    from sdtool.recipe import AugmentConfig, DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224


class FileImageDataset(Dataset):
    """Image files -> (transform(PIL RGB image), label int)."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        indices: np.ndarray,
        transform: Callable[[Image.Image], torch.Tensor] | None,
    ) -> None:
        self.samples, self.indices, self.transform = samples, indices, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        # Files are only opened here, batch by batch (checking a million of them up front would take
        # minutes); a file that does not decode is named rather than left to fail inside PIL or a transform.
        # PIL refuses 0x0 images as undecodable, so that case lands here too.
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise SdtoolError(
                f"imagefolder: {Path(path).absolute()} is not a readable image ({first}); remove or replace it"
            ) from None
        if 0 in img.size:
            raise SdtoolError(
                f"imagefolder: {Path(path).absolute()} is a {img.size[0]}x{img.size[1]} image; remove or replace it"
            )
        return (self.transform(img) if self.transform is not None else img), label


class FileSplit:
    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples
        self.labels = np.array([s[1] for s in samples], dtype=np.int64)

    def subset(self, indices: np.ndarray, transform: Callable[[Any], Any] | None) -> FileImageDataset:
        indices = np.asarray(indices, dtype=np.int64)
        return FileImageDataset([self.samples[i] for i in indices], indices, transform)


def _tail(mean: tuple[float, ...], std: tuple[float, ...], cutout: int = 0) -> list:
    """PIL image -> float (3, S, S) on [0, 1] -> optional Cutout -> Normalize (as ToTensor + Normalize)."""
    ops: list = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()]
    if cutout > 0:
        ops.append(Cutout(cutout))
    return ops + [v2.Normalize(list(mean), list(std))]


def train_transform(a: AugmentConfig, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """RandomResizedCrop(size) + flip [+ AutoAugment] [+ Cutout] + Normalize; `crop: false` uses the eval crop."""
    ops: list = [v2.RandomResizedCrop(size, antialias=True)] if a.crop else _eval_crop(size)
    if a.flip:
        ops.append(v2.RandomHorizontalFlip())
    if a.autoaugment:
        ops.append(autoaugment(a.autoaugment_policy or "imagenet"))
    return v2.Compose(ops + _tail(mean, std, a.cutout))


def _eval_crop(size: int) -> list:
    # Resize the short side to size * 256/224 then centre-crop: the standard ImageNet evaluation ratio.
    return [v2.Resize(int(size * 256 / 224), antialias=True), v2.CenterCrop(size)]


def eval_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    return v2.Compose(_eval_crop(size) + _tail(mean, std))


def _scan(folder: Path, class_to_idx: dict[str, int], root: Path) -> list[tuple[str, int]]:
    try:
        return make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:  # a class folder without any image file
        first = (str(e).splitlines() or [""])[0]
        raise SdtoolError(f"imagefolder: {folder.absolute()}: {first}; {_layout(root)}") from None


def _classes(folder: Path, root: Path) -> tuple[list[str], dict[str, int]]:
    try:
        return find_classes(str(folder))
    except FileNotFoundError:
        raise SdtoolError(f"imagefolder: {folder.absolute()} has no class folders; {_layout(root)}") from None


def _layout(root: Path) -> str:
    r = root.absolute()
    return f"expected ImageNet layout {r}/train/<class>/*.jpg and {r}/val/<class>/*.jpg"


@register("imagefolder")
def load_imagefolder_source(cfg: DataConfig, need_train: bool) -> Source:
    root = Path(cfg.root)
    train_dir, val_dir = root / "train", root / "val"
    for d in (train_dir, val_dir) if need_train else (val_dir,):
        if not d.is_dir():
            raise SdtoolError(f"imagefolder: folder {d.absolute()} not found; {_layout(root)}")
    classes, class_to_idx = _classes(train_dir if train_dir.is_dir() else val_dir, root)
    val_classes = _classes(val_dir, root)[0]
    extra = sorted(set(val_classes) - set(classes))
    if extra:
        raise SdtoolError(
            f"imagefolder: {val_dir.absolute()} has class folders missing from train/: "
            f"{', '.join(extra[:5])}; both splits must use the same class folders"
        )
    test = FileSplit(_scan(val_dir, {c: class_to_idx[c] for c in val_classes}, root))
    train = FileSplit(_scan(train_dir, class_to_idx, root)) if need_train else None
    return Source(
        train=train,
        test=test,
        class_names=classes,
        input_size=cfg.input_size or DEFAULT_SIZE,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        in_memory=False,
    )
