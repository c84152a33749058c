"""Training throughput of sdtool's loop against a minimal hand-written PyTorch loop, side by side.

    python benchmarks/throughput.py --width 16 --batches 40 --rounds 3 --json runs/bench/throughput.json
    python benchmarks/throughput.py --device cuda --width 64 --classes 100 --batches 100   # on a GPU

Both loops train the same model (ResNet18, byot heads + attention), the same self-distillation loss and
the same optimiser on the same in-memory uint8 data (CIFAR-10 from ../shared/data when present, else
random pixels) with crop + flip augmentation; rounds alternate (hand, sdtool, hand, ...) and the figure
is the ratio of the median images/s. The hand-written loop is the floor any framework adds overhead to.
Goal: sdtool >= 0.95x the hand loop.

A second table times the data path alone: sdtool's batched tensor augmentation against torchvision's
per-image PIL pipeline (RandomCrop(32, 4) + flip + ToTensor + Normalize).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import CIFAR, machine, write_json

from sdtool.device import use_channels_last
from sdtool.engine import fit
from sdtool.losses import SelfDistillLoss
from sdtool.models import create_model
from sdtool.recipe import from_dict

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)


def load_pixels(n: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    if (CIFAR / "train_small.npz").is_file() and classes == 10:
        d = np.load(CIFAR / "train_small.npz")
        return d["x"][:n], d["y"][:n].astype(np.int64)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n)


def hand_loop(x: torch.Tensor, y: torch.Tensor, args, device: torch.device) -> float:
    """The minimal loop: shuffle, index, crop + flip on the batch, normalise, forward, loss, step."""
    torch.manual_seed(0)
    # The memory format the engine picks by default (train.channels_last: auto), so that both loops run the
    # same kernels and the ratio measures the loop alone.
    fmt = torch.channels_last if use_channels_last("auto", device) else torch.contiguous_format
    model = create_model("resnet18", num_classes=args.classes, width=args.width).to(device, memory_format=fmt).train()
    loss_fn = SelfDistillLoss("self_distill", model.feature_dims).to(device)
    opt = torch.optim.SGD(
        list(model.parameters()) + list(loss_fn.parameters()), lr=0.05, momentum=0.9, weight_decay=5e-4
    )
    x, y = x.to(device), y.to(device)
    perm = torch.randperm(len(x), device=device)
    n = 0
    t0 = None
    for i in range(args.batches + args.warmup):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
        idx = perm[(i * args.batch) % len(x) :][: args.batch]
        xb = F.pad(x[idx].float(), (4, 4, 4, 4), value=128.0)  # (N, C, 40, 40)
        nb, c = xb.shape[:2]
        ar = torch.arange(32, device=device)
        dy, dx = torch.randint(0, 9, (2, nb), device=device)  # a crop offset per sample
        rows = (dy[:, None] + ar).view(nb, 1, 32, 1).expand(nb, c, 32, 40)
        xb = xb.gather(2, rows)
        cols = (dx[:, None] + ar).view(nb, 1, 1, 32).expand(nb, c, 32, 32)
        xb = xb.gather(3, cols)
        flip = torch.rand(nb, device=device) < 0.5
        xb = torch.where(flip.view(nb, 1, 1, 1), xb.flip(3), xb)
        xb = ((xb / 255 - MEAN.to(device)) / STD.to(device)).contiguous(memory_format=fmt)
        logits, feats = model(xb)
        loss, _ = loss_fn(logits, feats, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(idx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def sdtool_loop(npz: Path, args) -> float:
    recipe = from_dict(
        {
            "model": {"name": "resnet18", "width": args.width},
            "data": {
                "name": "npz",
                "root": str(npz.parent),
                "train_file": npz.name,
                "test_file": npz.name,
                "batch_size": args.batch,
                "limit_test": 10,
                "augment": {"crop": True, "flip": True},
            },
            "train": {
                "epochs": 1,
                "lr": 0.05,
                "schedule": "constant",
                "limit_batches": args.batches,
                "device": args.device,
                "amp": args.amp,
                "seed": 0,
            },
        }
    )
    with tempfile.TemporaryDirectory() as d:
        res = fit(recipe, Path(d) / "run", quiet=True)
    return res.history[0]["images_per_s"]


def data_path(x: np.ndarray, batch: int, repeats: int = 5) -> dict:
    from PIL import Image
    from torchvision import transforms as T

    from sdtool.data import build_data
    from sdtool.recipe import DataConfig

    pil = T.Compose(
        [
            T.RandomCrop(32, padding=4, fill=128),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN.flatten().tolist(), STD.flatten().tolist()),
        ]
    )
    images = [Image.fromarray(a) for a in x[:batch]]
    with tempfile.TemporaryDirectory() as d:
        np.savez(Path(d) / "a.npz", x=x[:batch], y=np.zeros(batch, dtype=np.int64))
        bundle = build_data(DataConfig(name="npz", root=d, train_file="a.npz", test_file="a.npz"))
    xb = torch.from_numpy(x[:batch]).permute(0, 3, 1, 2).contiguous()
    t_pil, t_batch = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.stack([pil(im) for im in images])
        t_pil.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bundle.prepare(xb, train=True)
        t_batch.append(time.perf_counter() - t0)
    return {
        "pil_images_per_s": batch / statistics.median(t_pil),
        "batched_images_per_s": batch / statistics.median(t_batch),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    xs, ys = load_pixels(args.batch * (args.batches + args.warmup), args.classes)
    with tempfile.TemporaryDirectory() as d:
        npz = Path(d) / "train.npz"
        np.savez(npz, x=xs, y=ys)
        x = torch.from_numpy(xs).permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(ys)
        hand, ours = [], []
        for r in range(args.rounds):
            hand.append(hand_loop(x, y, args, device))
            ours.append(sdtool_loop(npz, args))
            print(f"round {r + 1}: hand {hand[-1]:.1f} img/s, sdtool {ours[-1]:.1f} img/s", flush=True)
    h, o = statistics.median(hand), statistics.median(ours)
    dp = data_path(xs, args.batch)
    print(f"\n{'loop':<10}{'images/s':>12}\n{'hand':<10}{h:>12.1f}\n{'sdtool':<10}{o:>12.1f}")
    print(f"ratio sdtool / hand: {o / h:.3f} (goal >= 0.95)")
    print(
        f"\ndata path, batch {args.batch}: PIL per image {dp['pil_images_per_s']:.0f} img/s, "
        f"batched tensors {dp['batched_images_per_s']:.0f} img/s "
        f"({dp['batched_images_per_s'] / dp['pil_images_per_s']:.1f}x)"
    )
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "throughput",
                "args": vars(args) | {"json": str(args.json)},
                "hand_images_per_s": hand,
                "sdtool_images_per_s": ours,
                "ratio": o / h,
                "data_path": dp,
                **machine(),
            },
        )


if __name__ == "__main__":
    main()
