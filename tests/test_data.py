"""Data sets, splits, batched augmentation and loaders (sdtool.data).

Real data: the digits shipped in the package, and the CIFAR-10 copy in ../shared/data/cifar10 (next to the
repository; tests that need it skip when it is absent).
"""

from __future__ import annotations

import pickle
import urllib.error
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from sdtool.data import DataBundle, build_data, dataset_names, load_images_npz
from sdtool.data.arrays import channel_stats, resize_uint8
from sdtool.data.augment import cutout, random_crop_flip
from sdtool.data.loader import Shard, make_loader
from sdtool.data.sources import CIFAR_MEAN, CIFAR_STD, DIGITS_MEAN, DIGITS_STD, digits_arrays
from sdtool.data.splits import stratified_split
from sdtool.errors import SdtoolError
from sdtool.recipe import AugmentConfig, DataConfig

CIFAR_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
needs_cifar = pytest.mark.skipif(
    not (CIFAR_DIR / "test.npz").is_file(), reason=f"real CIFAR-10 copy not found at {CIFAR_DIR} (see the data README)"
)


def cfg(**kw) -> DataConfig:
    aug = kw.pop("augment", {})
    return DataConfig(augment=AugmentConfig(**aug), **kw)


def one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(SdtoolError) as ei:
        fn(*args, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return build_data(cfg(name="digits"))


# ----------------------------------------------------------------------------------------- registry


def test_dataset_names_and_unknown_name():
    names = ["digits", "npz", "fake", "cifar10", "cifar100", "imagefolder"]
    assert dataset_names() == names
    msg = one_line_error(build_data, cfg(name="mnist"))
    assert "'mnist'" in msg and all(n in msg for n in names)


# ----------------------------------------------------------------------------------------- digits


def test_digits_splits_shapes_and_stats(digits):
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.num_classes == 10 and digits.class_names == [str(i) for i in range(10)]
    assert digits.input_size == 32 and digits.val is None and digits.val_info is None
    x, y = digits.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grey replicated to RGB
    assert int(digits.train.x.max()) == 255 and int(digits.train.x.min()) == 0
    # Stratified 80/20: 1797 digits have 174-183 per class, so each class has 35-37 test images.
    counts = np.bincount(digits.test.y.numpy(), minlength=10)
    assert counts.sum() == 360 and counts.min() >= 35 and counts.max() <= 37
    # The hard-coded defaults are the statistics of the training images.
    assert (digits.mean, digits.std) == (DIGITS_MEAN, DIGITS_STD)
    assert channel_stats(digits.train.x) == (DIGITS_MEAN, DIGITS_STD)


def test_digits_file_is_package_data_with_its_licence_note():
    images, target = digits_arrays()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and int(images.max()) == 16
    assert target.shape == (1797,) and target.dtype == np.int64 and np.bincount(target).min() >= 174
    note = resources.files("sdtool.data").joinpath("DIGITS_LICENSE.txt").read_text(encoding="utf-8")
    assert "CC BY 4.0" in note and "10.24432/C50P49" in note
    # A non-editable install (a wheel) has only what pyproject.toml declares as package data.
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert {"digits.npz", "DIGITS_LICENSE.txt"} <= set(pyproject["tool"]["setuptools"]["package-data"]["sdtool.data"])


def test_digits_are_scikit_learns_arrays_bit_for_bit(digits):
    """The shipped file replaced scikit-learn's loader: same values and order, and the same 32x32 pixels."""
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn is not installed (nothing to compare)")
    d = datasets.load_digits()
    images, target = digits_arrays()
    assert np.array_equal(images, d.images) and np.array_equal(target, d.target)
    # What the loader computed from scikit-learn's float images before, split the same way, pixel for pixel.
    grey = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8))[:, None]
    x = resize_uint8(grey, 32).expand(-1, 3, -1, -1)
    test_idx, train_idx = stratified_split(d.target.astype(np.int64), 360, seed=0)
    assert torch.equal(digits.train.x, x[torch.from_numpy(train_idx)])
    assert torch.equal(digits.test.x, x[torch.from_numpy(test_idx)])
    assert torch.equal(digits.train.y, torch.from_numpy(d.target[train_idx]))


