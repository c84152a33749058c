"""Pretrained initialisation against training from scratch, with self-distillation, at the same budget.

    python benchmarks/pretrained_init.py --pretrained runs/demo/pretrain/last.safetensors --out runs/demo/ft

Fine-tunes a width-16 ResNet18 with self-distillation on the 10,000-image CIFAR-10 subset
(../shared/data/cifar10/train_small.npz, 1,000 held out for `best`) for `--epochs` epochs, once from
`model.pretrained` (the backbone of a checkpoint trained on the other 40,000 CIFAR-10 training images;
exits, attention and heads start fresh) and once from scratch, for each seed; reports the test accuracy
of every exit and of the ensemble (10,000 test images) and the wall time of each run. Runs one after
another: run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, seed: int, epochs: int, pretrained: str | None) -> dict:
    sets = [
        "data.root=../shared/data/cifar10",
        "data.train_file=train_small.npz",
        f"train.epochs={epochs}",
        f"train.seed={seed}",
    ]
    if pretrained:
        sets.append(f"model.pretrained={pretrained}")
    cmd = [
        sys.executable,
        "-m",
        "sdtool",
        "train",
        str(ROOT / "recipes" / "cifar10_npz_short.yaml"),
        "--out",
        str(out),
        "--json",
    ] + [x for s in sets for x in ("--set", s)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    rep = json.loads(res.stdout)
    return {"seconds": time.perf_counter() - t0, "test": rep["test"], "cmd": " ".join(cmd[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", required=True, help="checkpoint or weights file for model.pretrained")
    ap.add_argument("--out", default="runs/bench/pretrained_init")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        for name, src in (("pretrained", args.pretrained), ("scratch", None)):
            r = run(out / f"{name}-s{seed}", seed, args.epochs, src)
            exits = [e["top1"] for e in r["test"]["exits"]]
            ens = r["test"]["ensemble"]["top1"] if r["test"].get("ensemble") else None
            rows.append(
                {
                    "init": name,
                    "seed": seed,
                    "exits_top1": exits,
                    "ensemble_top1": ens,
                    "seconds": round(r["seconds"], 1),
                    "command": r["cmd"],
                }
            )
            print(
                f"{name:10s} seed {seed}: exits {' / '.join(f'{a:.2f}' for a in exits)}  ensemble {ens:.2f}  "
                f"({r['seconds']:.0f} s)",
                flush=True,
            )
    for name in ("pretrained", "scratch"):
        deep = [r["exits_top1"][-1] for r in rows if r["init"] == name]
        seeds = ", ".join(f"{d:.2f}" for d in deep)
        print(f"{name:10s} deepest exit: mean {statistics.mean(deep):.2f} (seeds: {seeds})")
    (out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
