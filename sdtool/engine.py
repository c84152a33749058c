"""One training loop, `fit()`, shared by `sdtool train` and `sdtool distill`.

Per epoch: train with the recipe's loss (self_distill, deep_supervision or plain, plus an optional
external-teacher term), evaluate every exit and the ensemble on the validation split (or the test
split when there is none; then nothing is selected on it), append a line to `metrics.jsonl`, write
`last.safetensors` and the resume state, and `best.safetensors` when a validation split exists and the
deepest exit improved.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdtool import checkpoint, cpu, distributed, report
from sdtool.data import DataBundle, build_data
from sdtool.device import amp_dtype, resolve_device, use_channels_last
from sdtool.errors import SdtoolError
from sdtool.evaluate import evaluate
from sdtool.losses import SelfDistillLoss
from sdtool.meta import CheckpointMeta, DataRef, InputSpec, ModelSpec, ValSplit
from sdtool.models import create_model
from sdtool.models.from_recipe import model_args
from sdtool.models.multi_exit import MultiExitNet
from sdtool.recipe import Recipe, dump_yaml, from_dict
from sdtool.schedule import lr_factor
from sdtool.trainstate import STATE_FILE, gather_rng, load_state, read_scalars, save_state

RECIPE_FILE = "recipe.yaml"


def build_model(
    recipe: Recipe, bundle: DataBundle, init: str | None, log: Callable[[str], None]
) -> tuple[MultiExitNet, checkpoint.Checkpoint | None]:
    """The model to train: a fresh one from the recipe, or the structure and weights of `init` (returned
    too, as the parent of the run's checkpoints)."""
    num_classes = recipe.model.num_classes or bundle.num_classes
    if num_classes != bundle.num_classes:
        raise SdtoolError(
            f"model.num_classes is {num_classes} but data set {recipe.data.name} has "
            f"{bundle.num_classes} classes; remove model.num_classes or fix it"
        )
    if init is None:
        return create_model(recipe.model.name, **model_args(recipe, num_classes, bundle.input_size)), None
    parent = checkpoint.load_checkpoint(init)
    model, meta = parent.model, parent.meta
    if meta.num_classes != bundle.num_classes:
        raise SdtoolError(
            f"--init checkpoint has {meta.num_classes} classes but data set "
            f"{recipe.data.name} has {bundle.num_classes}; use a matching data set"
        )
    if recipe.sd.mode == "plain" and model.num_exits > 1:
        raise SdtoolError(
            "--init checkpoint has several exits but sd.mode is plain; "
            "use self_distill or deep_supervision to fine-tune it"
        )
    if recipe.sd.mode != "plain" and model.num_exits == 1:
        raise SdtoolError(
            f"--init checkpoint has a single exit but sd.mode is {recipe.sd.mode}; use --set sd.mode=plain"
        )
    log(
        f"--init {init}: the checkpoint's model ({meta.model.name}, {model.num_exits} exits"
        f"{', pruned' if meta.shapes else ''}) replaces the recipe's model section"
    )
    model.train()
    return model, parent


@dataclass
class FitResult:
    run_dir: Path
    last: Path
    best: Path | None
    history: list[dict] = field(default_factory=list)
    test: dict | None = None
    runtime: dict = field(default_factory=dict)  # device, memory format, threads, OpenMP wait policy
    is_main: bool = True  # False in the other processes of a multi-process run: they print nothing

    def to_json(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "last": str(self.last),
            "best": str(self.best) if self.best else None,
            "runtime": self.runtime,
            "epochs": self.history,
            "test": self.test,
        }


def _truncate_metrics(path: Path, last_row: dict | None) -> None:
    """Make metrics.jsonl end at the resumed epoch: drop rows of an epoch that was cut short, and
    restore the committed epoch's row if the process died before appending it."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    if last_row is not None:
        rows = [r for r in rows if r["epoch"] < last_row["epoch"]] + [last_row]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _param_groups(modules: list[nn.Module]):
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def make_optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    t = recipe.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


class TrainStep(nn.Module):
    """Model + loss side in one module, so DistributedDataParallel synchronises the gradients of the
    adaptation layers and of any extra loss term together with the network's."""

    def __init__(self, model: nn.Module, criterion: nn.Module, extra: nn.Module | None, forward=None):
        super().__init__()
        self.model, self.criterion, self.extra = model, criterion, extra
        self._forward = forward or model  # possibly the torch.compile'd model

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        logits, feats = self._forward(x)
        loss, parts = self.criterion([z.float() for z in logits], [f.float() for f in feats], y)
        if self.extra is not None:
            extra_loss, extra_parts = self.extra(x, logits, feats, y)
            loss = loss + extra_loss
            parts.update(extra_parts)
        return loss, parts, logits[-1]


def load_run(resume: str | Path) -> tuple[Path, Recipe, str | None]:
    from sdtool.recipe import load_yaml

    run_dir = Path(resume)
    saved = run_dir / RECIPE_FILE
    if not saved.is_file():
        raise SdtoolError(f"{run_dir} has no {RECIPE_FILE}; --resume needs a run folder written by sdtool train")
    run_info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    return run_dir, from_dict(load_yaml(saved)), run_info.get("init")


def fit(
    recipe: Recipe,
    out: str | Path,
    init: str | None = None,
    resume: str | Path | None = None,
    extra: nn.Module | None = None,
    command: str = "train",
    quiet: bool = False,
    lineage_extra: dict | None = None,
) -> FitResult:
    """Train per `recipe`, writing checkpoints and metrics under `out` (or continue `resume`).

    Under torchrun every process calls this; rank 0 alone evaluates, writes files and shows progress.
    `extra` is an optional additional loss term (external-teacher distillation): a module whose
    `forward(x, logits, features, y)` returns (loss, parts); its trainable parameters (e.g. FitNet
    adapters) are optimised with the network and stored in the resume state.
    """
    ctx = distributed.from_env()
    quiet = quiet or not ctx.is_main
    log = report.make_logger(quiet)
    if resume is not None:
        run_dir, recipe, init = load_run(resume)
    else:
        run_dir = Path(out)
        if (run_dir / STATE_FILE).exists():
            raise SdtoolError(
                f"{run_dir} already holds a run; use --resume {run_dir} to continue it or --out with a new folder"
            )
    t = recipe.train
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    device = distributed.device_for(ctx, resolve_device(t.device))
    distributed.init(ctx, device)
    try:
        return _fit(recipe, run_dir, init, resume is not None, extra, command, quiet, log, lineage_extra, ctx, device)
    finally:
        distributed.shutdown(ctx)


def _fit(recipe, run_dir, init, resuming, extra, command, quiet, log, lineage_extra, ctx, device) -> FitResult:
    t = recipe.train
    adt = amp_dtype(device, t.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    if not ctx.is_main:
        distributed.barrier(ctx)  # rank 0 downloads or extracts the data set first, alone
    bundle = build_data(recipe.data, train=True)
    if ctx.is_main:
        distributed.barrier(ctx)
    model, parent = build_model(recipe, bundle, init, log)
    criterion = SelfDistillLoss.from_recipe(recipe.sd, model.feature_dims, t.label_smoothing)
    if ctx.enabled:
        torch.manual_seed(t.seed + 1_000_003 * ctx.rank)  # different augmentation per process
        if t.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # The memory format is decided once, when the run starts, and recorded in run.json: a resumed run reuses
    # it, since other kernels would give other bits. run.json files from before `auto` lack it; those runs
    # used channels_last only for `true` on CUDA.
    run_info = json.loads((run_dir / "run.json").read_text()) if resuming and (run_dir / "run.json").is_file() else {}
    if resuming:
        channels_last = run_info.get("channels_last", t.channels_last is True and device.type == "cuda")
    else:
        channels_last = use_channels_last(t.channels_last, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    criterion.to(device)
    if extra is not None:
        if hasattr(extra, "bind"):  # lets the extra see the student and the data (hooks, widths, checks)
            extra.bind(model, bundle)
        extra.to(device)
    trainable = [model, criterion] + ([extra] if extra is not None else [])
    optimizer = make_optimizer(recipe, _param_groups(trainable))
    scaler = torch.amp.GradScaler("cuda", enabled=adt == torch.float16)
    step_module = TrainStep(model, criterion, extra, torch.compile(model) if t.compile else None)
    if ctx.enabled:
        ids = [device.index] if device.type == "cuda" else None
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=ids)

    n_val = len(bundle.val) if bundle.val is not None else 0
    pin = device.type == "cuda"
    # A final batch of one sample breaks batch norm in training mode: drop it (each process sees its
    # own shard, padded to equal size by the DistributedSampler).
    shard = -(-len(bundle.train) // ctx.world_size)
    train_loader = bundle.loader(
        "train",
        recipe.data.batch_size,
        shuffle=True,
        seed=t.seed,
        workers=recipe.data.workers,
        distributed=ctx.enabled,
        drop_last=shard % recipe.data.batch_size == 1,
        pin_memory=pin,
    )
    eval_split = "val" if n_val else "test"
    eval_loader = bundle.loader(
        eval_split, recipe.data.eval_batch_size, shuffle=False, seed=0, workers=recipe.data.workers, pin_memory=pin
    )
    steps_per_epoch = len(train_loader) if t.limit_batches is None else min(len(train_loader), t.limit_batches)
    # Reading a value from the GPU waits for it; on CUDA read the running sums every few steps only.
    sync_every = 1 if device.type == "cpu" else 25

    # The parent is hashed once, when the run starts; a resumed run keeps that hash (the file may have moved).
    parent_sha = run_info.get("init_sha256") or (checkpoint.sha256(init) if init else None)
    start_epoch, step, best_top1 = 0, 0, -math.inf
    started = checkpoint.now()
    if resuming:
        if not (run_dir / STATE_FILE).is_file():
            raise SdtoolError(f"{run_dir} stopped before its first epoch ended; nothing to resume, start it again")
        saved_world = read_scalars(run_dir).get("world_size", 1)
        if saved_world != ctx.world_size:  # checked first: other ranks' RNG states would be missing
            raise SdtoolError(
                f"{run_dir} was trained with {saved_world} processes; resume it "
                f"with the same number (this run has {ctx.world_size})"
            )
        state = load_state(run_dir, model, optimizer, criterion, scaler, rank=ctx.rank, extra=extra)
        start_epoch, step, best_top1 = state["epoch"] + 1, state["step"], state["best_top1"]
        started = state["started"]
        if ctx.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", state.get("row"))
        log(f"resuming {run_dir} after epoch {start_epoch} of {t.epochs}")
        if start_epoch >= t.epochs:
            log("the run had already finished; nothing to do")
    elif ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RECIPE_FILE).write_text(dump_yaml(recipe))
        (run_dir / "run.json").write_text(
            json.dumps({"init": init, "init_sha256": parent_sha, "command": command, "channels_last": channels_last})
        )
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    # The run's checkpoints descend from --init (hashed once, when the run started) or from nothing; their
    # metadata describes this run's data, not the parent's, and only the lineage is carried over.
    origin = checkpoint.Checkpoint(
        model,
        CheckpointMeta(
            model=ModelSpec.from_json(model.spec, "the model's spec"),
            num_classes=bundle.num_classes,
            class_names=bundle.class_names,
            input=InputSpec(size=bundle.input_size, channels=3, mean=list(bundle.mean), std=list(bundle.std)),
            data=DataRef(recipe.data.name, recipe.data.root, recipe.data.train_file, recipe.data.test_file),
            val_split=ValSplit(**bundle.val_info) if bundle.val_info else None,
            ensemble=recipe.sd.ensemble,
            mode=recipe.sd.mode,
            lineage=parent.meta.lineage if parent is not None else [],
        ),
        path=init,
        sha256=parent_sha,
    )

    def save_ckpt(path: Path, metrics: dict) -> None:
        lineage = {"world_size": ctx.world_size, **(lineage_extra or {})}
        origin.derive(
            command, recipe=recipe.to_dict(), step_metrics=metrics, metrics=metrics, started=started, lineage=lineage
        ).save(path)

    history: list[dict] = []
    best_path = run_dir / "best.safetensors" if n_val else None
    runtime = {
        "device": str(device),
        "memory_format": "channels_last" if channels_last else "contiguous",
        **cpu.runtime_settings(),
    }
    log(
        report.run_header(
            recipe, model, bundle, device, adt, steps_per_epoch, eval_split, n_val, runtime, ctx.world_size
        )
    )
    lr = t.lr
    for epoch in range(start_epoch, t.epochs):
        train_loader.sampler.set_epoch(epoch)
        step_module.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        part_sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        t0 = time.perf_counter()
        with report.epoch_progress(epoch, t.epochs, steps_per_epoch, quiet) as bar:
            for i, (x, y) in enumerate(train_loader):
                if i >= steps_per_epoch:
                    break
                lr = t.lr * lr_factor(
                    step / steps_per_epoch, t.epochs, t.schedule, t.milestones, t.gamma, t.warmup_epochs
                )
                for g in optimizer.param_groups:
                    g["lr"] = lr
                x = bundle.prepare(x.to(device, non_blocking=True), train=True)
                x = x.contiguous(memory_format=memory_format)
                y = y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=adt, enabled=adt is not None):
                    loss, parts, deepest = step_module(x, y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if t.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(_param_groups(trainable), t.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                bs = y.shape[0]
                loss_sum += loss.detach() * bs
                for k, v in parts.items():
                    part_sums[k] = part_sums.get(k, 0) + v * bs
                correct += (deepest.argmax(1) == y).sum()
                seen += bs
                if (i + 1) % sync_every == 0 or i + 1 == steps_per_epoch:
                    ls = float(loss_sum)
                    # Every process must take the same decision, or the others would hang in the next step.
                    if distributed.any_flag(not math.isfinite(ls), device, ctx):
                        kept = (
                            f"{run_dir / 'last.safetensors'} keeps the last good epoch"
                            if epoch > start_epoch or resuming
                            else "no checkpoint was written"
                        )
                        raise SdtoolError(
                            f"loss became {ls / seen if math.isfinite(ls) else ls} at epoch "
                            f"{epoch + 1}, step {i + 1} (lr {lr:.3g}); {kept}; lower train.lr"
                        )
                    bar.update(
                        i + 1,
                        loss=ls / seen,
                        acc=100.0 * int(correct) / seen,
                        ips=seen * ctx.world_size / (time.perf_counter() - t0),
                    )
        train_time = time.perf_counter() - t0
        names = sorted(part_sums)
        ls, nc, n, *ps = distributed.all_reduce_sums(
            [float(loss_sum), float(correct), float(seen)] + [float(part_sums[k]) for k in names], device, ctx
        )
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": ls / max(n, 1),
            "train_top1": 100.0 * nc / max(n, 1),
            "images_per_s": n / train_time,
            "train_seconds": train_time,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": runtime["omp_wait_policy"],
            "memory_format": runtime["memory_format"],
            "device": str(device),
            "world_size": ctx.world_size,
            "train_parts": {k: v / max(n, 1) for k, v in zip(names, ps, strict=True)},
        }
        if extra is not None and hasattr(extra, "epoch_metrics"):  # e.g. the external teacher's time
            row.update(extra.epoch_metrics())
        rng = gather_rng(device, ctx)
        failure: BaseException | None = None
        if ctx.is_main:
            try:
                if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
                    row["eval_split"] = eval_split
                    row["eval"] = evaluate(model, eval_loader, bundle.prepare, device, recipe.sd.ensemble, adt)
                history.append(row)
                metrics = {"epoch": epoch + 1, **({eval_split: row["eval"]} if "eval" in row else {})}
                if best_path is not None and "eval" in row and row["eval"]["exits"][-1]["top1"] > best_top1:
                    best_top1 = row["eval"]["exits"][-1]["top1"]
                    save_ckpt(best_path, metrics)
                save_ckpt(run_dir / "last.safetensors", metrics)
                # The resume state is the commit point of an epoch; metrics.jsonl is reconciled with it on resume.
                save_state(
                    run_dir,
                    model,
                    optimizer,
                    criterion,
                    scaler,
                    rng,
                    {
                        "epoch": epoch,
                        "step": step,
                        "best_top1": best_top1,
                        "started": started,
                        "row": row,
                        "world_size": ctx.world_size,
                    },
                    extra=extra,
                )
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                log(report.epoch_line(row), table=report.epoch_table(row) if not quiet else None)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
                failure = exc
        if distributed.any_flag(failure is not None, device, ctx):
            raise failure or SdtoolError("process 0 failed while evaluating or saving; see its message")

    result = FitResult(
        run_dir,
        run_dir / "last.safetensors",
        best_path if best_path and best_path.exists() else None,
        history,
        runtime=runtime,
        is_main=ctx.is_main,
    )
    if ctx.is_main:
        # The test split is reported, never used for selection: with a validation split, `best` was chosen on it.
        test_loader = bundle.loader(
            "test", recipe.data.eval_batch_size, shuffle=False, seed=0, workers=recipe.data.workers
        )
        final, _ = checkpoint.load(result.best or result.last, device)
        result.test = {
            "checkpoint": str(result.best or result.last),
            **evaluate(final, test_loader, bundle.prepare, device, recipe.sd.ensemble, adt),
        }
    return result
