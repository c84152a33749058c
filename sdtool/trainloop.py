"""The epochs of one training run and what they share; `sdtool.engine.fit` drives them.

    run = engine._open_run(...)                  # a `Run`: data, model, loss, optimizer, loaders, counters
    for epoch in range(run.progress.start_epoch, epochs):
        commit_epoch(run, epoch, train_epoch(run, epoch))
    result = final_test(run)                     # a `FitResult`

`train_epoch` trains one pass (the recipe's loss plus the optional `ExtraLoss` term, inside `TrainStep`) and
returns the epoch's metrics row, summed over every process; a non-finite loss stops every process at once.
`commit_epoch` checks the weights, evaluates (rank 0) and checks that loss (sdtool/finite.py), writes
`best.safetensors` when the deepest exit improved on a validation split, `last.safetensors`, the resume state
(the epoch's commit point) and the metrics.jsonl row, then tells every process whether that failed.
`final_test` reports the best (or last) checkpoint on the test split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.utils.data import DataLoader

from sdtool import checkpoint, distributed, report
from sdtool.data import DataBundle
from sdtool.data.loader import EpochBatchSampler
from sdtool.distributed import DistContext
from sdtool.errors import SdtoolError
from sdtool.evaluate import evaluate
from sdtool.finite import check_eval, stop_unless_finite_loss, stop_unless_finite_weights
from sdtool.losses import SelfDistillLoss
from sdtool.models.multi_exit import MultiExitNet
from sdtool.recipe import Recipe
from sdtool.runfolder import BEST_FILE, LAST_FILE, append_metrics
from sdtool.scalars import ScalarLog
from sdtool.schedule import lr_factor
from sdtool.trainstate import gather_rng, save_state


class ExtraLoss(Protocol):
    """An additional loss term for `fit(..., extra=...)`, e.g. `sdtool.distill.DistillExtra` (a teacher).

    In practice an `nn.Module`: the engine moves it to the device, optimises its trainable parameters (e.g.
    FitNet adapters) with the network's, stores them in the resume state, and runs it inside `TrainStep`, so
    that DistributedDataParallel synchronises their gradients too. A term with nothing to bind or to report
    implements `bind` as a no-op and `epoch_metrics` as `return {}`.
    """

    def bind(self, model: MultiExitNet, bundle: DataBundle) -> None:
        """Called once with the student (already on its device) and the data, before the optimizer exists:
        hooks on the student, parameters that follow its widths, checks against the data."""
        ...

    def __call__(
        self, x: torch.Tensor, logits: list[torch.Tensor], features: list[torch.Tensor], y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, parts) of one training step: `x` the augmented, normalized batch, `y` its labels, `logits`
        and `features` the student's per exit; the parts (detached tensors) add up in `train_parts`."""
        ...

    def epoch_metrics(self) -> dict[str, float]:
        """Numbers about the epoch just trained, added to its metrics row (e.g. the teacher's time); resets
        them. Every process calls it once per epoch."""
        ...

    # The nn.Module methods the engine uses.
    def to(self, device: torch.device) -> Any: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...


def trainable_parameters(
    model: MultiExitNet, criterion: SelfDistillLoss, extra: ExtraLoss | None
) -> list[nn.Parameter]:
    """What the optimizer updates (and gradient clipping sees): network, adaptation layers, extra term."""
    modules = [model, criterion] + ([extra] if extra is not None else [])
    return [p for m in modules for p in m.parameters() if p.requires_grad]


class TrainStep(nn.Module):
    """Model + loss side in one module, so DistributedDataParallel synchronises the gradients of the
    adaptation layers and of any extra loss term together with the network's."""

    model: MultiExitNet
    criterion: SelfDistillLoss
    extra: ExtraLoss | None

    def __init__(
        self,
        model: MultiExitNet,
        criterion: SelfDistillLoss,
        extra: ExtraLoss | None,
        forward: Callable[..., Any] | None = None,
    ):
        super().__init__()
        self.model, self.criterion, self.extra = model, criterion, extra
        self._forward = forward or model  # possibly the torch.compile'd model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        logits, feats = self._forward(x)
        loss, parts = self.criterion([z.float() for z in logits], [f.float() for f in feats], y)
        if self.extra is not None:
            extra_loss, extra_parts = self.extra(x, logits, feats, y)
            loss = loss + extra_loss
            parts.update(extra_parts)
        return loss, parts, logits[-1]


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


@dataclass
class Progress:
    """The counters the epochs advance; all but `lr` and `history` are part of the resume state."""

    started: str  # when the run started (every checkpoint's lineage entry records it)
    lr: float  # the learning rate of the last step (the metrics row reports it)
    start_epoch: int = 0  # the first epoch this process trains (> 0 when resumed)
    step: int = 0
    best_top1: float = -math.inf  # the deepest exit's best validation top-1 so far
    history: list[dict] = field(default_factory=list)  # the metrics rows (rank 0's hold the evaluations)