def test_digits_input_size_resizes_once_and_recomputes_stats():
    b = build_data(cfg(name="digits", input_size=16))
    assert b.input_size == 16 and b.train.x.shape == (1437, 3, 16, 16)
    assert (b.mean, b.std) == channel_stats(b.train.x) and b.std != DIGITS_STD


def test_fake_is_deterministic_balanced_and_learnable():
    a, b = build_data(cfg(name="fake", fake_size=100)), build_data(cfg(name="fake", fake_size=100))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.x, b.test.x) and len(a.test) == 25
    assert np.bincount(a.train.y.numpy()).tolist() == [10] * 10 and a.class_names[3] == "3"
    # Each class has its own pattern under the noise: nearest class mean classifies the test set.
    means = torch.stack([a.train.x[a.train.y == c].float().mean(0) for c in range(10)])
    pred = torch.cdist(a.test.x.float().flatten(1), means.flatten(1)).argmin(1)
    assert torch.equal(pred, a.test.y)


# ----------------------------------------------------------------------------------------- npz


def write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    np.savez(path, x=x, y=y)


def test_npz_tiny_roundtrip_classes_and_stats(tmp_path):
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    x_te = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    y_tr, y_te = np.arange(20) % 4, np.array([0, 1, 2, 3, 0, 1])
    write_npz(tmp_path / "tr.npz", x_tr, y_tr)
    write_npz(tmp_path / "te.npz", x_te, y_te)
    c = cfg(name="npz", root=str(tmp_path), train_file="tr.npz", test_file="te.npz")

    b = build_data(c)
    assert b.class_names == ["0", "1", "2", "3"] and b.num_classes == 4 and b.input_size == 8
    assert torch.equal(b.train.x, torch.from_numpy(x_tr).permute(0, 3, 1, 2))
    assert torch.equal(b.test.y, torch.from_numpy(y_te))
    # Not 32x32: mean/std computed from the training pixels.
    v = x_tr.reshape(-1, 3) / 255
    assert np.allclose(b.mean, v.mean(0), atol=1e-4) and np.allclose(b.std, v.std(0), atol=1e-4)

    (tmp_path / "classes.txt").write_text("cat\ndog\nemu\nfox\n")
    assert build_data(c).class_names == ["cat", "dog", "emu", "fox"]
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    assert "label 3" in one_line_error(build_data, c)


