"""CIFAR-10 and CIFAR-100, read from the python-version batch files without trusting them.

The batch files are pickles. A plain `pickle.load` (what torchvision's dataset classes do) runs any
code a tampered file names, so sdtool reads them with an unpickler that resolves only the globals a
real batch names (numpy's array reconstruction and dtype, `_codecs.encode`), and even those to
sdtool's own stand-ins: numpy never sees the file's array state (whose flags could make it read raw
bytes as object pointers). Arrays are rebuilt afterwards with `np.frombuffer`, plain numeric types
only, sizes checked. Every other global is refused with one line, before anything runs.
Downloading (`data.download: true`) only fetches and extracts the archive.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdtool.data.arrays import TensorSplit, resize_uint8, to_nchw
from sdtool.data.registry import Source, register
from sdtool.data.sources import CIFAR_MEAN, CIFAR_STD
from sdtool.errors import SdtoolError

if TYPE_CHECKING:
    from sdtool.recipe import DataConfig

LAYOUT = {  # folder, training batches, test batch, meta file, label key, class-name key, archive
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        "cifar-10-python.tar.gz",
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        "test",
        "meta",
        "fine_labels",
        "fine_label_names",
        "cifar-100-python.tar.gz",
    ),
}


# Element types an array in a batch file may have: plain numbers (no objects, no fields).
_NUMERIC = {"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"}


class _DTypeSpec:
    """Stands in for `numpy.dtype(spec, ...)`: records the spec and the byte order, nothing else.

    A real `np.dtype` would take its internal flags from the file (`__setstate__`), and a file can set
    them to make numpy read raw bytes as object pointers; so the file never touches numpy's own objects.
    """

    def __init__(self, spec, *_):
        self.spec = spec.decode("latin1") if isinstance(spec, bytes) else str(spec)
        self.order = "|"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in (b"<", b">", b"|", b"=", "<", ">", "|", "="):
            self.order = state[1].decode() if isinstance(state[1], bytes) else state[1]


class _ArraySpec:
    """Stands in for numpy's `_reconstruct(ndarray, ...)`: records (shape, dtype, fortran, raw bytes)."""

    def __init__(self, *_):
        self.state: Any = None  # whatever the file says: `_array` checks it

    def __setstate__(self, state):
        self.state = state


def _frombuffer(raw, dtype, shape, order):  # how numpy pickles arrays with protocol 5
    arr = _ArraySpec()
    raw = bytes(raw) if isinstance(raw, (bytearray, memoryview)) else raw
    arr.state = (1, tuple(shape) if isinstance(shape, list) else shape, dtype, order == "F", raw)
    return arr


def _array(spec: _ArraySpec, path: Path) -> np.ndarray:
    """A fresh numpy array from a recorded spec: numeric element types only, sizes checked."""
    st = spec.state
    ok = isinstance(st, tuple) and len(st) == 5 and isinstance(st[2], _DTypeSpec) and isinstance(st[4], bytes)
    ok = (
        ok and st[2].spec in _NUMERIC and isinstance(st[1], tuple) and all(isinstance(n, int) and n >= 0 for n in st[1])
    )
    if not ok:
        raise SdtoolError(
            f"{path}: holds an array that is not plain numbers; replace it with the original file "
            "from the CIFAR archive"
        )
    dtype = np.dtype(st[2].spec).newbyteorder(st[2].order if st[2].order != "|" else "=")
    count = int(np.prod(st[1], dtype=np.int64))
    if count * dtype.itemsize != len(st[4]):
        raise SdtoolError(
            f"{path}: an array's data ({len(st[4])} bytes) does not match its shape {st[1]}; "
            "extract the file again from the CIFAR archive"
        )
    arr = np.frombuffer(st[4], dtype=dtype, count=count)
    return arr.reshape(st[1], order="F" if st[3] else "C").astype(dtype.newbyteorder("="), copy=True)


def _materialise(obj, path: Path):
    """Replace every recorded array inside dicts, lists and tuples by a real numpy array."""
    if isinstance(obj, _ArraySpec):
        return _array(obj, path)
    if isinstance(obj, dict):
        return {k: _materialise(v, path) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, path) for v in obj)
    if isinstance(obj, _DTypeSpec):
        raise SdtoolError(f"{path}: holds a bare numpy dtype, which a CIFAR batch file never does")
    return obj


