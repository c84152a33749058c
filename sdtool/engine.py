"""One training loop, `fit()`, shared by `sdtool train` and `sdtool distill`; it reads top-down:

    fit()
      _open_run()       data, model, loss, optimizer, loaders, memory format; then a new run folder, or the
                        resume state of the run being continued -> a `Run` (sdtool/trainloop.py)
      per epoch:
        train_epoch()   train with the recipe's loss (self_distill, deep_supervision or plain), plus an
                        optional extra term (`ExtraLoss`, e.g. an external teacher)
        commit_epoch()  evaluate every exit and the ensemble on the validation split (or the test split when
                        there is none; then nothing is selected on it), write `best.safetensors` when a
                        validation split exists and the deepest exit improved, `last.safetensors`, the resume
                        state, and a line of `metrics.jsonl`
      final_test()      the best (or last) checkpoint on the test split

A run folder also holds its `recipe.yaml` and `run.json` (`RunInfo`: what the run decided when it started,
which a resumed run reuses); `load_run` reads both, once.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sdtool import checkpoint, cpu, distributed, report, runfolder, runlock, scalars
from sdtool.data import DataBundle, build_data
from sdtool.device import amp_dtype, resolve_device, use_channels_last
from sdtool.distributed import DistContext
from sdtool.errors import SdtoolError
from sdtool.losses import SelfDistillLoss
from sdtool.meta import CheckpointMeta, DataRef, InputSpec, ModelSpec, ValSplit
from sdtool.models import create_model
from sdtool.models.from_recipe import model_args
from sdtool.models.multi_exit import MultiExitNet
from sdtool.models.pretrained import load_pretrained, recorded
from sdtool.recipe import Recipe
from sdtool.runfolder import LAST_FILE, METRICS_FILE, RunInfo, load_run, new_run_dir, start_run_folder, truncate_metrics
from sdtool.trainloop import (
    ExtraLoss,
    FitResult,
    Progress,
    Run,
    TrainStep,
    commit_epoch,
    final_test,
    train_epoch,
    trainable_parameters,
)
from sdtool.trainstate import STATE_FILE, load_state, read_scalars

__all__ = ["ExtraLoss", "FitResult", "RunInfo", "build_model", "fit", "load_run", "make_optimizer", "model_args"]


def build_model(
    recipe: Recipe, bundle: DataBundle, init: str | None, log: Callable[[str], None]
) -> tuple[MultiExitNet, checkpoint.Checkpoint | None]:
    """The model to train: a fresh one from the recipe, or the structure and weights of `init` (returned
    too, as the parent of the run's checkpoints). `model.pretrained` is loaded by `fit` (load_pretrained)."""
    if init is not None and recipe.model.pretrained is not None:
        # Both would set the starting weights: --init a whole sdtool model, model.pretrained the backbone alone.
        raise SdtoolError(
            "--init and model.pretrained both set the starting weights; drop --init, or "
            "--set model.pretrained=null to start from the checkpoint"
        )
    num_classes = recipe.model.num_classes or bundle.num_classes
    if num_classes != bundle.num_classes:
        raise SdtoolError(
            f"model.num_classes is {num_classes} but data set {recipe.data.name} has "
            f"{bundle.num_classes} classes; remove model.num_classes or fix it"
        )
    if init is None:
        model = create_model(recipe.model.name, **model_args(recipe, num_classes, bundle.input_size))
        return cast(MultiExitNet, model), None  # every registered builder makes a MultiExitNet
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


def make_optimizer(recipe: Recipe, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    t = recipe.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def fit(
    recipe: Recipe | None,
    out: str | Path | None,
    init: str | None = None,
    resume: str | Path | None = None,
    extra: ExtraLoss | None = None,
    command: str = "train",
    quiet: bool = False,
    lineage_extra: dict | None = None,
) -> FitResult:
    """Train per `recipe`, writing checkpoints and metrics under `out` (or continue `resume`, whose run
    folder holds the recipe: `recipe` and `out` are then ignored and may be None).

    Under torchrun every process calls this; rank 0 alone evaluates, writes files and shows progress.
    `extra` is an optional additional loss term (external-teacher distillation, see `ExtraLoss`): its
    forward `(x, logits, features, y)` returns (loss, parts); its trainable parameters (e.g. FitNet
    adapters) are optimised with the network and stored in the resume state.
    """
    dist = distributed.from_env()
    if resume is not None:
        run_dir, recipe, resumed = load_run(resume)
        init = resumed.init
    elif recipe is None or out is None:
        raise SdtoolError("fit needs a recipe and an output folder, or resume= a run folder")
    else:
        run_dir, resumed = new_run_dir(out), None
        if init is not None:  # a damaged or hostile --init fails before any data is read (no allocation)
            checkpoint.check_checkpoint(init)
    plan = _Plan(recipe, run_dir, init, resumed, extra, command, lineage_extra or {}, quiet or not dist.is_main)
    t = recipe.train
    if t.tensorboard and dist.is_main:
        scalars.check_available()  # before any data is read
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    device = distributed.device_for(dist, resolve_device(t.device))
    distributed.init(dist, device)
    option = "--resume" if resume is not None else "--out"
    lock = None
    try:
        # Before any data or model: a folder that cannot be written, or that another run writes, fails first.
        lock = distributed.on_main(dist, device, lambda: runlock.open_folder(run_dir, option, runfolder.RUN_FILES))
        run = _open_run(plan, dist, device)
        for epoch in range(run.progress.start_epoch, t.epochs):
            commit_epoch(run, epoch, train_epoch(run, epoch))
        return final_test(run)
    except KeyboardInterrupt as e:
        runlock.note_resume(e, run_dir / STATE_FILE, command)
        raise
    finally:
        if lock is not None:
            lock.release()
        distributed.shutdown(dist)


@dataclass(frozen=True)
class _Plan:
    """What `fit` was asked for, with --resume resolved."""

    recipe: Recipe
    run_dir: Path
    init: str | None
    resumed: RunInfo | None  # run.json of the run being continued; None when the run starts here
    extra: ExtraLoss | None
    command: str
    lineage_extra: dict[str, Any]
    quiet: bool


def _open_run(plan: _Plan, dist: DistContext, device: torch.device) -> Run:
    """Everything the epochs share; then the run folder is started, or the resume state loaded."""
    recipe, t, extra = plan.recipe, plan.recipe.train, plan.extra
    log = report.make_logger(plan.quiet)
    amp = amp_dtype(device, t.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    bundle = _load_data(recipe, dist)
    channels_last = _channels_last(plan.resumed, t.channels_last, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model, criterion, parent, weights = _model_and_loss(plan, bundle, dist, device, memory_format, log)
    optimizer = make_optimizer(recipe, trainable_parameters(model, criterion, extra))
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    step = TrainStep(model, criterion, extra, torch.compile(model) if t.compile else None)
    step_module = _step_module(step, dist, device)
    train_loader, eval_loader, eval_split = _loaders(recipe, bundle, dist, device)
    # The parent is hashed once, when the run starts; a resumed run keeps that hash (the file may have moved).
    recorded_sha = plan.resumed.init_sha256 if plan.resumed is not None else None
    parent_sha = recorded_sha or (checkpoint.sha256(plan.init) if plan.init else None)
    run = Run(
        recipe=recipe,
        run_dir=plan.run_dir,
        dist=dist,
        device=device,
        amp=amp,
        memory_format=memory_format,
        bundle=bundle,
        model=model,
        criterion=criterion,
        extra=extra,
        optimizer=optimizer,
        scaler=scaler,
        step_module=step_module,
        train_loader=train_loader,
        eval_loader=eval_loader,
        eval_split=eval_split,
        steps_per_epoch=len(train_loader) if t.limit_batches is None else min(len(train_loader), t.limit_batches),
        origin=_origin(recipe, bundle, model, parent, plan.init, parent_sha),
        command=plan.command,
        lineage_extra={**plan.lineage_extra, **({"pretrained": weights} if weights else {})},
        runtime=_runtime(device, channels_last),
        log=log,
        quiet=plan.quiet,
        resuming=plan.resumed is not None,
        progress=Progress(started=checkpoint.now(), lr=t.lr),
    )
    if plan.resumed is not None:
        _resume(run)
    else:  # every process learns whether rank 0 could start the folder
        info, need = RunInfo(plan.init, parent_sha, plan.command, channels_last), _first_epoch_bytes(model)
        distributed.on_main(dist, device, lambda: start_run_folder(plan.run_dir, recipe, info, need))
    log(_header(run))
    return run


def _first_epoch_bytes(model: nn.Module) -> int:
    """About what the first epoch writes: last, best and the resume state (weights and optimizer buffers)."""
    return 5 * sum(v.numel() * v.element_size() for v in model.state_dict().values())


def _model_and_loss(
    plan: _Plan,
    bundle: DataBundle,
    dist: DistContext,
    device: torch.device,
    memory_format: torch.memory_format,
    log: Callable[..., None],
) -> tuple[MultiExitNet, SelfDistillLoss, checkpoint.Checkpoint | None, dict[str, Any]]:
    """The network and its loss on the device, the extra term bound to them; the --init parent, if any; and
    the record of model.pretrained's weights ({} without them) for the lineage."""
    t, extra = plan.recipe.train, plan.extra
    model, parent = build_model(plan.recipe, bundle, plan.init, log)
    weights: dict[str, Any] = {}
    if plan.recipe.model.pretrained is not None:
        # A resumed run's state replaces every weight: its record comes from its last checkpoint instead.
        resumed = plan.resumed is not None
        weights = recorded(plan.run_dir / LAST_FILE) if resumed else load_pretrained(model, plan.recipe.model, log)
    criterion = SelfDistillLoss.from_recipe(plan.recipe.sd, model.feature_dims, t.label_smoothing)
    if dist.enabled:
        torch.manual_seed(t.seed + 1_000_003 * dist.rank)  # different augmentation per process
        if t.sync_bn:  # converts the batch-norm layers of `model` in place
            model = cast(MultiExitNet, nn.SyncBatchNorm.convert_sync_batchnorm(model))
    # torch's stubs type Module.to(device) and Module.to(memory_format=...) apart; one call takes both.
    model.to(device, memory_format=memory_format)  # type: ignore[call-overload]
    criterion.to(device)
    if extra is not None:
        extra.bind(model, bundle)  # lets the extra see the student and the data (hooks, widths, checks)
        extra.to(device)
    return model, criterion, parent, weights


def _load_data(recipe: Recipe, dist: DistContext) -> DataBundle:
    if not dist.is_main:
        distributed.barrier(dist)  # rank 0 downloads or extracts the data set first, alone
    bundle = build_data(recipe.data, train=True)
    if dist.is_main:
        distributed.barrier(dist)
    n, batch = _size(bundle.train), recipe.data.batch_size
    if n < batch:
        # Every epoch would be one short batch: the schedule, warm-up and batch-norm statistics are not what the
        # recipe describes, and it is almost always a wrong batch or data size.
        raise SdtoolError(
            f"data set {recipe.data.name} leaves {n} training images, fewer than one batch of "
            f"data.batch_size={batch}; set data.batch_size to at most {n} or add training images"
        )
    return bundle


def _size(split: Dataset | None) -> int:
    return len(cast(Sized, split)) if split is not None else 0  # torch's Dataset does not declare __len__


def _channels_last(resumed: RunInfo | None, setting: str | bool, device: torch.device) -> bool:
    """The memory format is decided once, when the run starts, and recorded in run.json: a resumed run reuses
    it, since other kernels would give other bits. run.json files from before `auto` lack it; those runs
    used channels_last only for `true` on CUDA."""
    if resumed is None:
        return use_channels_last(setting, device)
    if resumed.channels_last is None:
        return setting is True and device.type == "cuda"
    return resumed.channels_last


def _step_module(step: TrainStep, dist: DistContext, device: torch.device) -> nn.Module:
    """The training step, in DistributedDataParallel when several processes train."""
    if not dist.enabled:
        return step
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(step, device_ids=ids)


def _loaders(
    recipe: Recipe, bundle: DataBundle, dist: DistContext, device: torch.device
) -> tuple[DataLoader, DataLoader, str]:
    """The training loader (this process's shard), the evaluation loader and its split: the validation
    split, else test."""
    data, pin = recipe.data, device.type == "cuda"
    # A final batch of one sample breaks batch norm in training mode: drop it (each process sees its
    # own shard, padded to equal size by the DistributedSampler).
    shard = -(-_size(bundle.train) // dist.world_size)
    train = bundle.loader(
        "train",
        data.batch_size,
        shuffle=True,
        seed=recipe.train.seed,
        workers=data.workers,
        distributed=dist.enabled,
        drop_last=shard % data.batch_size == 1,
        pin_memory=pin,
    )
    eval_split = "val" if _size(bundle.val) else "test"
    evaluation = bundle.loader(
        eval_split, data.eval_batch_size, shuffle=False, seed=0, workers=data.workers, pin_memory=pin
    )
    return train, evaluation, eval_split


def _origin(
    recipe: Recipe,
    bundle: DataBundle,
    model: MultiExitNet,
    parent: checkpoint.Checkpoint | None,
    init: str | None,
    parent_sha: str | None,
) -> checkpoint.Checkpoint:
    """What the run's checkpoints derive from: --init (hashed once, when the run started) or nothing. Their
    metadata describes this run's data, not the parent's; only the lineage is carried over."""
    meta = CheckpointMeta(
        model=ModelSpec.from_json(model.spec, "the model's spec"),
        num_classes=bundle.num_classes,
        class_names=bundle.class_names,
        input=InputSpec(size=bundle.input_size, channels=3, mean=list(bundle.mean), std=list(bundle.std)),
        data=DataRef(recipe.data.name, recipe.data.root, recipe.data.train_file, recipe.data.test_file),
        val_split=ValSplit(**bundle.val_info) if bundle.val_info else None,
        ensemble=recipe.sd.ensemble,
        mode=recipe.sd.mode,
        lineage=parent.meta.lineage if parent is not None else [],
    )
    return checkpoint.Checkpoint(model, meta, path=init, sha256=parent_sha)


def _runtime(device: torch.device, channels_last: bool) -> dict[str, Any]:
    return {
        "device": str(device),
        "memory_format": "channels_last" if channels_last else "contiguous",
        **cpu.runtime_settings(),
    }


def _resume(run: Run) -> None:
    """Load the interrupted run's resume state into `run`: weights, optimizer, loss modules, scaler, RNG
    states and the counters; metrics.jsonl is made to end at the epoch that state committed."""
    run_dir, dist, epochs = run.run_dir, run.dist, run.recipe.train.epochs
    if not (run_dir / STATE_FILE).is_file():
        raise SdtoolError(f"{run_dir} stopped before its first epoch ended; nothing to resume, start it again")
    saved_world = read_scalars(run_dir).get("world_size", 1)
    if saved_world != dist.world_size:  # checked first: other ranks' RNG states would be missing
        raise SdtoolError(
            f"{run_dir} was trained with {saved_world} processes; resume it "
            f"with the same number (this run has {dist.world_size})"
        )
    state = load_state(run_dir, run.model, run.optimizer, run.criterion, run.scaler, rank=dist.rank, extra=run.extra)
    p = run.progress
    p.start_epoch, p.step = state["epoch"] + 1, state["step"]
    p.best_top1, p.started = state["best_top1"], state["started"]
    # Rank 0 repairs metrics.jsonl; if it cannot (a damaged row), every process stops with it, none waits.
    distributed.on_main(dist, run.device, lambda: truncate_metrics(run_dir / METRICS_FILE, state.get("row")))
    run.log(f"resuming {run_dir} after epoch {p.start_epoch} of {epochs}")
    if p.start_epoch >= epochs:
        run.log("the run had already finished; nothing to do")


def _header(run: Run) -> str:
    setup = report.RunSetup(
        device=run.device,
        amp=run.amp,
        steps=run.steps_per_epoch,
        eval_split=run.eval_split,
        n_val=_size(run.bundle.val),
        runtime=run.runtime,
        world=run.dist.world_size,
    )
    return report.run_header(run.recipe, run.model, run.bundle, setup)
