"""CIFAR-10 and CIFAR-100, read from the python-version batch files without trusting them.

The batch files are pickles. A plain `pickle.load` (what torchvision's dataset classes do) runs any
code a tampered file names, so sdtool reads them with an unpickler that resolves only what a real
batch holds: numpy arrays (`numpy.ndarray`, `numpy.dtype`, numpy's `_reconstruct`) and
`_codecs.encode` (how Python 3 pickles bytes). Every other global is refused with one line, before
anything runs. Downloading (`data.download: true`) only fetches and extracts the archive.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdtool.data.arrays import TensorSplit, resize_uint8, to_nchw
from sdtool.data.registry import Source, register
from sdtool.data.sources import CIFAR_MEAN, CIFAR_STD
from sdtool.errors import SdtoolError

if TYPE_CHECKING:
    from sdtool.recipe import DataConfig

LAYOUT = {  # folder, training batches, test batch, meta file, label key, class-name key, archive
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                "labels", "label_names", "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names",
                 "cifar-100-python.tar.gz"),
}


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as fn  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct as fn
    return fn


class _ArraysOnly(pickle.Unpickler):
    """Unpickler that builds numpy arrays, lists, dicts, numbers and strings, and nothing else."""

    def __init__(self, f, path: Path):
        super().__init__(f, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _reconstruct()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        raise SdtoolError(f"{self.path}: refused to load, it asks for {module}.{name}, which a CIFAR batch file "
                          "never holds; replace it with the original file from the CIFAR archive")


def read_batch(path: Path) -> dict:
    """One batch file as a dict with str keys ("data", "labels", ...).

    The archive's files were written by Python 2, whose strings arrive as bytes (encoding="bytes", as
    the data set's own page reads them); keys are decoded so that files re-saved by Python 3 read alike.
    """
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f, path).load()
    except SdtoolError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or foreign file: one line for the user
        raise SdtoolError(f"{path} is not a readable CIFAR batch file ({type(e).__name__}); "
                          "extract it again from the CIFAR archive") from None
    if not isinstance(obj, dict):
        raise SdtoolError(f"{path} is not a CIFAR batch file (holds {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _download(root: Path, name: str) -> None:
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as e:  # noqa: BLE001 - no network, proxy, disk: the same advice either way
        first = (str(e).splitlines() or [""])[0]
        raise SdtoolError(f"{name}: downloading into {root.absolute()} failed ({type(e).__name__}: {first}); "
                          f"download: true needs network access, otherwise extract {cls.filename} there") from None


def _split(folder: Path, files: list[str], label_key: str) -> TensorSplit:
    xs, ys = [], []
    for fname in files:
        batch = read_batch(folder / fname)
        if "data" not in batch or label_key not in batch:
            raise SdtoolError(f"{folder / fname} has no 'data' or {label_key!r} entry; it is not a batch of this data set")
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
    x = np.concatenate(xs).transpose(0, 2, 3, 1)  # NHWC, as the other loaders hand to to_nchw
    return TensorSplit(to_nchw(x), np.concatenate(ys))


def load_cifar(cfg: "DataConfig", need_train: bool, name: str) -> Source:
    """The python-version files under data.root, at data.input_size (default 32, the images' own)."""
    folder_name, train_files, test_file, meta_file, label_key, names_key, archive = LAYOUT[name]
    root = Path(cfg.root)
    folder = (root / folder_name).absolute()
    wanted = [*(train_files if need_train else []), test_file, meta_file]
    if cfg.download and not all((folder / f).is_file() for f in wanted):
        _download(root, name)
    missing = [f for f in wanted if not (folder / f).is_file()]
    if missing:
        raise SdtoolError(f"{name}: {folder}/ does not hold the python-version files {', '.join(wanted)} "
                          f"(from {archive}; missing {missing[0]}); put them there, or set data.download: true "
                          "(needs network access)")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in read_batch(folder / meta_file)[names_key]]

    def split(files: list[str]) -> TensorSplit:
        s = _split(folder, files, label_key)
        return TensorSplit(resize_uint8(s.x, cfg.input_size or 32), s.labels)

    test = split([test_file])
    return Source(train=split(train_files) if need_train else None, test=test, class_names=classes,
                  input_size=test.x.shape[-1], mean=CIFAR_MEAN, std=CIFAR_STD, in_memory=True)


@register("cifar10")
def load_cifar10_source(cfg: "DataConfig", need_train: bool) -> Source:
    return load_cifar(cfg, need_train, "cifar10")


@register("cifar100")
def load_cifar100_source(cfg: "DataConfig", need_train: bool) -> Source:
    return load_cifar(cfg, need_train, "cifar100")
