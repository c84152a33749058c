"""The golden chain: a fixed-seed tiny train -> prune -> fine-tune -> fit thresholds -> export, run through
the real CLI, reduced to digests of every written tensor and of the metadata.

Refactors must leave these digests unchanged (tests/test_golden.py). When a change is *meant* to alter
numbers or metadata, regenerate the reference and say why in the commit:

    python -m tests.golden --write

Digests are exact (sha256 of the raw tensor bytes) on the platform that wrote the reference (torch
version and CPU capability recorded beside them); elsewhere float kernels may round differently, so
the test then compares per-tensor sums within a tolerance and the metadata exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "data" / "golden.json"

# Fields that name the time, the place or the invocation of a run, not its result.
VOLATILE = {
    "started",
    "ended",
    "parent",
    "parent_sha256",
    "argv",
    "sdtool_version",
    "seconds",
    "time_s",
    "images_per_s",
    "epoch_seconds",
    "elapsed_s",
    "path",
    "file",
    "out",
    "sha256",
    "run_dir",
}

DATA = [
    "data.name=fake",
    "data.fake_size=96",
    "data.input_size=16",
    "data.val_size=32",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "data.workers=0",
    "model.width=4",
    "train.epochs=1",
    "train.limit_batches=2",
    "train.threads=1",
    "train.seed=0",
    "train.channels_last=false",
]


def platform() -> dict:
    import torch

    return {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _scrub(obj):
    """The metadata with volatile fields removed and timings dropped (floats rounded to 6 digits). A key
    whose value is null counts as absent: readers treat both alike."""
    if isinstance(obj, dict):
        return {
            k: _scrub(v)
            for k, v in sorted(obj.items())
            if v is not None
            and k not in VOLATILE
            and "latency" not in k
            and not k.endswith("_ms")
            and "throughput" not in k
        }
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


def digest_checkpoint(path: Path) -> dict:
    from safetensors import safe_open

    from sdtool import checkpoint

    tensors, sums = hashlib.sha256(), {}
    with safe_open(str(path), framework="pt") as f:
        for k in sorted(f.keys()):
            t = f.get_tensor(k)
            tensors.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
            tensors.update(t.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
            sums[k] = float(t.double().sum())
    meta = _scrub(checkpoint.read_meta(path))
    return {
        "tensors_sha256": tensors.hexdigest(),
        "sums": sums,
        "meta_sha256": hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest(),
        "meta": meta,
    }


def digest_onnx(path: Path) -> dict:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits, sums = hashlib.sha256(), {}
    for t in sorted(m.graph.initializer, key=lambda t: t.name):
        a = numpy_helper.to_array(t)
        inits.update(t.name.encode() + a.tobytes())
        sums[t.name] = float(a.astype("float64").sum())
    return {
        "tensors_sha256": inits.hexdigest(),
        "sums": sums,
        "ops": [n.op_type for n in m.graph.node],
        "outputs": [o.name for o in m.graph.output],
    }


def _cli(*args: str) -> None:
    from typer.testing import CliRunner

    from sdtool.cli import app

    res = CliRunner().invoke(app, list(args))
    if res.exit_code != 0:
        raise RuntimeError(f"sdtool {' '.join(args)} failed ({res.exit_code}): {res.output}\n{res.exception!r}")


def run_chain(work: Path) -> dict:
    """Run the chain in `work` and return the digests of everything it wrote."""
    import torch

    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[1]
    recipe = str(root / "recipes" / "pipeline_quickstart.yaml")
    sets = [x for s in DATA for x in ("--set", s)]
    _cli("train", recipe, "--out", str(work / "train"), *sets, "--json")
    trained = work / "train" / "best.safetensors"
    _cli(
        "prune",
        str(trained),
        "--out",
        str(work / "pruned.safetensors"),
        "--criterion",
        "taylor",
        "--target-macs",
        "0.6",
        "--taylor-batches",
        "2",
        "--json",
    )
    _cli("train", recipe, "--init", str(work / "pruned.safetensors"), "--out", str(work / "ft"), *sets, "--json")
    ft = work / "ft" / "best.safetensors"
    _cli(
        "eval",
        str(ft),
        "--early-exit",
        "--fit-thresholds",
        "--max-drop",
        "1.0",
        "--latency-images",
        "0",
        "--out",
        str(work / "final.safetensors"),
        "--json",
    )
    _cli("export", str(work / "final.safetensors"), "--exit", "2", "--out", str(work / "exit2.safetensors"), "--json")
    _cli("export", str(work / "final.safetensors"), "--format", "onnx", "--out", str(work / "final.onnx"), "--json")
    out = {
        name: digest_checkpoint(work / f)
        for name, f in [
            ("train", "train/best.safetensors"),
            ("train_last", "train/last.safetensors"),
            ("pruned", "pruned.safetensors"),
            ("finetune", "ft/best.safetensors"),
            ("thresholds", "final.safetensors"),
            ("exit2", "exit2.safetensors"),
        ]
    }
    out["onnx"] = digest_onnx(work / "final.onnx")
    return out


def main(argv: list[str] | None = None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the reference (only for deliberate changes)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        got = run_chain(Path(d))
    if args.write:
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text(json.dumps({"platform": platform(), "digests": got}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {REFERENCE}")
    else:
        print(json.dumps({k: v["tensors_sha256"] for k, v in got.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
