"""Data sets by name: one decorator registers a loader (as timm registers models).

A loader turns a `DataConfig` into a `Source`: the raw train/test splits plus the data set's defaults
(class names, input size, mean/std). Everything generic (validation split, limits, transforms,
loaders) is done once in `bundle.py` on top of a `Source`, so adding a data set is one function.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from torch.utils.data import Dataset

from sdtool.errors import SdtoolError

if TYPE_CHECKING:
    from sdtool.recipe import DataConfig


class Split(Protocol):
    """One split of raw data (all its images), able to cut index subsets into datasets."""

    labels: np.ndarray  # (N,) int64, used for stratified validation splits and limits

    def subset(self, indices: np.ndarray, transform: Callable[[Any], Any] | None) -> Dataset:
        """A dataset over `indices` (positions in this split) whose items go through `transform`."""
        ...


@dataclass
class Source:
    """What a loader returns; `train` is None when the caller did not need the training split."""

    train: Split | None
    test: Split
    class_names: list[str]
    input_size: int  # square side of the images the network sees
    mean: tuple[float, ...]  # per-channel defaults, on the [0, 1] scale
    std: tuple[float, ...]
    in_memory: bool  # True: uint8 tensors augmented on the batch; False: PIL pipeline per image


# A loader gets the data config and whether the training split is needed (eval-only runs skip it).
Loader = Callable[["DataConfig", bool], Source]
_LOADERS: dict[str, Loader] = {}


def register(name: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        _LOADERS[name] = fn
        return fn

    return deco


def dataset_names() -> list[str]:
    """Registered data-set names, in registration order."""
    return list(_LOADERS)


def get_loader(name: str) -> Loader:
    if name not in _LOADERS:
        close = difflib.get_close_matches(name, list(_LOADERS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise SdtoolError(f"unknown data set {name!r}; {hint}valid names: {', '.join(dataset_names())}")
    return _LOADERS[name]