class _ArraysOnly(pickle.Unpickler):
    """Unpickler that builds dicts, lists, numbers, strings and placeholders for numpy arrays.

    Only four globals resolve, each to sdtool's own harmless stand-in (or to `codecs.encode`, which is
    how Python 3 pickles bytes); every other global is refused before anything is called.
    """

    def __init__(self, f, path: Path):
        super().__init__(f, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        numpy_core = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
        if name == "_reconstruct" and module in numpy_core:
            return _ArraySpec
        if name == "_frombuffer" and module in numpy_core:
            return _frombuffer
        if module == "numpy" and name == "ndarray":
            return _ArraySpec
        if module == "numpy" and name == "dtype":
            return _DTypeSpec
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        raise SdtoolError(
            f"{self.path}: refused to load, it asks for {module}.{name}, which a CIFAR batch file "
            "never holds; replace it with the original file from the CIFAR archive"
        )


def read_batch(path: Path) -> dict:
    """One batch file as a dict with str keys ("data", "labels", ...).

    The archive's files were written by Python 2, whose strings arrive as bytes (encoding="bytes", as
    the data set's own page reads them); keys are decoded so that files re-saved by Python 3 (any
    pickle protocol) read alike.
    """
    try:
        with open(path, "rb") as f:
            obj = _materialise(_ArraysOnly(f, path).load(), path)
    except SdtoolError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or foreign file: one line for the user
        raise SdtoolError(
            f"{path} is not a readable CIFAR batch file ({type(e).__name__}); extract it again from the CIFAR archive"
        ) from None
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
        raise SdtoolError(
            f"{name}: downloading into {root.absolute()} failed ({type(e).__name__}: {first}); "
            f"download: true needs network access, otherwise extract {cls.filename} there"
        ) from None


def _split(folder: Path, files: list[str], label_key: str, n_classes: int) -> TensorSplit:
    xs, ys = [], []
    for fname in files:
        path = folder / fname
        batch = read_batch(path)
        if "data" not in batch or label_key not in batch:
            raise SdtoolError(f"{path} has no 'data' or {label_key!r} entry; it is not a batch of this data set")
        x = np.asarray(batch["data"])
        y = np.asarray(batch[label_key])
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise SdtoolError(f"{path}: 'data' is {x.dtype} {x.shape}, not uint8 rows of 3072 pixels (3x32x32)")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise SdtoolError(f"{path}: {label_key!r} holds {y.shape} labels for {len(x)} images")
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise SdtoolError(f"{path}: labels run from {y.min()} to {y.max()}, outside the {n_classes} classes")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y.astype(np.int64))
    x = np.concatenate(xs).transpose(0, 2, 3, 1)  # NHWC, as the other loaders hand to to_nchw
    return TensorSplit(to_nchw(x), np.concatenate(ys))


def load_cifar(cfg: DataConfig, need_train: bool, name: str) -> Source:
    """The python-version files under data.root, at data.input_size (default 32, the images' own)."""
    folder_name, train_files, test_file, meta_file, label_key, names_key, archive = LAYOUT[name]
    root = Path(cfg.root)
    folder = (root / folder_name).absolute()
    wanted = [*(train_files if need_train else []), test_file, meta_file]
    if cfg.download and not all((folder / f).is_file() for f in wanted):
        _download(root, name)
    missing = [f for f in wanted if not (folder / f).is_file()]
    if missing:
        raise SdtoolError(
            f"{name}: {folder}/ does not hold the python-version files {', '.join(wanted)} "
            f"(from {archive}; missing {missing[0]}); put them there, or set data.download: true "
            "(needs network access)"
        )
    names = read_batch(folder / meta_file).get(names_key)
    if not isinstance(names, list) or not names:
        raise SdtoolError(f"{folder / meta_file} has no {names_key!r} list; extract it again from {archive}")
    classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in names]

    def split(files: list[str]) -> TensorSplit:
        s = _split(folder, files, label_key, len(classes))
        return TensorSplit(resize_uint8(s.x, cfg.input_size or 32), s.labels)

    test = split([test_file])
    return Source(
        train=split(train_files) if need_train else None,
        test=test,
        class_names=classes,
        input_size=test.x.shape[-1],
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        in_memory=True,
    )


@register("cifar10")
def load_cifar10_source(cfg: DataConfig, need_train: bool) -> Source:
    return load_cifar(cfg, need_train, "cifar10")


@register("cifar100")
def load_cifar100_source(cfg: DataConfig, need_train: bool) -> Source:
    return load_cifar(cfg, need_train, "cifar100")