def test_npz_grey_and_bad_files(tmp_path):
    x = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    write_npz(tmp_path / "g.npz", x, np.array([0, 1]))
    xs, ys = load_images_npz(tmp_path / "g.npz")
    assert xs.shape == (2, 4, 4, 1) and ys.dtype == np.int64
    b = build_data(cfg(name="npz", root=str(tmp_path), train_file="g.npz", test_file="g.npz"))
    assert torch.equal(b.test.x[1, 2], torch.from_numpy(x[1]))  # grey replicated to 3 channels

    write_npz(tmp_path / "f.npz", x.astype(np.float32), np.array([0, 1]))
    assert "uint8" in one_line_error(load_images_npz, tmp_path / "f.npz")
    np.savez(tmp_path / "k.npz", images=x)
    assert "no array x, y" in one_line_error(load_images_npz, tmp_path / "k.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert "could not be read" in one_line_error(load_images_npz, tmp_path / "junk.npz")


def test_npz_missing_file_names_full_path(tmp_path):
    msg = one_line_error(build_data, cfg(name="npz", root=str(tmp_path), test_file="test.npz"))
    assert str((tmp_path / "test.npz").absolute()) in msg and "x (uint8" in msg and "data.test_file" in msg
    np.savez(tmp_path / "test.npz", x=np.zeros((1, 32, 32, 3), np.uint8), y=np.zeros(1, np.int64))
    msg = one_line_error(build_data, cfg(name="npz", root=str(tmp_path), train_file="tr.npz"))
    assert str((tmp_path / "tr.npz").absolute()) in msg and "data.train_file" in msg
    # Eval-only builds of CIFAR-shaped data (official mean/std) do not need the training file.
    assert len(build_data(cfg(name="npz", root=str(tmp_path), train_file="tr.npz"), train=False).test) == 1


@needs_cifar
def test_npz_real_cifar10():
    c = cfg(name="npz", root=str(CIFAR_DIR), train_file="train_small.npz", test_file="test.npz", limit_test=200)
    b = build_data(c)
    assert b.class_names[:3] == ["airplane", "automobile", "bird"] and b.num_classes == 10
    assert (b.mean, b.std) == (CIFAR_MEAN, CIFAR_STD) and b.input_size == 32
    assert len(b.train) == 10000 and np.bincount(b.train.y.numpy()).tolist() == [1000] * 10
    # limit_test: a fixed stratified sample, so every class keeps 20 images.
    assert len(b.test) == 200 and np.bincount(b.test.y.numpy()).tolist() == [20] * 10
    x, y = load_images_npz(CIFAR_DIR / "test.npz")
    for i in (0, 57, 199):
        j = int(b.test.indices[i])
        assert torch.equal(b.test.x[i], torch.from_numpy(x[j]).permute(2, 0, 1)) and int(b.test.y[i]) == y[j]
    assert np.array_equal(build_data(c, train=False).test.indices, b.test.indices)  # same sample every run


# ----------------------------------------------------------------------------------------- prepare()


def fake_bundle(**aug) -> DataBundle:
    return build_data(cfg(name="fake", fake_size=64, augment=aug))


def test_prepare_eval_equals_torchvision_normalize():
    b = fake_bundle(cutout=16)
    x = b.test.x[:8]
    ref = TF.normalize(x.float() / 255, list(b.mean), list(b.std))
    assert torch.equal(b.prepare(x, train=False), ref)


def matching_windows(out: torch.Tensor, img: torch.Tensor, pad: int, fill: int) -> list[tuple[int, int, bool]]:
    """Every (dy, dx, flipped) whose window of the padded image equals `out`."""
    h, w = img.shape[-2:]
    padded = torch.nn.functional.pad(img, (pad,) * 4, value=fill)
    hits = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            win = padded[:, dy : dy + h, dx : dx + w]
            hits += [(dy, dx, f) for f, cand in ((False, win), (True, win.flip(-1))) if torch.equal(out, cand)]
    return hits


def test_random_crop_is_a_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (24, 3, 12, 12), dtype=torch.uint8, generator=g)
    out = random_crop_flip(x, padding=3, fill=7, crop=True, flip=False, generator=g)
    offsets = set()
    for i in range(len(x)):
        hits = matching_windows(out[i], x[i], 3, 7)
        assert len(hits) == 1 and not hits[0][2]
        offsets.add(hits[0][:2])
    assert len(offsets) > 10  # offsets really vary over [0, 6]^2
    # A window shifted by the full padding shows `fill` in its border rows/columns.
    assert (out == 7).any()


def test_flip_and_crop_flip_together():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (32, 3, 10, 10), dtype=torch.uint8, generator=g)
    out = random_crop_flip(x, padding=4, fill=128, crop=False, flip=True, generator=g)
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    assert all(f or torch.equal(o, xi) for f, o, xi in zip(flipped, out, x))
    assert 0 < sum(flipped) < len(x)
    out = random_crop_flip(x, padding=2, fill=128, generator=g)
    hits = [matching_windows(o, xi, 2, 128) for o, xi in zip(out, x)]
    assert all(len(h) == 1 for h in hits) and {h[0][2] for h in hits} == {False, True}


