"""Plain against self-distillation ResNet18 on one GPU, at equal epochs, in about 5 minutes of wall clock.

    cp -r ../shared/data/cifar10 benchmarks/cifar10            # once; or point --data at the folder
    bash benchmarks/gpu_reproduce.sh --out runs/gpu_reproduce
    bash benchmarks/gpu_reproduce.sh --smoke --data fake --out /tmp/gpu_smoke   # CPU, seconds

The number of epochs comes from the time budget (--budget-s, the whole process): each mode trains one
timed epoch, the steady part of those epochs gives the cost of a pair of epochs, and both modes then
train for as many more as the budget holds. Both modes use the same data, schedule and epochs: SGD
(Nesterov, momentum 0.9, weight decay 5e-4), batch 256, lr 0.2, one epoch of linear warm-up then cosine
to 0; bf16 autocast and channels_last on CUDA; the whole training set held in GPU memory as uint8 and
augmented there per batch: random crop (padding 4, fill 128) + horizontal flip + Cutout(16). This is
NOT the paper's augmentation (no AutoAugment, which runs per image on the CPU) nor its 250-epoch
schedule: it is a short comparison at equal cost. The last epoch is reported on the test split; nothing
is selected on it.

--data DIR holds CIFAR-10 as in ../shared/data/cifar10 (train.npz from cifar10/decode.py, or
train_jpeg.npz; test.npz or test_jpeg.npz), or the python-version folders cifar-10-batches-py/ or
cifar-100-python/ (CIFAR-100 when given); `--data fake` makes random images. Needs torch, torchvision
and numpy (Pillow only for the JPEG files); sdtool runs from the source tree (PYTHONPATH, as
gpu_reproduce.sh sets it), and nothing here imports Torch-Pruning or fvcore.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before torch is imported: the budget counts the whole process

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

AUGMENT = "random crop (pad 4, fill 128) + flip + cutout 16, batched on the device; NOT the paper's AutoAugment"
HERE = Path(__file__).resolve().parent
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the official Normalize values


def import_sdtool() -> types.SimpleNamespace:
    """sdtool's model, loss, augmentation and schedule pieces, without the engine.

    sdtool.losses imports sdtool.recipe (for the sd section's defaults), which imports PyYAML at module
    level although only reading recipes uses it. A machine with torch alone may lack PyYAML, so a
    placeholder stands in for it: nothing here reads or writes YAML.
    """
    try:
        import yaml  # noqa: F401
    except ImportError:
        stub = types.ModuleType("yaml")
        stub.YAMLError = Exception  # type: ignore[attr-defined]
        sys.modules["yaml"] = stub
    from sdtool.data.augment import cutout, normalize_, random_crop_flip
    from sdtool.losses import SelfDistillLoss, ensemble_logits
    from sdtool.models import create_model
    from sdtool.schedule import lr_factor

    return types.SimpleNamespace(
        cutout=cutout,
        normalize_=normalize_,
        random_crop_flip=random_crop_flip,
        SelfDistillLoss=SelfDistillLoss,
        ensemble_logits=ensemble_logits,
        create_model=create_model,
        lr_factor=lr_factor,
    )


# ---- data -------------------------------------------------------------------------------------------


def _decode_jpeg(path: Path, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The JPEG-bytes npz of ../shared/data/cifar10 (as its decode.py), only `rows` when given."""
    import io

    from PIL import Image

    with np.load(path) as d:
        buf, off, y = d["jpeg"], d["offsets"], d["y"].astype(np.int64)
    rows = np.arange(len(y)) if rows is None else rows
    x = np.stack([np.asarray(Image.open(io.BytesIO(buf[off[i] : off[i + 1]].tobytes())).convert("RGB")) for i in rows])
    return x, y[rows]


def _npz_split(folder: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """x (N, 32, 32, 3) uint8 and y from SPLIT.npz or SPLIT_jpeg.npz; `limit`: a fixed random subset."""
    plain, jpeg = folder / f"{split}.npz", folder / f"{split}_jpeg.npz"
    if plain.is_file():
        from sdtool.data.arrays import load_images_npz

        x, y = load_images_npz(plain)
        rows = _subset(len(y), limit)
        return (x, y) if rows is None else (x[rows], y[rows])
    if jpeg.is_file():
        with np.load(jpeg) as d:
            n = len(d["y"])
        return _decode_jpeg(jpeg, _subset(n, limit))
    raise SystemExit(f"{folder} holds neither {plain.name} nor {jpeg.name}; copy ../shared/data/cifar10 there")


def _subset(n: int, limit: int | None) -> np.ndarray | None:
    if limit is None or limit >= n:
        return None
    return np.sort(np.random.default_rng(0).permutation(n)[:limit])  # the same images every run


def _cifar_python(folder: Path, name: str, limits: tuple[int | None, int | None]) -> dict:
    """The python-version batch files, read with sdtool's unpickler that builds only arrays."""
    from sdtool.data.cifar import load_cifar

    src = load_cifar(types.SimpleNamespace(root=str(folder), download=False, input_size=None), True, name)
    out = {"name": name, "classes": len(src.class_names)}
    for split, part, limit in (("train", src.train, limits[0]), ("test", src.test, limits[1])):
        rows = _subset(len(part.labels), limit)
        x, y = part.x, torch.from_numpy(part.labels)
        out[split] = (x, y) if rows is None else (x[torch.from_numpy(rows)], y[torch.from_numpy(rows)])
    return out


def load_data(folder: str, limit_train: int | None, limit_test: int | None) -> dict:
    """{"name", "classes", "train": (x uint8 N x 3 x 32 x 32, y int64), "test": (...)} on the CPU."""
    if folder == "fake":  # random pixels; 4 labels from the brightness of the image and of its top red half
        g = torch.Generator().manual_seed(0)
        out = {"name": "fake", "classes": 10}
        for split, n in (("train", limit_train or 2048), ("test", limit_test or 512)):
            x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
            y = (x.float().mean(dim=(1, 2, 3)) > 127.5).long() + 2 * (x[:, 0, :16].float().mean((1, 2)) > 127.5).long()
            out[split] = (x, y)
        return out
    root = Path(folder)
    for sub, name in (("cifar-100-python", "cifar100"), ("cifar-10-batches-py", "cifar10")):
        if (root / sub).is_dir():
            return _cifar_python(root, name, (limit_train, limit_test))
    if not root.is_dir():
        raise SystemExit(f"{root} not found: copy ../shared/data/cifar10 there, or pass --data DIR (or --data fake)")
    out = {"name": f"{root.name} (npz)", "classes": 0}
    for split, limit in (("train", limit_train), ("test", limit_test)):
        x, y = _npz_split(root, split, limit)
        out[split] = (torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y))
    out["classes"] = int(max(out["train"][1].max(), out["test"][1].max())) + 1
    return out


# ---- training -----------------------------------------------------------------------------------------


class Run:
    """One mode's model, loss, optimizer and timings; the training set is shared and already on the device."""

    def __init__(self, sd: types.SimpleNamespace, mode: str, args: argparse.Namespace, classes: int, dev):
        torch.manual_seed(args.seed)
        multi = mode != "plain"
        self.mode, self.sd, self.args, self.dev = mode, sd, args, dev
        # plain: the paper's baseline, the backbone alone with its own classifier (no exits, no attention)
        kind = {"attention": multi, "exits": None if multi else []}
        self.model = sd.create_model("resnet18", num_classes=classes, width=args.width, head="byot", **kind).to(dev)
        self.channels_last = dev.type == "cuda" or args.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss = sd.SelfDistillLoss(mode, self.model.feature_dims).to(dev)
        params = list(self.model.parameters()) + list(self.loss.parameters())  # adapters decay too (official)
        self.opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.epoch_seconds: list[float] = []
        self.steady_estimate = math.nan  # seconds per epoch from the first epoch's steady part
        self.last_loss = math.nan
        # On the device once: a tensor built from a list per batch would be a blocking host-to-device copy.
        self.mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=dev).view(1, 3, 1, 1)

    def _batch(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        if train:
            x = self.sd.random_crop_flip(x, 4, 128)
        x = x.float().div_(255)
        if train:
            x = self.sd.cutout(x, 16)
        x = self.sd.normalize_(x, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _autocast(self):
        enabled = self.dev.type == "cuda"  # bf16 on the GPU; full precision for the CPU smoke run
        return torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=enabled)

    def train_epoch(self, epoch: int, epochs: int, train: tuple[torch.Tensor, torch.Tensor]) -> float:
        """One epoch (last partial batch dropped); returns its mean loss and records its time."""
        x_all, y_all = train
        b = self.args.batch_size
        steps = max(1, len(y_all) // b)
        if self.args.max_steps:
            steps = min(steps, self.args.max_steps)
        order = torch.randperm(len(y_all), device=self.dev)
        self.model.train()
        total = torch.zeros((), device=self.dev)
        mark = min(10, steps // 4)  # steps after which the timing is steady (cudnn autotuning done)
        _sync(self.dev)
        t0 = t_mark = time.perf_counter()
        for i in range(steps):
            if i == mark:
                _sync(self.dev)
                t_mark = time.perf_counter()
            lr = self.args.lr * self.sd.lr_factor(epoch + i / steps, epochs, "cosine", warmup=1.0)
            for group in self.opt.param_groups:
                group["lr"] = lr
            idx = order[i * b : (i + 1) * b]
            xb = self._batch(x_all[idx], train=True)
            with self._autocast():  # the loss too: its adaptation layers take the bf16 features
                logits, feats = self.model(xb)
                loss, _ = self.loss(logits, feats, y_all[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.detach()
        _sync(self.dev)
        end = time.perf_counter()
        self.epoch_seconds.append(end - t0)
        if epoch == 0:
            self.steady_estimate = (end - t_mark) * steps / (steps - mark)
        mean_loss = total.item() / steps
        if not math.isfinite(mean_loss):
            raise SystemExit(f"{self.mode}: the loss is {mean_loss} in epoch {epoch + 1}; lower --lr")
        self.last_loss = mean_loss
        return mean_loss

    @torch.no_grad()
    def evaluate(self, test: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """Top-1 (%) of every exit and of the official ensemble (mean of the exits' logits) on the test split."""
        self.model.eval()
        x_all, y_all = test
        correct = torch.zeros(self.model.num_exits + 1, device=self.dev)
        for i in range(0, len(y_all), 1000):
            xb = self._batch(x_all[i : i + 1000].to(self.dev), train=False)
            y = y_all[i : i + 1000].to(self.dev)
            with self._autocast():
                logits, _ = self.model(xb)
            logits = [z.float() for z in logits]
            outs = logits + [self.sd.ensemble_logits(logits)]
            correct += torch.stack([(z.argmax(1) == y).sum() for z in outs]).float()
        acc = (100 * correct / len(y_all)).tolist()
        return {"exits": acc[:-1], "ensemble": acc[-1] if self.model.num_exits > 1 else None}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def choose_epochs(args: argparse.Namespace, pair_seconds: float) -> int:
    """Epochs per mode: the first one (already done) plus as many pairs as the rest of the budget holds."""
    if args.epochs:
        return args.epochs
    left = args.budget_s - args.reserve_s - (time.perf_counter() - START)
    # 5 % margin: the first epoch's steady part is the only measurement, and later epochs vary a little.
    return max(1, min(args.max_epochs, 1 + int(left // (1.05 * pair_seconds))))


# ---- report -------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    k = max(len(r["test"]["exits"]) for r in results.values())
    head = f"{'mode':<14}{'epochs':>7}{'s/epoch':>9}" + "".join(f"{'exit ' + str(i + 1):>9}" for i in range(k))
    lines = [head + f"{'ensemble':>10}"]
    for mode, r in results.items():
        exits = r["test"]["exits"]
        cells = ["-"] * (k - len(exits)) + [f"{a:.2f}" for a in exits]  # the plain net's one exit is the deepest
        ens = r["test"]["ensemble"]
        lines.append(
            f"{mode:<14}{r['epochs']:>7}{r['seconds_per_epoch']:>9.2f}"
            + "".join(f"{c:>9}" for c in cells)
            + f"{(f'{ens:.2f}' if ens is not None else '-'):>10}"
        )
    return "\n".join(lines)


def machine(dev: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(dev)}
    if dev.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda)
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE / "cifar10"), help="data folder, or 'fake' (default: beside the script)")
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_reproduce.json")
    ap.add_argument("--budget-s", type=float, default=300.0, help="wall clock for the whole process (s)")
    ap.add_argument("--reserve-s", type=float, default=25.0, help="kept for the final evaluations and slack (s)")
    ap.add_argument("--epochs", type=int, default=None, help="fixed epochs per mode instead of the budget")
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--width", type=int, default=64, help="ResNet18 base width (64 = the standard network)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --smoke)")
    ap.add_argument("--limit-train", type=int, default=None, help="a fixed random subset of the training images")
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=None, help="cap on the steps of each epoch")
    ap.add_argument("--channels-last", action="store_true", help="channels_last on the CPU too (always on CUDA)")
    ap.add_argument("--smoke", action="store_true", help="CPU check in seconds: tiny subset, width 8, 1 short epoch")
    args = ap.parse_args(argv)
    if args.smoke:  # small enough for CI; the numbers mean nothing
        args.device = args.device or "cpu"
        torch.set_num_threads(1)  # tiny ops: a second thread only spins against other processes
        args.epochs, args.width, args.batch_size = 1, 8, 32
        args.limit_train, args.limit_test, args.max_steps = args.limit_train or 128, args.limit_test or 100, 4
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif not args.smoke:
        print("warning: no GPU; this runs on the CPU and the budget will allow very few epochs", flush=True)
    sd = import_sdtool()
    data = load_data(args.data, args.limit_train, args.limit_test)
    train = tuple(t.to(dev) for t in data["train"])  # the whole training set lives on the device
    n_train, n_test = len(data["train"][1]), len(data["test"][1])
    print(f"data: {data['name']}, {n_train} train / {n_test} test images, {data['classes']} classes", flush=True)
    print(f"augmentation: {AUGMENT}", flush=True)
    runs = {m: Run(sd, m, args, data["classes"], dev) for m in ("plain", "self_distill")}
    for run in runs.values():  # the first, timed epoch of each mode (its schedule does not depend on epochs)
        loss = run.train_epoch(0, 1, train)
        print(f"{run.mode}: epoch 1 {run.epoch_seconds[0]:.1f} s (steady {run.steady_estimate:.1f} s), loss {loss:.3f}")
    epochs = choose_epochs(args, sum(r.steady_estimate for r in runs.values()))
    print(f"epochs per mode: {epochs}", flush=True)
    results = {}
    for run in runs.values():
        for epoch in range(1, epochs):
            loss = run.train_epoch(epoch, epochs, train)
            print(f"{run.mode}: epoch {epoch + 1}/{epochs} {run.epoch_seconds[-1]:.1f} s, loss {loss:.3f}", flush=True)
        steady = run.epoch_seconds[1:] or [run.steady_estimate]
        results[run.mode] = {
            "epochs": epochs,
            "seconds_per_epoch": float(np.median(steady)),
            "epoch_seconds": run.epoch_seconds,
            "train_loss_last_epoch": run.last_loss,
            "test": run.evaluate(data["test"]),
        }
    wall = time.perf_counter() - START
    report = {
        "benchmark": "gpu_reproduce",
        "data": {"name": data["name"], "classes": data["classes"], "train": n_train, "test": n_test},
        "model": f"resnet18 width {args.width}, cifar stem; self_distill: byot heads + attention, 4 exits",
        "augmentation": AUGMENT,
        "precision": "bf16 autocast" if dev.type == "cuda" else "fp32",
        "channels_last": runs["plain"].channels_last,
        "optimizer": f"SGD nesterov 0.9, wd 5e-4, batch {args.batch_size}, lr {args.lr}, 1 warm-up epoch, cosine",
        "selection": "last epoch on the test split (nothing selected on it)",
        "budget_s": args.budget_s,
        "wall_s": wall,
        "machine": machine(dev),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_reproduce.json").write_text(json.dumps(report, indent=2))
    print("\n" + table(results))
    print(f"test top-1 (%), last epoch; {wall:.0f} s wall clock in all (budget {args.budget_s:.0f} s)")
    print(f"augmentation: {AUGMENT}\nwrote {args.out / 'gpu_reproduce.json'}")
    return report


if __name__ == "__main__":
    from sdtool.errors import SdtoolError

    try:
        main()
    except SdtoolError as e:  # a data file sdtool's readers refuse: one line, as the sdtool command says it
        sys.exit(f"error: {e}")
