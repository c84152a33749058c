"""External-teacher KD, self-distillation and both, against the plain student, on the real CIFAR-10.

    python benchmarks/distill.py --teacher-epochs 10 --epochs 5 --seeds 0 1 --out runs/bench/distill

1. A short-budget teacher: a plain ResNet18 (`--teacher-width`, default 64) trained `--teacher-epochs`
   epochs (reused from OUT/teacher if it is already there, or given with `--teacher CKPT`).
2. A width-16 ResNet18 student trained four ways with the same budget (`--epochs`, same data, same seed
   per row): `plain` (the backbone alone), `kd` (plain + Hinton KD from the teacher), `self_distill`
   (4 exits, the paper's loss), `sd_kd` (self_distill + KD on the deepest exit) and, when asked for with
   `--modes`, `sd_kd_all` (self_distill + KD on every exit, `distill.targets: all`).
   `--reuse-from DIR` takes the plain and self_distill runs of `benchmarks/cifar10_ablation.py` from DIR
   when their resolved recipe is this one (same budget and seed), instead of training them again.
Training on 45,000 images (`--limit-train` for fewer), `best` chosen on a 5,000-image validation split,
top-1 on the 10,000 test images, per exit and ensemble, mean ± std over `--seeds`. The teacher's share
of the KD runs' training time is reported too. Prints a table and writes OUT/distill.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import cifar10_recipe, machine, mean_std, write_json

from sdtool.distill import distill
from sdtool.engine import fit
from sdtool.evaluate import eval_checkpoint
from sdtool.recipe import from_dict, load_recipe

MODES = {
    "plain": ("plain", None),
    "kd": ("plain", "deepest"),
    "self_distill": ("self_distill", None),
    "sd_kd": ("self_distill", "deepest"),
    "sd_kd_all": ("self_distill", "all"),
}
# name -> (sd.mode, the exits the teacher teaches: None = no teacher)


def _done(run_dir: Path, epochs: int) -> bool:
    rows = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    return (run_dir / "last.safetensors").is_file() and len(rows) >= epochs


def _result(run_dir: Path, res=None) -> dict:
    """Test accuracy of the run's selected checkpoint (from the run, or re-evaluated when reused)."""
    if res is not None:
        return res.test
    ckpt = run_dir / ("best.safetensors" if (run_dir / "best.safetensors").is_file() else "last.safetensors")
    return eval_checkpoint(str(ckpt), split="test")


def _recipe(args, mode: str, seed: int, epochs: int, width: int) -> dict:
    recipe = cifar10_recipe(mode, seed, epochs, width=width, val_size=args.val_size, limit_train=args.limit_train)
    recipe["data"]["limit_test"] = args.limit_test
    return recipe


def _reuse(src: Path, dst: Path, recipe: dict, epochs: int) -> bool:
    """Copy a finished run from `src` to `dst` when its resolved recipe equals `recipe` (the distill
    section aside: plain and self_distill runs ignore it)."""
    if dst.exists() or not _done(src, epochs):
        return False
    want = {k: v for k, v in from_dict(recipe).to_dict().items() if k != "distill"}
    have = {k: v for k, v in load_recipe(str(src / "recipe.yaml")).to_dict().items() if k != "distill"}
    if want != have:
        print(f"not reusing {src}: its recipe differs", flush=True)
        return False
    shutil.copytree(src, dst)
    return True


