"""Write the checkpoint fixtures in tests/data/ckpt/ with the sdtool of the current commit.

These files pin the on-disk format: every later sdtool must load them unchanged (tests/test_fixtures.py).
Run it only to *add* a fixture kind; never regenerate existing files to make a failing test pass.

    python tests/data/make_fixtures.py

Each fixture is tiny (width-4 networks on 16x16 fake images); `expected.json` records, per file, the
deepest exit's logits summed over a fixed input, so a test can tell "loads" from "loads correctly".
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = HERE / "ckpt"

FAKE = [
    "data.name=fake",
    "data.fake_size=64",
    "data.input_size=16",
    "data.val_size=16",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "data.workers=0",
    "train.epochs=1",
    "train.limit_batches=1",
    "train.threads=1",
    "train.seed=0",
    "train.channels_last=false",
]


def _cli(*args: str) -> None:
    from typer.testing import CliRunner

    from sdtool.cli import app

    res = CliRunner().invoke(app, list(args))
    if res.exit_code != 0:
        raise RuntimeError(f"sdtool {' '.join(args)} failed: {res.output}\n{res.exception!r}")


def _sets(extra: list[str]) -> list[str]:
    return [x for s in FAKE + extra for x in ("--set", s)]


def make(work: Path) -> dict[str, Path]:
    quick = str(ROOT / "recipes" / "quickstart.yaml")
    files = {}
    _cli("train", quick, "--out", str(work / "sd"), *_sets(["model.width=4"]), "--json")
    files["trained"] = work / "sd" / "best.safetensors"
    _cli("prune", str(files["trained"]), "--out", str(work / "pruned.safetensors"), "--ratio", "0.5", "--json")
    files["pruned"] = work / "pruned.safetensors"
    _cli(
        "eval",
        str(files["pruned"]),
        "--early-exit",
        "--fit-thresholds",
        "--latency-images",
        "0",
        "--out",
        str(work / "thresholds.safetensors"),
        "--json",
    )
    files["thresholds"] = work / "thresholds.safetensors"
    _cli("export", str(files["thresholds"]), "--exit", "2", "--out", str(work / "exit2.safetensors"), "--json")
    files["exit2"] = work / "exit2.safetensors"
    _cli(
        "distill",
        quick,
        "--teacher",
        str(files["trained"]),
        "--out",
        str(work / "kd"),
        *_sets(["model.width=4", "model.name=resnet20"]),
        "--json",
    )
    files["distilled"] = work / "kd" / "best.safetensors"
    _cli(
        "train",
        quick,
        "--out",
        str(work / "tv"),
        *_sets(["model.name=torchvision:shufflenet_v2_x0_5", "model.head=pool", "model.exits=[2]", "model.width=null"]),
        "--json",
    )
    files["torchvision"] = work / "tv" / "best.safetensors"
    return files


def logits_sum(path: Path) -> float:
    import torch

    from sdtool import checkpoint

    model, meta = checkpoint.load(path)
    size = int(meta["input"]["size"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=g)
    with torch.no_grad():
        logits, _ = model(x)
    return float(logits[-1].double().sum())


def main() -> int:
    import torch

    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        files = make(Path(d))
        expected = {}
        for name, src in files.items():
            dst = OUT / f"{name}.safetensors"
            shutil.copyfile(src, dst)
            expected[name] = {"deepest_logits_sum": logits_sum(dst), "size": dst.stat().st_size}
    import sdtool

    (OUT / "expected.json").write_text(
        json.dumps({"written_by": sdtool.__version__, "files": expected}, indent=1) + "\n"
    )
    for name, e in expected.items():
        print(f"{name:12s} {e['size']:>9d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
