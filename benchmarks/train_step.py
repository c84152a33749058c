"""Training-step time of self_distill (byot heads + attention) against plain, same backbone, side by side.

    python benchmarks/train_step.py --width 64 --batch 64 --repeats 10 --json runs/bench/train_step.json

Both models take forward + loss + backward + SGD step on the same random batch, alternating
(plain, sd, plain, sd, ...) so that drift in machine load hits both equally; the figure is the ratio of
the medians. Goal (issue tracker): ratio <= 1.25 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sdtool.losses import SelfDistillLoss
from sdtool.models import create_model


def make_step(mode: str, width: int, classes: int, batch: torch.Tensor, y: torch.Tensor):
    exits = [] if mode == "plain" else None
    model = create_model("resnet18", num_classes=classes, stem="cifar", width=width, head="byot",
                         attention=mode != "plain", exits=exits).train()
    loss_fn = SelfDistillLoss(mode, model.feature_dims)
    opt = torch.optim.SGD(list(model.parameters()) + list(loss_fn.parameters()), lr=0.01, momentum=0.9,
                          weight_decay=5e-4)

    def step() -> float:
        t0 = time.perf_counter()
        logits, feats = model(batch)
        loss, _ = loss_fn(logits, feats, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, args.classes, (args.batch,))
    steps = {m: make_step(m, args.width, args.classes, x, y) for m in ("plain", "self_distill")}
    for _ in range(args.warmup):
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(args.repeats):
        for m, s in steps.items():
            times[m].append(s())
    med = {m: statistics.median(t) for m, t in times.items()}
    result = {
        "benchmark": "train_step", "model": f"resnet18 width {args.width}, cifar stem, {args.classes} classes",
        "batch": args.batch, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
        "median_s": med, "ratio_self_distill_over_plain": med["self_distill"] / med["plain"],
    }
    print(f"{'mode':<14}{'median step (s)':>16}")
    for m, v in med.items():
        print(f"{m:<14}{v:>16.4f}")
    print(f"ratio self_distill / plain: {result['ratio_self_distill_over_plain']:.3f} (goal <= 1.25)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