def train_teacher(args) -> Path:
    if args.teacher:
        return args.teacher
    run_dir = args.out / "teacher"
    t0 = time.perf_counter()
    if not _done(run_dir, args.teacher_epochs):
        recipe = _recipe(args, "plain", 0, args.teacher_epochs, args.teacher_width)
        fit(from_dict(recipe), run_dir, quiet=True)
    test = _result(run_dir)
    print(
        f"teacher: resnet18 width {args.teacher_width}, {args.teacher_epochs} epochs: "
        f"{test['exits'][-1]['top1']:.2f} % test top-1 ({(time.perf_counter() - t0) / 60:.1f} min)",
        flush=True,
    )
    args.teacher_top1 = test["exits"][-1]["top1"]
    return run_dir / ("best.safetensors" if (run_dir / "best.safetensors").is_file() else "last.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5, help="student budget, the same for every mode")
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--teacher-width", type=int, default=64)
    ap.add_argument("--teacher", type=Path, default=None, help="an existing sdtool checkpoint to use as teacher")
    ap.add_argument("--width", type=int, default=16, help="student width")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--modes", nargs="+", default=[m for m in MODES if m != "sd_kd_all"], choices=list(MODES))
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.9, help="weight of the KD term (the student's loss keeps 1)")
    ap.add_argument("--limit-train", type=int, default=None, help="train on fewer images (smoke runs)")
    ap.add_argument("--limit-test", type=int, default=None, help="test on fewer images (smoke runs)")
    ap.add_argument("--val-size", type=int, default=5000, help="validation images held out of training")
    ap.add_argument(
        "--reuse-from",
        type=Path,
        default=None,
        help="folder of cifar10_ablation.py runs to take plain / self_distill from when identical",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench/distill"))
    args = ap.parse_args()
    args.teacher_top1 = None
    teacher = train_teacher(args)

    runs = []
    for seed in args.seeds:
        for name in args.modes:
            mode, targets = MODES[name]
            with_teacher = targets is not None
            run_dir = args.out / f"{name}-s{seed}"
            recipe = _recipe(args, mode, seed, args.epochs, args.width)
            recipe["distill"] = {"temperature": args.temperature, "alpha": args.alpha, "targets": targets or "deepest"}
            t0, res = time.perf_counter(), None
            if (
                args.reuse_from
                and not with_teacher
                and _reuse(args.reuse_from / run_dir.name, run_dir, recipe, args.epochs)
            ):
                print(f"{name} seed {seed}: reused from {args.reuse_from}", flush=True)
            if not _done(run_dir, args.epochs):
                if (run_dir / "train_state.safetensors").exists():
                    raise SystemExit(f"{run_dir} holds an unfinished run; delete it to start that run again")
                r = from_dict(recipe)
                res = (
                    distill(r, run_dir, teacher=str(teacher), quiet=True)
                    if with_teacher
                    else fit(r, run_dir, quiet=True)
                )
            test = _result(run_dir, res)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            train_s = sum(row["train_seconds"] for row in rows)
            teacher_s = sum(row.get("teacher_seconds", 0.0) for row in rows)
            runs.append(
                {
                    "mode": name,
                    "seed": seed,
                    "seconds": time.perf_counter() - t0,
                    "train_seconds": train_s,
                    "teacher_share": teacher_s / train_s if with_teacher and train_s else None,
                    "exits": [e["top1"] for e in test["exits"]],
                    "ensemble": test["ensemble"]["top1"] if test["ensemble"] else None,
                }
            )
            r = runs[-1]
            print(
                f"{name:<13} seed {seed}: "
                + " ".join(f"{a:6.2f}" for a in r["exits"])
                + (f"  ens {r['ensemble']:.2f}" if r["ensemble"] else "")
                + (f"  teacher {100 * r['teacher_share']:.0f}% of training" if r["teacher_share"] else "")
                + f"  ({train_s / 60:.1f} min training)",
                flush=True,
            )

    budget = (
        f"student: resnet18 width {args.width}, {args.epochs} epochs each; teacher: resnet18 width "
        f"{args.teacher_width}, {args.teacher_epochs} epochs"
        + (f" ({args.teacher_top1:.2f} %)" if args.teacher_top1 else "")
    )
    print(f"\n{budget}; CIFAR-10 test top-1 %, mean ± std over seeds {args.seeds}")
    print(
        f"{'mode':<13}"
        + "".join(f"{'exit ' + str(k + 1):>16}" for k in range(4))
        + f"{'ensemble':>16}"
        + f"{'teacher share':>15}"
    )
    summary = {}
    for name in args.modes:
        rs = [r for r in runs if r["mode"] == name]
        cols = [mean_std([r["exits"][i] for r in rs]) for i in range(len(rs[0]["exits"]))]
        ens = mean_std([r["ensemble"] for r in rs]) if rs[0]["ensemble"] is not None else None
        share = mean_std([r["teacher_share"] for r in rs]) if rs[0]["teacher_share"] is not None else None
        summary[name] = {
            "exits": cols,
            "ensemble": ens,
            "teacher_share": share,
            "train_minutes": mean_std([r["train_seconds"] / 60 for r in rs]),
        }
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in cols]
        cells = ["-"] * (4 - len(cells)) + cells  # a single exit sits at the depth of exit 4
        print(
            f"{name:<13}"
            + "".join(f"{c:>16}" for c in cells)
            + f"{(f'{ens[0]:.2f} ± {ens[1]:.2f}' if ens else '-'):>16}"
            + f"{(f'{100 * share[0]:.0f}%' if share else '-'):>15}"
        )
    write_json(
        args.out / "distill.json",
        {
            "benchmark": "distill",
            "budget": budget,
            "epochs": args.epochs,
            "teacher_epochs": args.teacher_epochs,
            "teacher_width": args.teacher_width,
            "teacher": str(teacher),
            "teacher_top1": args.teacher_top1,
            "width": args.width,
            "temperature": args.temperature,
            "alpha": args.alpha,
            "limit_train": args.limit_train,
            "limit_test": args.limit_test,
            "val_size": args.val_size,
            "seeds": args.seeds,
            "runs": runs,
            "summary": summary,
            **machine(),
        },
    )


if __name__ == "__main__":
    main()