@dataclass
class Run:
    """What the epochs of one training run share; `engine._open_run` builds it."""

    recipe: Recipe
    run_dir: Path
    dist: DistContext
    device: torch.device
    amp: torch.dtype | None  # autocast dtype; None: full precision
    memory_format: torch.memory_format  # of the weights and of every batch (decided once, see run.json)
    bundle: DataBundle
    model: MultiExitNet
    criterion: SelfDistillLoss
    extra: ExtraLoss | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step_module: nn.Module  # TrainStep, inside DistributedDataParallel under torchrun
    train_loader: DataLoader
    eval_loader: DataLoader
    eval_split: str  # "val", or "test" when there is no validation split (then nothing is selected on it)
    steps_per_epoch: int
    origin: checkpoint.Checkpoint  # the parent of the run's checkpoints (see engine._origin)
    command: str  # the command named in the checkpoints' lineage
    lineage_extra: dict[str, Any]  # more for the lineage entry (e.g. the teacher)
    runtime: dict[str, Any]  # device, memory format, threads, OpenMP wait policy
    log: Callable[..., None]
    quiet: bool
    resuming: bool
    progress: Progress
    scalars: ScalarLog | None = None  # train.tensorboard: the TensorBoard view of the metrics rows

    @property
    def best_path(self) -> Path | None:
        """best.safetensors is selected on the validation split, so only written when there is one."""
        return self.run_dir / BEST_FILE if self.eval_split == "val" else None

    @property
    def sync_every(self) -> int:
        # Reading a value from the GPU waits for it; on CUDA read the running sums every few steps only.
        return 1 if self.device.type == "cpu" else 25

    def trainable_parameters(self) -> list[nn.Parameter]:
        return trainable_parameters(self.model, self.criterion, self.extra)

    def save_checkpoint(self, path: Path, metrics: dict[str, Any]) -> None:
        lineage = {"world_size": self.dist.world_size, **self.lineage_extra}
        self.origin.derive(
            self.command,
            recipe=self.recipe.to_dict(),
            step_metrics=metrics,
            metrics=metrics,
            started=self.progress.started,
            lineage=lineage,
        ).save(path)


@dataclass
class _Sums:
    """One epoch's running training sums, kept on the device: reading them waits for it."""

    loss: torch.Tensor
    correct: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: int = 0

    @classmethod
    def zero(cls, device: torch.device) -> _Sums:
        return cls(
            torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.int64, device=device)
        )

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], deepest: torch.Tensor, y: torch.Tensor) -> None:
        bs = y.shape[0]
        self.loss += loss.detach() * bs
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0) + v * bs
        self.correct += (deepest.argmax(1) == y).sum()
        self.seen += bs


def train_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One pass over the training split (at most `steps_per_epoch` steps); the epoch's metrics row."""
    t = run.recipe.train
    cast(EpochBatchSampler, run.train_loader.sampler).set_epoch(epoch)
    run.step_module.train()
    sums = _Sums.zero(run.device)
    t0 = time.perf_counter()
    # Shown under --json too (stderr); only the first process of a distributed run draws it.
    with report.epoch_progress(epoch, t.epochs, run.steps_per_epoch, not run.dist.is_main) as bar:
        for i, (x, y) in enumerate(run.train_loader):
            if i >= run.steps_per_epoch:
                break
            sums.add(*_train_step(run, x, y))
            if (i + 1) % run.sync_every == 0 or i + 1 == run.steps_per_epoch:
                ls = float(sums.loss)
                stop_unless_finite_loss(run, epoch, i, ls, sums.seen)
                bar.update(
                    i + 1,
                    loss=ls / sums.seen,
                    acc=100.0 * int(sums.correct) / sums.seen,
                    ips=sums.seen * run.dist.world_size / (time.perf_counter() - t0),
                )
    return _train_row(run, epoch, sums, time.perf_counter() - t0)


