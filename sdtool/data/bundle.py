"""`build_data(cfg)` -> `DataBundle`: the datasets, their metadata and the batch-side transforms.

Split order, fixed so that a recorded (val size, val seed) rebuilds the same validation images:
  1. the data set's own train/test split (digits: stratified 1437/360, seed 0);
  2. validation: `val_size` images held out of the whole training split, stratified, seeded by
     `val_seed`, with eval transforms;
  3. `limit_train` / `limit_test`: a fixed stratified sample (seed 0) of what remains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

# Importing the loaders registers them, in this order (the order `dataset_names()` lists).
from sdtool.data import sources  # noqa: F401  isort: skip
from sdtool.data import cifar  # noqa: F401  isort: skip
from sdtool.data import imagefolder  # isort: skip
from sdtool.data.augment import cutout, normalize_, per_image_transform, random_crop_flip
from sdtool.data.loader import Shard, make_loader
from sdtool.data.registry import Source, get_loader
from sdtool.data.splits import limit, split_fingerprint, stratified_split, val_count
from sdtool.errors import SdtoolError

if TYPE_CHECKING:
    from sdtool.recipe import AugmentConfig, DataConfig


def _default_augment() -> AugmentConfig:
    from sdtool.recipe import AugmentConfig

    return AugmentConfig()


@dataclass
class DataBundle:
    """Everything the engine needs from the data side.

    In-memory data sets (digits, npz, fake, cifar10, cifar100) yield (x uint8 (B, 3, S, S), y int64 (B,))
    batches and `prepare` turns them into the network's input on the device. imagefolder yields
    normalized float batches and `prepare` returns them unchanged.
    """

    train: Dataset | None  # None when built with train=False
    val: Dataset | None  # held out of the training split, eval transforms; None without val_size
    test: Dataset
    num_classes: int
    class_names: list[str]
    input_size: int  # square side fed to the network
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # {"size", "seed", "of" (training images it was cut from), "fingerprint"}, recorded in checkpoints;
    # None without a validation split
    val_info: dict | None
    augment: AugmentConfig = field(default_factory=_default_augment)
    in_memory: bool = True
    # False when crop + flip already ran per image in the dataset (the AutoAugment path).
    batch_crop_flip: bool = True
    _stats: dict = field(default_factory=dict, repr=False, compare=False)  # device -> (mean, std) tensors

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            self._stats[device] = tuple(
                torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in (self.mean, self.std)
            )
        return self._stats[device]

    def prepare(self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Batch from the loader (already on the device) -> float normalized (B, 3, S, S) on that device.

        In-memory data, train: crop + flip (batched, unless AutoAugment did them per image), /255,
        Cutout, Normalize; eval: /255, Normalize. Random draws use the device's default generator
        (saved and restored by the engine, so resume is exact) unless `generator` is given.
        """
        if not self.in_memory:
            return x
        if x.dtype != torch.uint8:
            raise TypeError(f"prepare() expects the uint8 batch the loader yields, got {x.dtype}")
        a = self.augment
        if train and self.batch_crop_flip and ((a.crop and a.crop_padding > 0) or a.flip):
            x = random_crop_flip(x, a.crop_padding, a.crop_fill, crop=a.crop, flip=a.flip, generator=generator)
        x = x.float().div_(255)  # the same op as ToTensor
        if train and a.cutout > 0:
            x = cutout(x, a.cutout, generator=generator)
        return normalize_(x, *self._mean_std(x.device))

    def loader(
        self,
        split: str,
        batch_size: int,
        shuffle: bool,
        seed: int,
        workers: int = 0,
        distributed: bool = False,
        drop_last: bool = False,
        pin_memory: bool = False,
    ) -> DataLoader:
        """DataLoader for "train", "val" or "test"; call `loader.sampler.set_epoch(epoch)` each epoch.

        Epoch k's order depends only on (seed, k) (see `sdtool.data.loader`); the loader yields
        [x, y] batches and `len(loader)` is the number of batches.
        """
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        ds = getattr(self, split)
        if ds is None:
            why = "set data.val_size to hold out a validation split" if split == "val" else "build with train=True"
            raise SdtoolError(f"no {split} split in this data; {why}")
        return make_loader(
            ds,
            batch_size,
            shuffle,
            seed,
            workers=workers,
            drop_last=drop_last,
            pin_memory=pin_memory,
            shard=Shard() if distributed else None,
        )


def _check_augment(a: AugmentConfig) -> None:
    checks = [
        (a.crop_padding >= 0, f"data.augment.crop_padding must be >= 0, got {a.crop_padding}"),
        (0 <= a.crop_fill <= 255, f"data.augment.crop_fill must be a pixel value 0-255, got {a.crop_fill}"),
        (a.cutout >= 0, f"data.augment.cutout must be >= 0 (0 = off), got {a.cutout}"),
    ]
    for key in ("mean", "std"):
        v = getattr(a, key)
        checks.append((v is None or len(v) == 3, f"data.augment.{key} must list 3 values (R, G, B), got {v}"))
    checks.append((a.std is None or all(s > 0 for s in a.std), f"data.augment.std must be positive, got {a.std}"))
    for ok, msg in checks:
        if not ok:
            raise SdtoolError(f"{msg}; fix the recipe or the --set value")


def _where(cfg: DataConfig, split: str) -> str:
    """How a message names a split: npz by its file, imagefolder by its folder, the others by name."""
    if cfg.name == "npz":
        return f"npz {split} file {sources.npz_paths(cfg)[0 if split == 'train' else 1].absolute()}"
    if cfg.name == "imagefolder":
        return f"imagefolder {(Path(cfg.root) / ('train' if split == 'train' else 'val')).absolute()}"
    return f"the {split} split of data set {cfg.name}"