def test_cutout_matches_official_formula():
    n, size = 64, 16
    x = torch.ones(n, 3, 32, 32)
    out = cutout(x, size, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # replay the draws: rows then columns
    cy = torch.randint(0, 32, (n, 1), generator=g).flatten().tolist()
    cx = torch.randint(0, 32, (n, 1), generator=g).flatten().tolist()
    full = 0
    for i in range(n):
        # Official Cutout: y1, y2 = clip(y - L//2, 0, h), clip(y + L//2, 0, h); same for x.
        y1, y2 = np.clip([cy[i] - size // 2, cy[i] + size // 2], 0, 32)
        x1, x2 = np.clip([cx[i] - size // 2, cx[i] + size // 2], 0, 32)
        ref = torch.ones(3, 32, 32)
        ref[:, y1:y2, x1:x2] = 0
        assert torch.equal(out[i], ref)
        assert (out[i] == 0).sum() <= 3 * size * size
        full += (y2 - y1, x2 - x1) == (size, size)
    assert 0 < full < n  # some holes lie inside, some are clipped at a border


def test_prepare_train_composes_crop_flip_cutout_normalize():
    b = fake_bundle(cutout=8, crop_padding=4, crop_fill=128)
    x = b.train.x[:16]
    out = b.prepare(x, train=True, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    ref = cutout(random_crop_flip(x, 4, 128, generator=g).float() / 255, 8, generator=g)
    assert torch.equal(out, TF.normalize(ref, list(b.mean), list(b.std)))
    # The hole is zero on the [0, 1] scale, i.e. -mean/std after Normalize.
    hole = (ref == 0).all(1)
    assert hole.any()
    for c in range(3):
        assert torch.allclose(out[:, c][hole], torch.tensor(-b.mean[c] / b.std[c]))


def test_prepare_is_deterministic_under_seed():
    b = fake_bundle(cutout=16)
    x = b.train.x[:16]
    torch.manual_seed(0)
    a1 = b.prepare(x, train=True)
    torch.manual_seed(0)
    a2 = b.prepare(x, train=True)
    torch.manual_seed(1)
    a3 = b.prepare(x, train=True)
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(b.prepare(x, True, generator=g1), b.prepare(x, True, generator=g2))


def test_autoaugment_runs_per_image_in_the_dataset():
    b = fake_bundle(autoaugment=True, crop_padding=4)
    torch.manual_seed(0)
    items = [b.train[i][0] for i in range(8)]
    assert all(t.shape == (3, 32, 32) and t.dtype == torch.uint8 for t in items)
    torch.manual_seed(0)
    assert all(torch.equal(t, b.train[i][0]) for i, t in enumerate(items))  # global RNG -> reproducible
    assert sum(not torch.equal(t, b.train.x[i]) for i, t in enumerate(items)) >= 6  # really augmented
    # Crop and flip already happened per image: prepare(train) only scales and normalizes (no cutout set).
    x, _ = next(iter(b.loader("train", 8, shuffle=False, seed=0)))
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 32, 32)
    assert torch.equal(b.prepare(x, train=True), b.prepare(x, train=False))
    assert (
        b.val is None
        and build_data(cfg(name="fake", fake_size=64, val_size=10, augment={"autoaugment": True})).val.transform is None
    )


# ----------------------------------------------------------------------------------------- splits


def test_val_split_sizes_seed_and_disjointness(digits):
    b = build_data(cfg(name="digits", val_size=0.1, val_seed=4))
    assert {k: b.val_info[k] for k in ("size", "seed", "of")} == {"size": 144, "seed": 4, "of": 1437}
    assert (len(b.val), len(b.train)) == (144, 1293)
    tr, va = set(b.train.indices.tolist()), set(b.val.indices.tolist())
    assert not tr & va and tr | va == set(range(1437))
    assert torch.equal(b.val.x, digits.train.x[torch.from_numpy(b.val.indices)])
    counts = np.bincount(b.val.y.numpy(), minlength=10)
    assert counts.min() >= 13 and counts.max() <= 16  # stratified: ~14.4 per class
    assert np.array_equal(build_data(cfg(name="digits", val_size=0.1, val_seed=4)).val.indices, b.val.indices)
    assert not np.array_equal(build_data(cfg(name="digits", val_size=0.1, val_seed=5)).val.indices, b.val.indices)
    # A count, and limit_train applied after the split (never takes validation images).
    c = build_data(cfg(name="digits", val_size=100, val_seed=4, limit_train=50))
    assert len(c.val) == 100 and len(c.train) == 50 and not set(c.train.indices) & set(c.val.indices)
    # Eval-only builds rebuild the same validation images.
    e = build_data(cfg(name="digits", val_size=0.1, val_seed=4), train=False)
    assert e.train is None and np.array_equal(e.val.indices, b.val.indices)


def test_val_split_too_large():
    for size in (1437, 5000):
        msg = one_line_error(build_data, cfg(name="digits", val_size=size))
        assert "1437 training images" in msg
    assert "val split" in one_line_error(build_data(cfg(name="fake", fake_size=20)).loader, "val", 4, False, 0)


# ----------------------------------------------------------------------------------------- cifar10/100


def test_cifar_missing_files_message(tmp_path):
    msg = one_line_error(build_data, cfg(name="cifar10", root=str(tmp_path)))
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert all(s in msg for s in ("data_batch_1", "test_batch", "batches.meta", "download: true", "network"))
    msg = one_line_error(build_data, cfg(name="cifar100", root=str(tmp_path)))
    assert str(tmp_path / "cifar-100-python") in msg and "train, test, meta" in msg


def test_cifar_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    msg = one_line_error(build_data, cfg(name="cifar10", root=str(tmp_path), download=True))
    assert "downloading" in msg and "URLError" in msg and "network" in msg


def _cifar_files(folder: Path, names: list[str], meta: str, label_key: str, old_numpy: bool = False) -> dict:
    """Tiny batch files in the archive's layout: dicts with bytes keys (as Python 2 wrote them)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = {}
    for name in names:
        rows[name] = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        data = pickle.dumps({b"data": rows[name], label_key.encode(): [0, 1, 2, 9], b"batch_label": b"x"}, protocol=2)
        if old_numpy:  # the archive's files name numpy 1's module
            data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(data)
    names_key = {"labels": b"label_names", "fine_labels": b"fine_label_names"}[label_key]
    (folder / meta).write_bytes(pickle.dumps({names_key: [f"c{i}".encode() for i in range(10)]}, protocol=2))
    return rows


def test_cifar10_loads_python_batches_into_memory(tmp_path):
    rows = _cifar_files(
        tmp_path / "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
        "batches.meta",
        "labels",
        old_numpy=True,
    )
    b = build_data(cfg(name="cifar10", root=str(tmp_path)))
    assert (len(b.train), len(b.test), b.num_classes, b.class_names[9]) == (20, 4, 10, "c9")
    assert torch.equal(b.test.x[2], torch.from_numpy(rows["test_batch"][2].reshape(3, 32, 32)))
    assert b.test.y.tolist() == [0, 1, 2, 9]
    assert (b.mean, b.std) == (CIFAR_MEAN, CIFAR_STD)
    _cifar_files(tmp_path / "cifar-100-python", ["train", "test"], "meta", "fine_labels")
    c = build_data(cfg(name="cifar100", root=str(tmp_path), input_size=16), train=False)
    assert (len(c.test), c.input_size, c.class_names[0]) == (4, 16, "c0")


def test_cifar_batch_that_names_other_code_is_refused_before_it_runs(tmp_path):
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    _cifar_files(
        tmp_path / "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
        "batches.meta",
        "labels",
    )
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(pickle.dumps({b"data": Payload()}, protocol=2))
    msg = one_line_error(build_data, cfg(name="cifar10", root=str(tmp_path)))
    assert "refused" in msg and "system" in msg and str(bad) in msg
    assert not (tmp_path / "ran").exists()
    bad.write_bytes(b"\x80\x02}q\x00")  # truncated
    assert "not a readable CIFAR batch" in one_line_error(build_data, cfg(name="cifar10", root=str(tmp_path)))


class _Dtype:
    """Pickles as numpy.dtype(spec) with the given internal flags (a file may say anything)."""

    def __init__(self, spec, flags):
        self.spec, self.flags = spec, flags

    def __reduce__(self):
        return (np.dtype, (self.spec, False, True), (3, "|", None, None, None, -1, -1, self.flags))


class _Array:
    """Pickles as numpy's _reconstruct(ndarray) with the given dtype, shape and raw bytes."""

    def __init__(self, dtype, shape, raw):
        self.dtype, self.shape, self.raw = dtype, shape, raw

    def __reduce__(self):
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy 1.x (pyproject allows numpy>=1.24) names the module numpy.core
            from numpy.core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (0,), b"b"), (1, self.shape, self.dtype, False, self.raw))


def test_cifar_batch_state_cannot_steer_numpy(tmp_path):
    """numpy never sees a file's array state: an object dtype whose flags are cleared (numpy would read
    the raw bytes as object pointers and crash) is refused; a uint8 dtype claiming object flags loads
    as plain bytes; protocol-5 files and wrong contents give one line."""
    folder = tmp_path / "cifar-10-batches-py"
    rows = _cifar_files(folder, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "batches.meta", "labels")
    test = folder / "test_batch"

    def write(obj, protocol=2):
        test.write_bytes(pickle.dumps(obj, protocol=protocol))

    write({b"data": _Array(_Dtype("O8", 0), (1,), b"\x41" * 8), b"labels": [0]})
    assert "not plain numbers" in one_line_error(build_data, cfg(name="cifar10", root=str(tmp_path)))
    write({b"data": _Array(_Dtype("u1", 63), (1, 3072), bytes(3072)), b"labels": [3]})
    b = build_data(cfg(name="cifar10", root=str(tmp_path)), train=False)
    assert b.test.x.dtype == torch.uint8 and int(b.test.x.sum()) == 0 and b.test.y.tolist() == [3]
    write({"data": rows["test_batch"], "labels": [0, 1, 2, 9]}, protocol=5)  # numpy's _frombuffer path
    b = build_data(cfg(name="cifar10", root=str(tmp_path)), train=False)
    assert torch.equal(b.test.x[1], torch.from_numpy(rows["test_batch"][1].reshape(3, 32, 32)))
    bad = {
        "outside the 10 classes": {"data": rows["test_batch"], "labels": [0, 1, 2, 12]},
        "labels for 4 images": {"data": rows["test_batch"], "labels": [0, 1]},
        "not uint8 rows of 3072": {"data": rows["test_batch"][:, :100], "labels": [0, 1, 2, 3]},
        "does not match its shape": {b"data": _Array(_Dtype("u1", 0), (1, 3072), bytes(10)), b"labels": [0]},
    }
    for expected, obj in bad.items():
        write(obj)
        assert expected in one_line_error(build_data, cfg(name="cifar10", root=str(tmp_path)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"other": 1}))
    assert "label_names" in one_line_error(build_data, cfg(name="cifar10", root=str(tmp_path)))


# ----------------------------------------------------------------------------------------- imagefolder


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> Path:
    """root/{train,val}/<class>/ with real images: CIFAR-10 test images (PNG train, JPEG val), or
    digits when the CIFAR copy is absent."""
    if (CIFAR_DIR / "test.npz").is_file():
        x, y = load_images_npz(CIFAR_DIR / "test.npz")
        names = ["airplane", "cat", "ship"]
        pick = {n: x[y == c][:8] for n, c in zip(names, (0, 3, 8))}
    else:
        d = build_data(cfg(name="digits"))
        names = ["one", "seven", "zero"]
        pick = {n: d.test.x[d.test.y == c][:8].permute(0, 2, 3, 1).numpy() for n, c in zip(names, (1, 7, 0))}
    root = tmp_path_factory.mktemp("imagenet")
    for n, imgs in pick.items():
        for split, part, ext in (("train", imgs[:6], "png"), ("val", imgs[6:], "jpg")):
            (root / split / n).mkdir(parents=True)
            for i, im in enumerate(part):
                Image.fromarray(im).save(root / split / n / f"{i:04d}.{ext}")
    return root


def test_imagefolder_splits_and_transforms(image_tree):
    b = build_data(cfg(name="imagefolder", root=str(image_tree), input_size=32, val_size=3))
    assert b.class_names == sorted(p.name for p in (image_tree / "train").iterdir())
    assert (len(b.train), len(b.val), len(b.test), b.num_classes) == (15, 3, 6, 3)
    assert b.mean == (0.485, 0.456, 0.406) and not b.in_memory
    assert sorted(lab for _, lab in b.test.samples) == [0, 0, 1, 1, 2, 2]
    # Eval: Resize(32 * 256/224 = 36) + CenterCrop(32) + ToTensor + Normalize, deterministic.
    x, label = b.test[3]
    path, _ = b.test.samples[3]
    ref = TF.normalize(
        TF.to_tensor(TF.center_crop(TF.resize(Image.open(path).convert("RGB"), 36), 32)), list(b.mean), list(b.std)
    )
    assert label == 1 and x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert torch.allclose(x, ref, atol=1e-5)
    assert torch.equal(b.val[0][0], b.val[0][0])  # the validation split uses eval transforms
    torch.manual_seed(0)
    t1 = b.train[0][0]
    assert t1.shape == (3, 32, 32) and not torch.equal(t1, b.train[0][0])  # RandomResizedCrop/flip
    xb, yb = next(iter(b.loader("test", 4, shuffle=False, seed=0)))
    assert xb.shape == (4, 3, 32, 32) and torch.equal(b.prepare(xb, train=True), xb)  # already normalized
    assert yb.tolist() == [0, 0, 1, 1]


def test_imagefolder_missing_folders(tmp_path, image_tree):
    msg = one_line_error(build_data, cfg(name="imagefolder", root=str(tmp_path)))
    assert str(tmp_path / "train") in msg and "<class>" in msg
    (tmp_path / "train" / "cat").mkdir(parents=True)
    msg = one_line_error(build_data, cfg(name="imagefolder", root=str(tmp_path)))
    assert str(tmp_path / "val") in msg
    # Eval-only: only val/ is needed.
    b = build_data(cfg(name="imagefolder", root=str(image_tree), input_size=32), train=False)
    assert b.train is None and len(b.test) == 6


# ----------------------------------------------------------------------------------------- loaders


def epoch_order(loader, epoch: int) -> list[int]:
    loader.sampler.set_epoch(epoch)
    return [i for batch in loader.sampler for i in batch]


def test_loader_epochs_reproducible_and_rng_neutral():
    b = build_data(cfg(name="fake", fake_size=64))
    make = lambda seed: b.loader("train", 16, shuffle=True, seed=seed)  # noqa: E731
    a = make(3)
    e0, e1 = epoch_order(a, 0), epoch_order(a, 1)
    assert sorted(e0) == list(range(64)) and sorted(e1) == list(range(64)) and e0 != e1
    fresh = make(3)
    assert epoch_order(fresh, 1) == e1  # resuming at epoch 1 replays epoch 1
    assert epoch_order(make(4), 0) not in (e0, e1)
    # The batches the loader yields follow that order, and iterating never touches the global RNG.
    fresh.sampler.set_epoch(1)
    state = torch.get_rng_state()
    ys = torch.cat([y for _, y in fresh])
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(ys, b.train.y[e1]) and len(fresh) == 4
    assert epoch_order(b.loader("test", 5, shuffle=False, seed=0), 7) == list(range(len(b.test)))


def test_loader_drop_last_and_distributed_shards():
    b = build_data(cfg(name="fake", fake_size=64))
    assert len(b.loader("train", 10, shuffle=True, seed=0, drop_last=True)) == 6
    shards = []
    for rank in (0, 1):
        lo = make_loader(b.train, 8, shuffle=True, seed=0, shard=Shard(num_replicas=2, rank=rank))
        shards.append(epoch_order(lo, 2))
        assert hasattr(lo.sampler.sampler, "set_epoch") and len(lo) == 4
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(64))


def test_worker_processes_are_seeded_per_epoch():
    b = fake_bundle(autoaugment=True)

    def epoch_images(epoch: int) -> torch.Tensor:
        lo = b.loader("train", 16, shuffle=True, seed=0, workers=2)
        lo.sampler.set_epoch(epoch)
        return torch.cat([x for x, _ in lo])

    a = epoch_images(1)
    assert torch.equal(a, epoch_images(1)) and not torch.equal(a, epoch_images(2))
