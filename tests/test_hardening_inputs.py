"""Hardening: recipe values without sane bounds (class 2) and degenerate data (class 3) are refused up front.

Every case runs the real CLI in-process and expects a refusal: exit status 1, the output's last line one
`error: ...` naming the problem, no traceback, and nothing written or changed under the test's folder
(no run folder, no half-written recipe.yaml or checkpoint). Memory estimates compare with a pinned
machine size, so the cases do not depend on the machine that runs them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import sdtool.memory
import sdtool.recipe
from sdtool.cli import app

CKPT = Path(__file__).resolve().parent / "data" / "ckpt" / "trained.safetensors"  # 10 classes, 16x16, fake data
QUICK = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
MEMORY = 8 * 2**30  # the machine size the memory estimates are compared with


def sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def npz(folder: Path, name: str, x: np.ndarray, y: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / name, x=x, y=np.asarray(y, dtype=np.int64))


def images(n: int, side: int = 16) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def npz_recipe(tmp: Path, train_y: list[int], test_y: list[int], side: int = 16) -> Path:
    """An npz data set under tmp/d (train.npz, test.npz) and a recipe tmp/r.yaml naming it."""
    d = tmp / "d"
    npz(d, "train.npz", images(len(train_y), side), train_y)
    npz(d, "test.npz", images(len(test_y), side), test_y)
    r = tmp / "r.yaml"
    r.write_text(f"data: {{name: npz, root: {d}, batch_size: 16}}\n")
    return r


TEN = list(range(10)) * 2  # 20 images, every class of the checkpoint


# --------------------------------------------------------------------------------------------- files


def latin1(tmp: Path) -> Path:
    p = tmp / "latin.yaml"
    p.write_bytes("# r\xe9sum\xe9\nmodel: {name: resnet20}\n".encode("latin-1"))
    return p


def binary(tmp: Path, name: str = "bin.yaml") -> Path:
    p = tmp / name
    p.write_bytes(bytes(range(256)) * 4)
    return p


def folder(tmp: Path) -> Path:
    p = tmp / "folder.yaml"
    p.mkdir()
    return p


# Each case: (setup(tmp) -> CLI arguments, words the error line must contain).
CLASS2 = {
    "width": (lambda t: ["train", QUICK, "--out", str(t / "run"), *sets("model.width=1000000")], "model.width must"),
    "width-memory": (
        lambda t: ["profile", QUICK, "--no-latency", *sets("model.width=60000")],
        "float32 parameters needs",
    ),
    "width-mult-memory": (
        lambda t: [
            "train",
            QUICK,
            "--out",
            str(t / "run"),
            *sets("model.name=mobilenet_v2", "model.width=null", "model.width_mult=900"),
        ],
        "model.width_mult=900",
    ),
    "seed-huge": (
        lambda t: ["train", QUICK, "--out", str(t / "run"), *sets("train.seed=100000000000000000000000")],
        "train.seed must be from 0 to 1000000000000",
    ),
    "seed-negative": (lambda t: ["train", QUICK, "--out", str(t / "run"), *sets("train.seed=-1")], "train.seed must"),
    "val-seed-negative": (
        lambda t: ["train", QUICK, "--out", str(t / "run"), *sets("data.val_seed=-3")],
        "data.val_seed must",
    ),
    "input-size": (
        lambda t: ["train", QUICK, "--out", str(t / "run"), *sets("data.input_size=100000")],
        "data.input_size must be from 1 to 8192",
    ),
    "input-size-memory": (  # one batch fits, the whole in-memory data set at that size does not
        lambda t: [
            "train",
            QUICK,
            "--out",
            str(t / "run"),
            *sets("data.input_size=4096", "data.batch_size=2", "data.eval_batch_size=2"),
        ],
        "holding 1797 images at 4096x4096 in memory needs",
    ),
    "batch-memory": (
        lambda t: ["train", QUICK, "--out", str(t / "run"), *sets("data.batch_size=10000000")],
        "one batch of 10000000 float32 32x32 RGB images needs",
    ),
    "eval-batch-memory": (
        lambda t: ["eval", str(CKPT), *sets("data.eval_batch_size=100000000")],
        "data.eval_batch_size=100000000",
    ),
    "workers-prefetch-memory": (
        lambda t: [
            "train",
            QUICK,
            "--out",
            str(t / "run"),
            *sets("data.name=imagefolder", "data.batch_size=256", "data.workers=64"),
        ],
        "64 workers prefetch",
    ),  # fmt: skip
    "fake-size-memory": (
        lambda t: ["train", QUICK, "--out", str(t / "run"), *sets("data.name=fake", "data.fake_size=100000000")],
        "data.fake_size=100000000",
    ),
    "epochs": (lambda t: ["train", QUICK, "--out", str(t / "run"), *sets("train.epochs=1000000000")], "train.epochs"),
    "workers": (lambda t: ["train", QUICK, "--out", str(t / "run"), *sets("data.workers=100000")], "data.workers"),
    "threads": (lambda t: ["train", QUICK, "--out", str(t / "run"), *sets("train.threads=100000")], "train.threads"),
    "recipe-latin1": (
        lambda t: ["train", str(latin1(t)), "--out", str(t / "run")],
        "is not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8",
    ),
    "recipe-binary": (lambda t: ["train", str(binary(t)), "--out", str(t / "run")], "is a binary file"),
    "recipe-folder": (lambda t: ["profile", str(folder(t))], "is a folder, not a file"),
    "recipe-folder-train": (lambda t: ["train", str(folder(t)), "--out", str(t / "run")], "is a folder, not a file"),
    "seed-float-literal": (
        lambda t: ["train", QUICK, "--out", str(t / "run"), *sets("train.seed=1e23")],
        "train.seed: expected an integer",
    ),
    "data-latin1": (lambda t: ["eval", str(CKPT), "--data", str(latin1(t))], "is not UTF-8 text"),
    "data-binary": (lambda t: ["eval", str(CKPT), "--data", str(binary(t))], "is a binary file"),
    "data-binary-not-yaml": (
        lambda t: ["eval", str(CKPT), "--data", str(binary(t, "weights.bin"))],
        "is a file, neither a recipe",
    ),
    "prune-data-folder": (
        lambda t: [
            "prune",
            str(CKPT),
            "--data",
            str(folder(t)),
            "--criterion",
            "taylor",
            "--ratio",
            "0.5",
            "--out",
            str(t / "p.safetensors"),
        ],
        "is a folder",
    ),  # fmt: skip
}


def val_takes_a_class(t: Path) -> list[str]:
    # 4 images of class 0, 1 of class 1: a validation split of 4 takes class 1's only image.
    npz(t / "d", "train.npz", images(5), [0, 0, 0, 0, 1])
    npz(t / "d", "test.npz", images(2), [0, 1])
    return ["train", QUICK, "--out", str(t / "run"), *sets("data.name=npz", f"data.root={t / 'd'}", "data.val_size=4")]


def zero_pixels(t: Path) -> list[str]:
    npz(t / "d", "train.npz", np.zeros((4, 0, 0, 3), np.uint8), [0, 1, 0, 1])
    npz(t / "d", "test.npz", np.zeros((2, 0, 0, 3), np.uint8), [0, 1])
    return ["train", QUICK, "--out", str(t / "run"), *sets("data.name=npz", f"data.root={t / 'd'}")]


def named_class_missing(t: Path) -> list[str]:
    r = npz_recipe(t, [0, 1, 2] * 4, [0, 1, 2, 3])
    (t / "d" / "classes.txt").write_text("cat\ndog\nemu\nfox\n")
    return ["train", str(r), "--out", str(t / "run")]


CLASS3 = {
    "fewer-than-one-batch": (
        lambda t: [
            "train",
            QUICK,
            "--out",
            str(t / "run"),
            *sets("data.name=fake", "data.fake_size=40", "data.val_size=0", "data.batch_size=64"),
        ],
        "40 training images, fewer than one batch of data.batch_size=64",
    ),
    "distill-fewer-than-one-batch": (
        lambda t: [
            "distill",
            QUICK,
            "--teacher",
            str(CKPT),
            "--out",
            str(t / "run"),
            *sets("data.name=fake", "data.fake_size=40", "data.val_size=0", "data.batch_size=64"),
        ],
        "fewer than one batch",
    ),
    "train-empty": (
        lambda t: ["train", str(npz_recipe(t, [], TEN)), "--out", str(t / "run")],
        "train.npz holds 0 images",
    ),
    "train-one-image": (
        lambda t: ["train", str(npz_recipe(t, [0], [0, 0])), "--out", str(t / "run")],
        "leaves 1 training image; training needs at least 2",
    ),
    "limit-train-one": (
        lambda t: ["train", QUICK, "--out", str(t / "run"), *sets("data.limit_train=1")],
        "leaves 1 training image after data.val_size and data.limit_train",
    ),
    "class-without-image": (
        lambda t: ["train", str(npz_recipe(t, [0, 2, 0, 2], [0, 1, 2])), "--out", str(t / "run")],
        "no training image of 1 of its 3 classes ('1')",
    ),
    "named-class-without-image": (named_class_missing, "no training image of 1 of its 4 classes ('fox')"),
    "val-split-takes-a-class": (val_takes_a_class, "after the validation split is held out ('1'); lower data.val_size"),
    "val-split-takes-all": (
        lambda t: ["train", QUICK, "--out", str(t / "run"), *sets("data.val_size=1437")],
        "leaves none to train on",
    ),
    "zero-pixel-images": (zero_pixels, "holds 0x0-pixel images"),
    "crop-padding-beyond-image": (
        lambda t: [
            "train",
            str(npz_recipe(t, TEN, TEN, side=4)),
            "--out",
            str(t / "run"),
            *sets("data.augment.crop_padding=5"),
        ],
        "crop_padding=5 is more than the 4x4 input images",
    ),  # fmt: skip
    "eval-test-empty": (lambda t: ["eval", str(CKPT), "--data", str(npz_recipe(t, TEN, []))], "holds 0 images"),
    "eval-val-empty-train": (
        lambda t: [
            "eval",
            str(CKPT),
            "--data",
            str(npz_recipe(t, [], TEN)),
            "--split",
            "val",
            *sets("data.val_size=0.1"),
        ],
        "train.npz holds 0 images",
    ),  # fmt: skip
    "prune-taylor-empty-train": (
        lambda t: [
            "prune",
            str(CKPT),
            "--data",
            str(npz_recipe(t, [], TEN)),
            "--criterion",
            "taylor",
            "--ratio",
            "0.5",
            "--out",
            str(t / "p.safetensors"),
        ],
        "train.npz holds 0 images",
    ),  # fmt: skip
}


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every file and folder under `root`: (size, mtime) for files, None for folders."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def assert_refused(tmp_path: Path, monkeypatch, setup, words: str) -> None:
    monkeypatch.setattr(sdtool.memory, "machine_memory", lambda: MEMORY)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory either
    args = setup(tmp_path)
    before = snapshot(tmp_path)
    res = CliRunner().invoke(app, args)
    out = res.output.strip()
    assert res.exit_code == 1, out
    assert isinstance(res.exception, SystemExit), res.exception  # not an escaped exception
    assert "Traceback" not in out
    last = out.splitlines()[-1]
    assert last.startswith("error: ") and words in last, last
    assert snapshot(tmp_path) == before, "a refused command wrote or changed files"


@pytest.mark.parametrize("case", list(CLASS2))
def test_recipe_values_and_files_are_refused(case, tmp_path, monkeypatch):
    assert_refused(tmp_path, monkeypatch, *CLASS2[case])


@pytest.mark.parametrize("case", list(CLASS3))
def test_degenerate_data_is_refused(case, tmp_path, monkeypatch):
    assert_refused(tmp_path, monkeypatch, *CLASS3[case])


def test_bounds_keep_legitimate_settings(monkeypatch):
    """The large settings real runs use pass: WRN-28-10 at 10x base width (14 GiB of weights), 512-pixel
    ImageNet inputs at batch 256 with 16 workers (25 GiB of prefetched batches), a timestamp seed."""
    monkeypatch.setattr(sdtool.memory, "machine_memory", lambda: 64 * 2**30)
    sdtool.recipe.from_dict({"model": {"name": "wrn_28_10", "width": 160}})
    sdtool.recipe.from_dict(
        {
            "model": {"name": "resnet50", "stem": "imagenet", "width": 64},
            "data": {"name": "imagefolder", "input_size": 512, "batch_size": 256, "workers": 16},
            "train": {"epochs": 600, "seed": 1_700_000_000, "threads": 64},
        }
    )
    sdtool.recipe.from_dict({"data": {"name": "imagefolder", "input_size": 224, "batch_size": 256, "workers": 32}})


def test_unreadable_image_file_is_named(tmp_path):
    """imagefolder opens files per batch: one that does not decode (PIL refuses 0x0 images as such) is
    named in one line instead of failing inside PIL."""
    from sdtool.data.imagefolder import FileImageDataset
    from sdtool.errors import SdtoolError

    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(SdtoolError, match=r"x\.png is not a readable image") as ei:
        FileImageDataset([(str(bad), 0)], np.arange(1), None)[0]
    assert "\n" not in str(ei.value)
