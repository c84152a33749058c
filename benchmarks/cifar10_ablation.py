"""Self-distillation against its baselines on the real CIFAR-10, same budget for every mode.

    python benchmarks/cifar10_ablation.py --epochs 3 --seeds 0 1 --out runs/bench/ablation

Width-16 ResNet18 with the official heads: `plain` (the backbone alone), `deep_supervision` (CE on every
exit) and `self_distill`. Training on 45,000 images, `best` chosen on a 5,000-image validation split,
accuracy reported on the 10,000 test images. Prints a table (mean ± std over seeds) and writes JSON;
each run's checkpoints stay in OUT/<mode>-s<seed>/ (the early-exit and pruning benchmarks reuse them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import cifar10_recipe, machine, mean_std, write_json

from sdtool.engine import fit
from sdtool.recipe import from_dict

MODES = ["plain", "deep_supervision", "self_distill"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--modes", nargs="+", default=MODES)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/ablation"))
    args = ap.parse_args()
    runs = []
    for seed in args.seeds:
        for mode in args.modes:
            run_dir = args.out / f"{mode}-s{seed}"
            t0 = time.perf_counter()
            if (run_dir / "train_state.safetensors").exists():
                res = fit(None, None, resume=run_dir, quiet=True)  # finished or interrupted: complete it
            else:
                res = fit(from_dict(cifar10_recipe(mode, seed, args.epochs)), run_dir, quiet=True)
            test = res.test
            runs.append(
                {
                    "mode": mode,
                    "seed": seed,
                    "seconds": time.perf_counter() - t0,
                    "exits": [e["top1"] for e in test["exits"]],
                    "ensemble": test["ensemble"]["top1"] if test["ensemble"] else None,
                }
            )
            print(
                f"{mode:<17} seed {seed}: "
                + " ".join(f"{a:6.2f}" for a in runs[-1]["exits"])
                + (f"  ens {runs[-1]['ensemble']:.2f}" if runs[-1]["ensemble"] else "")
                + f"  ({runs[-1]['seconds'] / 60:.1f} min)",
                flush=True,
            )
    summary = {}
    print(f"\n{'mode':<17}" + "".join(f"{'exit ' + str(k + 1):>16}" for k in range(4)) + f"{'ensemble':>16}")
    for mode in args.modes:
        rs = [r for r in runs if r["mode"] == mode]
        k = len(rs[0]["exits"])
        cols = [mean_std([r["exits"][i] for r in rs]) for i in range(k)]
        ens = mean_std([r["ensemble"] for r in rs]) if rs[0]["ensemble"] is not None else None
        summary[mode] = {"exits": cols, "ensemble": ens, "minutes": mean_std([r["seconds"] / 60 for r in rs])}
        cells = ["-"] * (4 - k) + [f"{m:.2f} ± {s:.2f}" for m, s in cols]
        if mode == "plain":  # the single exit of the plain network sits at the depth of exit 4
            cells = ["-", "-", "-", f"{cols[0][0]:.2f} ± {cols[0][1]:.2f}"]
        print(
            f"{mode:<17}"
            + "".join(f"{c:>16}" for c in cells)
            + f"{(f'{ens[0]:.2f} ± {ens[1]:.2f}' if ens else '-'):>16}"
        )
    write_json(
        args.out / "ablation.json",
        {
            "benchmark": "cifar10_ablation",
            "epochs": args.epochs,
            "seeds": args.seeds,
            "runs": runs,
            "summary": summary,
            **machine(),
        },
    )


if __name__ == "__main__":
    main()