def _check_source(cfg: DataConfig, src: Source, train: bool, need_train: bool) -> None:
    """Refuse empty splits and empty images before anything is built on them (an empty training split
    would "train" 0 steps and save an untrained network; 0x0 images fail mid-run)."""
    if len(src.test.labels) == 0:
        raise SdtoolError(f"{_where(cfg, 'test')} holds 0 images; evaluation needs at least one: add test images")
    if need_train and src.train is not None and len(src.train.labels) == 0:
        why = "training needs images" if train else "the validation split (data.val_size) is cut from it"
        raise SdtoolError(f"{_where(cfg, 'train')} holds 0 images; {why}: add training images")
    if src.input_size < 1:
        raise SdtoolError(
            f"data set {cfg.name} gives {src.input_size}x{src.input_size}-pixel images; set data.input_size "
            f"or fix the images"
        )


# Data sets whose classes the user's own files define. The others (digits, fake, cifar10, cifar100) have a
# fixed class list that their real files fill; only the validation split can empty a class there.
USER_LABELLED = ("npz", "imagefolder")


def _check_classes(cfg: DataConfig, src: Source, labels: np.ndarray, held_out: bool) -> None:
    """Every class needs a training image: one without any is never learnt, and its exits' accuracy and
    thresholds would be fitted on a class the network cannot predict."""
    k = len(src.class_names)
    empty = np.flatnonzero(np.bincount(labels, minlength=k)[:k] == 0)
    if len(empty) == 0:
        return
    shown = ", ".join(repr(src.class_names[i]) for i in empty[:5]) + (", ..." if len(empty) > 5 else "")
    fix = (
        "lower data.val_size or add training images of those classes"
        if held_out
        else "add training images of those classes, or relabel the data so that its classes 0..K-1 all have images"
    )
    after = " after the validation split is held out" if held_out else ""
    raise SdtoolError(
        f"{_where(cfg, 'train')} has no training image of {len(empty)} of its {k} classes{after} ({shown}); {fix}"
    )


def _check_train_size(cfg: DataConfig, n: int, size: int, in_memory: bool) -> None:
    """Refuse training sets that cannot make one step, and random crops that can miss the image."""
    # The training loader drops a final batch of one image (batch norm cannot train on it), so one image
    # would make 0 steps: an "empty" run that saves an untrained network.
    if n < 2:
        causes = [k for k, on in (("data.val_size", cfg.val_size > 0), ("data.limit_train", cfg.limit_train)) if on]
        cut = f" after {' and '.join(causes)}" if causes else ""
        raise SdtoolError(
            f"{_where(cfg, 'train')} leaves {n} training image{cut}; training needs at least 2 (a final batch of "
            f"one is dropped): add training images" + (f" or change {' / '.join(causes)}" if causes else "")
        )
    a = cfg.augment
    # In-memory crops pad by crop_padding and take offsets in [0, 2 x padding]: beyond the image side most
    # crops would be fill alone. (imagefolder's RandomResizedCrop takes no padding.)
    if in_memory and a.crop and a.crop_padding > size:
        raise SdtoolError(
            f"data.augment.crop_padding={a.crop_padding} is more than the {size}x{size} input images of data "
            f"set {cfg.name}: most random crops would be padding alone; set it to at most {size}"
        )


def build_data(cfg: DataConfig, train: bool = True) -> DataBundle:
    """Load `cfg.name` and cut its splits. train=False skips the training set (it is still read
    when a validation split is asked for, since that split is carved out of it)."""
    a = cfg.augment
    _check_augment(a)
    need_train = train or cfg.val_size > 0
    src = get_loader(cfg.name)(cfg, need_train)
    _check_source(cfg, src, train, need_train)
    mean = tuple(float(v) for v in a.mean) if a.mean is not None else src.mean
    std = tuple(float(v) for v in a.std) if a.std is not None else src.std
    size = src.input_size

    if src.in_memory:
        eval_tf = None
        train_tf = (
            per_image_transform(size, a.crop, a.crop_padding, a.crop_fill, a.flip, a.autoaugment_policy or "cifar10")
            if a.autoaugment
            else None
        )
    else:
        eval_tf = imagefolder.eval_transform(size, mean, std)
        train_tf = imagefolder.train_transform(a, size, mean, std)

    train_ds = val_ds = val_info = None
    if need_train:
        assert src.train is not None
        labels = src.train.labels
        train_idx = np.arange(len(labels), dtype=np.int64)
        if cfg.val_size > 0:
            n_val = val_count(cfg.val_size, len(labels))
            val_idx, train_idx = stratified_split(labels, n_val, cfg.val_seed)
            val_ds = src.train.subset(val_idx, eval_tf)
            val_info = {
                "size": n_val,
                "seed": cfg.val_seed,
                "of": len(labels),
                "fingerprint": split_fingerprint(labels, val_idx),
            }
        if train:
            if cfg.name in USER_LABELLED:
                _check_classes(cfg, src, labels, held_out=False)
            if cfg.val_size > 0:
                _check_classes(cfg, src, labels[train_idx], held_out=True)
            train_idx = train_idx[limit(labels[train_idx], cfg.limit_train, "limit_train")]
            _check_train_size(cfg, len(train_idx), size, src.in_memory)
            train_ds = src.train.subset(train_idx, train_tf)
    test_ds = src.test.subset(limit(src.test.labels, cfg.limit_test, "limit_test"), eval_tf)

    return DataBundle(
        train=train_ds,
        val=val_ds,
        test=test_ds,
        num_classes=len(src.class_names),
        class_names=list(src.class_names),
        input_size=size,
        mean=mean,
        std=std,
        val_info=val_info,
        augment=a,
        in_memory=src.in_memory,
        batch_crop_flip=not a.autoaugment,
    )
