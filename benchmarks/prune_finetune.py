"""Pruning composed with self-distillation on the real CIFAR-10: accuracy per exit before, right after
pruning and after a short fine-tune, and what pruning costs next to one training epoch.

    python benchmarks/prune_finetune.py --epochs 3 --finetune-epochs 1 --out runs/bench/prune
    python benchmarks/prune_finetune.py --base runs/bench/ablation/self_distill-s0/best.safetensors \\
        --finetune-epochs 2 --out runs/bench/prune                   # reuse the ablation's SD model
    python benchmarks/prune_finetune.py --epochs 1 --finetune-epochs 1 --limit-train 500 --limit-test 500 \\
        --out runs/bench/prune_smoke                                 # a smoke run of the script itself

A self-distilled width-16 ResNet18 (trained here, or `--base`) is pruned to `--target-macs` (default
0.5) of its multi-exit MACs with each criterion (default l2 and taylor), then fine-tuned for the same
budget two ways:
  * self_distill: the pruned multi-exit network, `sdtool train --init pruned.safetensors`;
  * plain: the pruned network's deepest exit alone (`sdtool export --exit 4`, the backbone with its own
    classifier), fine-tuned with cross-entropy only: the same pruned backbone without self-distillation.
Accuracies are top-1 on the test split (never used for selection; `best` is chosen on a 5,000-image
validation split). Goals (docs/benchmarks.md): the self-distilled fine-tune's deepest exit within 1
point of the unpruned one at half the MACs; pruning taking under a tenth of one training epoch of the
same model on the same machine (its median `train_seconds`, measured in this run when it trains the
base model, else read from the base run's metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import cifar10_recipe, machine, write_json

from sdtool.engine import fit
from sdtool.export import export
from sdtool.prune import PruneOptions, prune_checkpoint
from sdtool.recipe import from_dict


def recipe(mode: str, args, epochs: int, lr: float | None = None) -> dict:
    r = cifar10_recipe(mode, args.seed, epochs, width=args.width, limit_train=args.limit_train)
    r["data"]["limit_test"] = args.limit_test
    if lr is not None:
        r["train"].update(lr=lr, warmup_epochs=0)
    return r


def top1s(rep: dict | None) -> list[float]:
    return [e["top1"] for e in rep["exits"]] if rep else []


def epoch_seconds(run_dir: Path) -> float | None:
    rows = run_dir / "metrics.jsonl"
    if not rows.is_file():
        return None
    secs = [json.loads(line)["train_seconds"] for line in rows.read_text().splitlines() if line.strip()]
    return statistics.median(secs) if secs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, help="A self-distilled checkpoint to start from (default: train one).")
    ap.add_argument("--epochs", type=int, default=3, help="Training epochs of the base model (without --base).")
    ap.add_argument("--finetune-epochs", type=int, default=1, help="Fine-tuning budget, the same for every arm.")
    ap.add_argument("--finetune-lr", type=float, default=0.01, help="Peak lr of the fine-tunes (cosine).")
    ap.add_argument("--criteria", nargs="+", default=["l2", "taylor"])
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-train", type=int, help="Train on N images only (smoke runs).")
    ap.add_argument("--limit-test", type=int, help="Test on N images only (smoke runs).")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/prune"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if args.base:
        base, epoch_s, epoch_src = args.base, epoch_seconds(args.base.parent), f"{args.base.parent}/metrics.jsonl"
    else:
        run = args.out / "base"
        res = fit(from_dict(recipe("self_distill", args, args.epochs)), run, quiet=True)
        base, epoch_s, epoch_src = res.best or res.last, epoch_seconds(run), "measured in this run"
    print(
        f"base: {base}; one training epoch: "
        + (f"{epoch_s:.1f} s ({epoch_src})" if epoch_s else "unknown (no metrics.jsonl beside --base)"),
        flush=True,
    )

    results = {"unpruned": None, "criteria": {}}
    for crit in args.criteria:
        pruned = args.out / f"pruned_{crit}.safetensors"
        rep = prune_checkpoint(base, pruned, PruneOptions(criterion=crit, target_macs=args.target_macs), evaluate=True)
        results["unpruned"] = results["unpruned"] or {
            "exits": top1s(rep["accuracy"]["before"]),
            "macs": rep["before"]["full"]["macs"],
            "params": rep["before"]["full"]["params"],
        }
        arm = {
            "prune_seconds": rep["seconds"],
            "prune_runs": len(rep["search"]),
            "ratio": rep["ratio"],
            "macs_fraction": rep["macs_fraction"],
            "params_fraction": rep["params_fraction"],
            "after_prune": top1s(rep["accuracy"]["after"]),
            "prune_vs_epoch": rep["seconds"] / epoch_s if epoch_s else None,
        }
        print(
            f"{crit}: pruned to {rep['macs_fraction']:.3f} of the MACs in {rep['seconds']:.1f} s; "
            f"right after: {arm['after_prune']}",
            flush=True,
        )

        t0 = time.perf_counter()
        sd = fit(
            from_dict(recipe("self_distill", args, args.finetune_epochs, args.finetune_lr)),
            args.out / f"ft_{crit}_self_distill",
            init=str(pruned),
            quiet=True,
        )
        arm["self_distill"] = {"exits": top1s(sd.test), "seconds": time.perf_counter() - t0}

        deepest = args.out / f"pruned_{crit}_deepest.safetensors"
        export(str(pruned), str(deepest), "safetensors", exit=len(rep["after"]["exits"]), check=False)
        t0 = time.perf_counter()
        pl = fit(
            from_dict(recipe("plain", args, args.finetune_epochs, args.finetune_lr)),
            args.out / f"ft_{crit}_plain",
            init=str(deepest),
            quiet=True,
        )
        arm["plain"] = {"exits": top1s(pl.test), "seconds": time.perf_counter() - t0}
        results["criteria"][crit] = arm
        print(
            f"{crit}: fine-tuned self_distill {arm['self_distill']['exits']}, plain {arm['plain']['exits']}", flush=True
        )

    un = results["unpruned"]
    k = len(un["exits"])
    head = (
        f"{'':<28}"
        + "".join(f"{'exit ' + str(i + 1):>9}" for i in range(k))
        + f"{'MACs':>8}{'prune s':>9}{'/ epoch':>9}"
    )
    print("\n" + head)
    print(f"{'unpruned':<28}" + "".join(f"{a:9.2f}" for a in un["exits"]) + f"{1:8.3f}")
    for crit, arm in results["criteria"].items():
        ratio = f"{arm['prune_vs_epoch']:9.3f}" if arm["prune_vs_epoch"] is not None else f"{'-':>9}"
        print(
            f"{crit + ' right after pruning':<28}"
            + "".join(f"{a:9.2f}" for a in arm["after_prune"])
            + f"{arm['macs_fraction']:8.3f}{arm['prune_seconds']:9.1f}{ratio}"
        )
        print(f"{crit + ' + self_distill fine-tune':<28}" + "".join(f"{a:9.2f}" for a in arm["self_distill"]["exits"]))
        print(f"{crit + ' + plain fine-tune':<28}" + f"{'-':>9}" * (k - 1) + f"{arm['plain']['exits'][-1]:9.2f}")
        gap = un["exits"][-1] - arm["self_distill"]["exits"][-1]
        print(
            f"  goal: deepest within 1 point of unpruned: {gap:+.2f} points -> {'met' if gap <= 1 else 'not met'}; "
            + (
                f"pruning < 0.1 epoch: {'met' if arm['prune_vs_epoch'] < 0.1 else 'not met'}"
                if arm["prune_vs_epoch"] is not None
                else "epoch time unknown"
            )
        )
    write_json(
        args.out / "prune_finetune.json",
        {
            "benchmark": "prune_finetune",
            "base": str(base),
            "epochs": None if args.base else args.epochs,
            "finetune_epochs": args.finetune_epochs,
            "finetune_lr": args.finetune_lr,
            "target_macs": args.target_macs,
            "limit_train": args.limit_train,
            "limit_test": args.limit_test,
            "epoch_seconds": epoch_s,
            "epoch_seconds_source": epoch_src,
            **results,
            **machine(),
        },
    )


if __name__ == "__main__":
    main()
