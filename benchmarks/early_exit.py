"""Early exit in wall clock: eager PyTorch against the ONNX Runtime bundle, side by side, on CIFAR-10.

    python benchmarks/early_exit.py \\
        --ckpt sd=runs/bench/ablation/self_distill-s0/best.safetensors \\
        --ckpt sd_kd=runs/bench/distill45k/sd_kd_all-s0/best.safetensors \\
        --ckpt light=runs/bench/light-s0/best.safetensors --threads 1 2 --out runs/bench/early_exit
    python benchmarks/early_exit.py --train-sd --epochs 2 --out runs/bench/early_exit     # train the sd model first

For each named checkpoint (it must record a validation split): thresholds are fitted on the
validation split for at most `--max-drop` points below the deepest exit (`--cost macs`, or `latency`:
ONNX Runtime's measured step times at the batch size), an early-exit bundle is exported with them
(OUT/<name>/bundle), and then, for each thread count, in one process and alternating:

  rows     torch (eager, batch norm unfolded, contiguous) deepest alone / early exit; torch_opt (batch norm
           folded, channels_last);
           onnxruntime (the bundle's own sessions) deepest alone / early exit
  batches  every test image at batch `--batch` (default 256), and `--latency-images` images at batch 1
  columns  test top-1, drop, MACs speed-up, predicted wall-clock speed-up (from each engine's measured
           step times), measured wall-clock speed-up, images/s

Goals (issue 11), per named model: onnxruntime early exit's wall-clock speed-up over onnxruntime
deepest-alone >= 0.85 x its MACs speed-up at batch 256 and >= 0.75 x at batch 1; onnxruntime early
exit >= 5x the images/s of eager unfolded torch deepest-alone at batch 1, same threads; the bundle's
early-exit accuracy equals torch's on the same split (+-0.05 points). Writes OUT/early_exit.json and
prints a table. Timings need a quiet machine (nothing else running).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import cifar10_recipe, machine, write_json

from sdtool import checkpoint
from sdtool.deploy import BundleOptions, export_bundle
from sdtool.early_exit import ExitPolicy, leave_costs, leave_times
from sdtool.engines import OrtEngine, TorchEngine
from sdtool.evaluate import bundle_for_checkpoint, data_for_checkpoint
from sdtool.exit_eval import FitOptions, run_split, time_batch1
from sdtool.profile import exit_costs
from sdtool.runtime import EarlyExitSession

GOALS = {
    "ort_wall_over_macs_batch_n": 0.85,
    "ort_wall_over_macs_batch_1": 0.75,
    "ort_over_eager_batch_1": 5.0,
    "accuracy_match_points": 0.05,
}


def train_sd(args) -> Path:
    from sdtool.engine import fit
    from sdtool.recipe import from_dict

    run_dir = args.out / "train-sd"
    if (run_dir / "train_state.safetensors").exists():
        res = fit(None, None, resume=run_dir, quiet=True)
    else:
        res = fit(from_dict(cifar10_recipe("self_distill", 0, args.epochs)), run_dir, quiet=True)
    return res.best or res.last


def _expected(times: dict, pol: ExitPolicy, exit_at: torch.Tensor) -> float:
    ms = leave_times(times, pol.computed())
    counts = torch.bincount(exit_at, minlength=len(ms))
    return float(sum(ms[k] * int(counts[k]) for k in range(len(ms))) / len(exit_at))


def measure(name: str, ckpt: Path, args) -> dict:
    model, meta = checkpoint.load(ckpt)
    cfg = data_for_checkpoint(meta)
    data = bundle_for_checkpoint(ckpt, meta, cfg, "test")
    size = data.input_size
    costs = exit_costs(model, (size, size))
    out = args.out / name / "bundle"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    torch.set_num_threads(max(args.threads))
    t0 = time.perf_counter()
    b = export_bundle(
        str(ckpt),
        str(out),
        FitOptions(fit=True, max_drop=args.max_drop, cost=args.cost),
        BundleOptions(batch_size=args.batch, threads=max(args.threads), latency_batch=args.batch),
        quiet=True,
    )
    export_s = time.perf_counter() - t0
    pol = ExitPolicy(b["policy"]["policy"], b["policy"]["values"], b["policy"]["fallback"], b["policy"]["ensemble"])
    leave = leave_costs(costs, pol.computed())
    loader = data.loader("test", args.batch, shuffle=False, seed=0, workers=0)
    ds = data.test
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[: args.latency_images].tolist()
    xs1 = data.prepare(torch.stack([ds[i][0] for i in idx]), train=False)
    per_threads = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        engines = {
            "torch": TorchEngine(model, pol, fold_bn=False),
            "torch_opt": TorchEngine(model, pol),
            "onnxruntime": OrtEngine(model, size, pol, threads=threads, ensemble=pol.ensemble),
        }
        engines["onnxruntime"].session = EarlyExitSession(out, threads=threads)  # the bundle on disk
        rows = {}
        for ename, eng in engines.items():
            run = run_split(eng, loader, data.prepare)
            b1 = time_batch1(eng, xs1, repeats=3)
            n = len(run["exit_at"])
            counts = torch.bincount(run["exit_at"], minlength=model.num_exits)
            exp_macs = float(sum(leave[k] * int(counts[k]) for k in range(model.num_exits)) / n)
            t_n = eng.piece_times(size, args.batch, warmup=1, repeats=3)
            t_1 = eng.piece_times(size, 1, warmup=3, repeats=20)
            rows[ename] = {
                "top1": 100.0 * int(run["right"].sum()) / n,
                "deepest_top1": 100.0 * run["deepest_right"] / n,
                "macs_speedup": costs["reference"]["macs"] / exp_macs,
                "exit_fractions": (counts.double() / n).tolist(),
                "batch_n": {
                    "early_exit_s": run["early_exit_s"],
                    "deepest_s": run["deepest_s"],
                    "speedup": run["deepest_s"] / run["early_exit_s"],
                    "predicted_speedup": t_n["deepest_ms"] / _expected(t_n, pol, run["exit_at"]),
                    "early_exit_images_per_s": n / run["early_exit_s"],
                    "deepest_images_per_s": n / run["deepest_s"],
                },
                "batch_1": {
                    **b1,
                    "predicted_speedup": t_1["deepest_ms"] / _expected(t_1, pol, run["exit_at"]),
                    "early_exit_images_per_s": 1000 / b1["early_exit_ms_per_image"],
                    "deepest_images_per_s": 1000 / b1["deepest_ms_per_image"],
                },
                "piece_times": {"batch_n": t_n, "batch_1": t_1},
                "settings": eng.settings,
            }
            r = rows[ename]
            print(
                f"  {name:<6} {threads}t {ename:<13} top-1 {r['top1']:6.2f} (deepest {r['deepest_top1']:6.2f})  "
                f"MACs {r['macs_speedup']:.2f}x  batch {args.batch}: {r['batch_n']['speedup']:.2f}x "
                f"(pred {r['batch_n']['predicted_speedup']:.2f}x, {r['batch_n']['early_exit_images_per_s']:.0f} img/s)"
                f"  batch 1: {r['batch_1']['speedup']:.2f}x (pred {r['batch_1']['predicted_speedup']:.2f}x, "
                f"{r['batch_1']['early_exit_images_per_s']:.0f} img/s)",
                flush=True,
            )
        o, e = rows["onnxruntime"], rows["torch"]
        per_threads[str(threads)] = {
            "rows": rows,
            "goals": {
                "ort_wall_over_macs_batch_n": o["batch_n"]["speedup"] / o["macs_speedup"],
                "ort_wall_over_macs_batch_1": o["batch_1"]["speedup"] / o["macs_speedup"],
                "ort_over_eager_batch_1": o["batch_1"]["early_exit_images_per_s"]
                / e["batch_1"]["deepest_images_per_s"],
                "accuracy_match_points": abs(o["top1"] - e["top1"]),
            },
        }
    return {
        "name": name,
        "checkpoint": str(ckpt),
        "bundle": str(out),
        "export_s": export_s,
        "policy": b["policy"],
        "fit": b["fit"],
        "bundle_check": b["check"],
        "threads": per_threads,
    }


def table(results: list[dict], batch: int) -> None:
    print(
        f"\n{'model':<7}{'thr':>4} {'engine':<13}{'top-1':>7}{'drop':>6}{'MACs×':>7}"
        f"{'pred×' + str(batch):>10}{'wall×' + str(batch):>10}{'img/s':>8}{'pred×1':>8}{'wall×1':>8}{'img/s@1':>9}"
    )
    for r in results:
        for t, blk in r["threads"].items():
            for ename, x in blk["rows"].items():
                print(
                    f"{r['name']:<7}{t:>4} {ename:<13}{x['top1']:7.2f}{x['deepest_top1'] - x['top1']:6.2f}"
                    f"{x['macs_speedup']:7.2f}{x['batch_n']['predicted_speedup']:10.2f}{x['batch_n']['speedup']:10.2f}"
                    f"{x['batch_n']['early_exit_images_per_s']:8.0f}{x['batch_1']['predicted_speedup']:8.2f}"
                    f"{x['batch_1']['speedup']:8.2f}{x['batch_1']['early_exit_images_per_s']:9.0f}"
                )
            print(
                f"{'':<12}{'deepest alone, img/s:':<22}"
                + "  ".join(
                    f"{e} {x['batch_n']['deepest_images_per_s']:.0f} @{batch}, "
                    f"{x['batch_1']['deepest_images_per_s']:.0f} @1"
                    for e, x in blk["rows"].items()
                )
            )
            g = blk["goals"]
            print(
                f"{'':<12}goals: ort wall/MACs @{batch} {g['ort_wall_over_macs_batch_n']:.2f} (>= 0.85), @1 "
                f"{g['ort_wall_over_macs_batch_1']:.2f} (>= 0.75); ort EE / eager deepest @1 "
                f"{g['ort_over_eager_batch_1']:.1f}x (>= 5); "
                f"|top-1 ort - torch| {g['accuracy_match_points']:.3f} (<= 0.05)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", action="append", default=[], help="NAME=PATH of a checkpoint to measure (repeatable)")
    ap.add_argument("--train-sd", action="store_true", help="Train the self-distilled model first (name sd).")
    ap.add_argument("--epochs", type=int, default=2, help="Training budget with --train-sd.")
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--cost", default="macs", choices=["macs", "latency"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--latency-images", type=int, default=300)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/early_exit"))
    args = ap.parse_args()
    named = [c.split("=", 1) for c in args.ckpt]
    if any(len(c) != 2 for c in named):
        sys.exit("--ckpt takes NAME=PATH")
    if args.train_sd:
        named.insert(0, ["sd", str(train_sd(args))])
    if not named:
        sys.exit("name at least one checkpoint (--ckpt NAME=PATH) or --train-sd")
    results = [measure(n, Path(p), args) for n, p in named]
    table(results, args.batch)
    write_json(
        args.out / "early_exit.json",
        {
            "benchmark": "early_exit_engines",
            "goals": GOALS,
            "batch": args.batch,
            "max_drop": args.max_drop,
            "cost": args.cost,
            "latency_images": args.latency_images,
            "results": results,
            **machine(),
        },
    )
    print(f"wrote {args.out / 'early_exit.json'}")


if __name__ == "__main__":
    main()
