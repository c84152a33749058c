"""Exit placement on the real CIFAR-10: an exit inside layer1 (resnet18 `split_layer1`) against the paper's four.

    OMP_NUM_THREADS=1 python benchmarks/exit_placement.py --epochs 2 --variants split --out runs/bench/exit_placement

With the CIFAR stem, stem + layer1 of ResNet18 hold 28 % of the deepest exit's MACs, so a sample that
leaves at the paper's exit 1 still costs about 0.31 of the deepest exit; that caps the early-exit
speed-up. `split_layer1` cuts layer1 after its first block, for an exit at about 0.2. Each variant is a
width-16 ResNet18 trained with self-distillation at the ablation's budget (benchmarks/common.py
`cifar10_recipe`: 45,000 training images, `best` chosen on a 5,000-image validation split, accuracy on
the 10,000 test images), into OUT/<variant>-s<seed>/ (an interrupted run resumes). The model is built by
the registry and handed to training as `--init` (OUT/<variant>-s<seed>/init.safetensors, fresh weights),
so any builder argument can be compared whatever the recipe's model section offers.

Variants: `split` (exits after stem+layer1[:1], layer1[1:], layer2, layer3, layer4: 5 exits) and
`split_1345` (the same stages, no exit after the full layer1: 4 exits). The unsplit reference,
`--reference` (default runs/bench/ablation/self_distill-s0, trained by benchmarks/cifar10_ablation.py),
is only read, never trained here; it is shown when its training has finished. Per exit: test top-1 and
the MACs to reach and use that exit alone, also as a fraction of the deepest exit alone (the reference
cost of early-exit speed-ups). Prints a table and writes OUT/exit_placement.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import cifar10_recipe, machine, write_json

from sdtool import checkpoint
from sdtool.engine import fit
from sdtool.evaluate import eval_checkpoint
from sdtool.models import create_model
from sdtool.profile import exit_costs
from sdtool.recipe import from_dict

VARIANTS = {  # builder arguments on top of the recipe's resnet18 (width 16, byot heads, attention)
    "split": {"split_layer1": True},
    "split_1345": {"split_layer1": True, "exits": [1, 3, 4, 5]},
}


def write_init(path: Path, recipe: dict, extra_args: dict, seed: int, num_classes: int = 10) -> None:
    """A freshly initialised model of the variant as an sdtool checkpoint (the training run's --init)."""
    m = recipe["model"]
    args = {
        "num_classes": num_classes,
        "width": m["width"],
        "head": m["head"],
        "attention": m["attention"],
        **extra_args,
    }
    torch.manual_seed(seed)
    model = create_model(m["name"], **args)
    entry = checkpoint.lineage_entry(
        "init", None, None, checkpoint.now(), note="benchmarks/exit_placement.py: fresh weights, built by the registry"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(path, model, {"num_classes": num_classes, "lineage": [entry]})


def train(variant: str, seed: int, epochs: int, out: Path, limit_train: int | None = None) -> Path:
    run_dir = out / f"{variant}-s{seed}"
    if (run_dir / "train_state.safetensors").exists():
        res = fit(None, None, resume=run_dir, quiet=True)  # finished or interrupted: complete it
    else:
        recipe = cifar10_recipe("self_distill", seed, epochs, limit_train=limit_train)
        init = run_dir / "init.safetensors"
        write_init(init, recipe, VARIANTS[variant], seed)
        res = fit(from_dict(recipe), run_dir, init=str(init), quiet=True)
    return res.best or res.last


def finished(run_dir: Path) -> bool:
    """Whether a run folder's training reached its recipe's last epoch (it may still be training)."""
    import yaml

    rows = run_dir / "metrics.jsonl"
    if not (rows.is_file() and (run_dir / "recipe.yaml").is_file()):
        return False
    epochs = yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["epochs"]
    done = [json.loads(x)["epoch"] for x in rows.read_text().splitlines() if x.strip()]
    return bool(done) and max(done) >= epochs


def measure(name: str, ckpt: Path) -> dict:
    model, meta = checkpoint.load(ckpt)
    costs = exit_costs(model, (32, 32))
    acc = eval_checkpoint(str(ckpt), split="test", device="cpu")
    return {
        "variant": name,
        "checkpoint": str(ckpt),
        "stages": model.spec.get("stages"),
        "model_args": meta["model"]["args"],
        "ensemble": acc["ensemble"]["top1"] if acc["ensemble"] else None,
        "exits": [
            {
                "exit": e["exit"],
                "stage": e["stage"],
                "top1": a["top1"],
                "macs": e["macs"],
                "share_of_reference": e["share_of_reference"],
                "cumulative_macs": e["cumulative_macs"],
            }
            for e, a in zip(costs["exits"], acc["exits"], strict=True)
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-train", type=int, default=None, help="Train on only N images (smoke runs).")
    ap.add_argument("--variants", nargs="+", default=["split"], choices=sorted(VARIANTS))
    ap.add_argument(
        "--reference",
        type=Path,
        default=Path("runs/bench/ablation/self_distill-s0"),
        help="Run folder of the unsplit model (read only).",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench/exit_placement"))
    args = ap.parse_args()
    rows = []
    for variant in args.variants:
        t0 = time.perf_counter()
        ckpt = train(variant, args.seed, args.epochs, args.out, args.limit_train)
        rows.append({**measure(variant, ckpt), "minutes": (time.perf_counter() - t0) / 60})
        print(f"{variant}: {ckpt} ({rows[-1]['minutes']:.1f} min)", flush=True)
    ref = args.reference / "best.safetensors"
    if finished(args.reference) and ref.is_file():
        rows.insert(0, measure("unsplit (reference)", ref))
    else:
        print(f"reference {args.reference}: not finished (or absent); not shown")
    print(f"\n{'variant':<20}{'exit':>5}  {'stage':<16}{'top-1 %':>8}{'M MACs':>9}{'of deepest':>12}")
    for r in rows:
        names = r["stages"] or ["stem+layer1", "layer2", "layer3", "layer4"]
        for e in r["exits"]:
            print(
                f"{r['variant']:<20}{e['exit']:>5}  {names[e['stage'] - 1]:<16}{e['top1']:>8.2f}"
                f"{e['macs'] / 1e6:>9.2f}{e['share_of_reference']:>12.3f}"
            )
        if r["ensemble"] is not None:
            print(f"{r['variant']:<20}{'ens':>5}  {'':<16}{r['ensemble']:>8.2f}")
    write_json(
        args.out / "exit_placement.json",
        {"benchmark": "exit_placement", "epochs": args.epochs, "seed": args.seed, "runs": rows, **machine()},
    )


if __name__ == "__main__":
    main()
