"""Training-step time of self_distill (byot heads + attention) against plain, same backbone, side by side.

    python benchmarks/train_step.py --width 64 --batch 64 --repeats 10 --json runs/bench/train_step.json
    python benchmarks/train_step.py --width 16 --batch 128 --repeats 5 --threads 1 --memory-format both

Both models take forward + loss + backward + SGD step on the same random batch, alternating
(plain, sd, plain, sd, ...) so that drift in machine load hits both equally; the figure is the ratio of
the medians. Goal (issue tracker): ratio <= 1.25 on the CPU. `--memory-format both` runs the two models
in each memory format within the same alternation (four steps per round), so the channels_last /
contiguous speed-up of each mode is measured side by side too: it is the evidence behind the CPU rule
of `train.channels_last: auto` (sdtool/device.py).
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

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def make_step(
    mode: str,
    width: int,
    classes: int,
    batch: torch.Tensor,
    y: torch.Tensor,
    memory_format: torch.memory_format = torch.contiguous_format,
):
    torch.manual_seed(0)  # the same weights in every memory format
    exits = [] if mode == "plain" else None
    model = create_model(
        "resnet18", num_classes=classes, stem="cifar", width=width, head="byot", attention=mode != "plain", exits=exits
    ).train()
    model.to(memory_format=memory_format)  # as the engine does: weights, then each batch
    batch = batch.contiguous(memory_format=memory_format)
    loss_fn = SelfDistillLoss(mode, model.feature_dims)
    opt = torch.optim.SGD(
        list(model.parameters()) + list(loss_fn.parameters()), lr=0.01, momentum=0.9, weight_decay=5e-4
    )

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
    ap.add_argument(
        "--memory-format",
        choices=[*FORMATS, "both"],
        default="contiguous",
        help="memory format of weights and batch; both = each format, alternating in one run",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, args.classes, (args.batch,))
    formats = list(FORMATS) if args.memory_format == "both" else [args.memory_format]
    steps = {
        (f, m): make_step(m, args.width, args.classes, x, y, FORMATS[f])
        for f in formats
        for m in ("plain", "self_distill")
    }
    for _ in range(args.warmup):
        for s in steps.values():
            s()
    times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for k, s in steps.items():
            times[k].append(s())
    med = {k: statistics.median(t) for k, t in times.items()}
    ratio = {f: med[f, "self_distill"] / med[f, "plain"] for f in formats}
    result = {
        "benchmark": "train_step",
        "model": f"resnet18 width {args.width}, cifar stem, {args.classes} classes",
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "memory_formats": formats,
        "median_s": {f: {m: med[f, m] for m in ("plain", "self_distill")} for f in formats},
        "ratio_self_distill_over_plain": ratio,
    }
    if len(formats) == 2:  # > 1: channels_last is faster
        result["speedup_channels_last"] = {
            m: med["contiguous", m] / med["channels_last", m] for m in ("plain", "self_distill")
        }
    print(f"{'format':<15}{'mode':<14}{'median step (s)':>16}")
    for (f, m), v in med.items():
        print(f"{f:<15}{m:<14}{v:>16.4f}")
    for f in formats:
        print(f"ratio self_distill / plain, {f}: {ratio[f]:.3f} (goal <= 1.25)")
    for m, s in result.get("speedup_channels_last", {}).items():
        print(f"channels_last speed-up, {m}: {s:.2f}x (contiguous / channels_last)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