def _train_step(
    run: Run, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One optimizer step at the schedule's learning rate: (loss, parts, deepest exit's logits, y on the device)."""
    t, p = run.recipe.train, run.progress
    p.lr = t.lr * lr_factor(p.step / run.steps_per_epoch, t.epochs, t.schedule, t.milestones, t.gamma, t.warmup_epochs)
    for g in run.optimizer.param_groups:
        g["lr"] = p.lr
    x = run.bundle.prepare(x.to(run.device, non_blocking=True), train=True)
    x = x.contiguous(memory_format=run.memory_format)
    y = y.to(run.device, non_blocking=True)
    with torch.autocast(run.device.type, dtype=run.amp, enabled=run.amp is not None):
        loss, parts, deepest = run.step_module(x, y)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if t.grad_clip:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.trainable_parameters(), t.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    p.step += 1
    return loss, parts, deepest, y


def _train_row(run: Run, epoch: int, sums: _Sums, train_time: float) -> dict[str, Any]:
    """The epoch's metrics row: training sums over every process, the runtime, the extra term's numbers."""
    names = sorted(sums.parts)
    ls, nc, n, *ps = distributed.all_reduce_sums(
        [float(sums.loss), float(sums.correct), float(sums.seen)] + [float(sums.parts[k]) for k in names],
        run.device,
        run.dist,
    )
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "lr": run.progress.lr,
        "train_loss": ls / max(n, 1),
        "train_top1": 100.0 * nc / max(n, 1),
        "images_per_s": n / train_time,
        "train_seconds": train_time,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": run.runtime["omp_wait_policy"],
        "memory_format": run.runtime["memory_format"],
        "device": str(run.device),
        "world_size": run.dist.world_size,
        "train_parts": {k: v / max(n, 1) for k, v in zip(names, ps, strict=True)},
    }
    if run.extra is not None:
        row.update(run.extra.epoch_metrics())  # e.g. the external teacher's time
    return row


def commit_epoch(run: Run, epoch: int, row: dict[str, Any]) -> None:
    """Rank 0 evaluates and writes the epoch's files; then every process learns whether that failed. Nothing
    non-finite is written: the previous epoch's files stay, and the error names that epoch."""
    stop_unless_finite_weights(run, epoch)
    rng = gather_rng(run.device, run.dist)  # every process's RNG states, for the resume state
    failure: BaseException | None = None
    if run.dist.is_main:
        try:
            _evaluate(run, epoch, row)
            check_eval(run, epoch, row)
            _write_epoch(run, epoch, row, rng)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure = exc
    if distributed.any_flag(failure is not None, run.device, run.dist):
        raise failure or SdtoolError("process 0 failed while evaluating or saving; see its message")


def _evaluate(run: Run, epoch: int, row: dict[str, Any]) -> None:
    """Every exit and the ensemble on the evaluation split, every `eval_every` epochs and after the last."""
    t = run.recipe.train
    if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
        row["eval_split"] = run.eval_split
        row["eval"] = evaluate(
            run.model, run.eval_loader, run.bundle.prepare, run.device, run.recipe.sd.ensemble, run.amp
        )


def _write_epoch(run: Run, epoch: int, row: dict[str, Any], rng: dict[str, torch.Tensor]) -> None:
    """best (when the deepest exit improved), last, the resume state and the metrics row, in that order."""
    p = run.progress
    p.history.append(row)
    metrics = {"epoch": epoch + 1, **({run.eval_split: row["eval"]} if "eval" in row else {})}
    if run.best_path is not None and "eval" in row and row["eval"]["exits"][-1]["top1"] > p.best_top1:
        p.best_top1 = row["eval"]["exits"][-1]["top1"]
        run.save_checkpoint(run.best_path, metrics)
    run.save_checkpoint(run.run_dir / LAST_FILE, metrics)
    # The resume state is the commit point of an epoch; metrics.jsonl is reconciled with it on resume.
    scalars = {
        "epoch": epoch,
        "step": p.step,
        "best_top1": p.best_top1,
        "started": p.started,
        "row": row,
        "world_size": run.dist.world_size,
    }
    save_state(run.run_dir, run.model, run.optimizer, run.criterion, run.scaler, rng, scalars, extra=run.extra)
    append_metrics(run.run_dir, row)
    if run.recipe.train.tensorboard:
        if run.scalars is None:
            run.scalars = ScalarLog(run.run_dir, p.start_epoch)
        run.scalars.write(epoch, row)
    run.log(report.epoch_line(row), table=report.epoch_table(row) if not run.quiet else None)


def final_test(run: Run) -> FitResult:
    """The result; rank 0 adds the best checkpoint's (else the last's) accuracy on the test split."""
    if run.scalars is not None:
        run.scalars.close()
    best = run.best_path if run.best_path is not None and run.best_path.exists() else None
    result = FitResult(
        run.run_dir,
        run.run_dir / LAST_FILE,
        best,
        run.progress.history,
        runtime=run.runtime,
        is_main=run.dist.is_main,
    )
    if run.dist.is_main:
        # The test split is reported, never used for selection: with a validation split, `best` was chosen on it.
        data = run.recipe.data
        test_loader = run.bundle.loader("test", data.eval_batch_size, shuffle=False, seed=0, workers=data.workers)
        final, _ = checkpoint.load(result.best or result.last, run.device)
        result.test = {
            "checkpoint": str(result.best or result.last),
            **evaluate(final, test_loader, run.bundle.prepare, run.device, run.recipe.sd.ensemble, run.amp),
        }
    return result
