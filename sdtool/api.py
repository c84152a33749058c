"""The Python API: each function runs what one CLI command runs and returns a typed result.

    import sdtool
    run = sdtool.train("recipes/quickstart.yaml", out="runs/qs", overrides={"train.epochs": 2})
    pruned = sdtool.prune(run.checkpoint, "runs/qs/pruned.safetensors", target_macs=0.5)
    ee = sdtool.early_exit(run.checkpoint, max_drop=1.0, out="runs/qs/ee.safetensors")
    print(run.test.top1, pruned.macs_fraction, ee.macs_speedup)

Each function is a thin wrapper over the library function its command calls (sdtool.engine.fit,
sdtool.evaluate.eval_checkpoint, sdtool.prune.prune_checkpoint, sdtool.exit_eval.eval_early_exit, ...):
it turns Python arguments into that function's options and its report into a result of
sdtool.api_results. Keyword names are the CLI options' (`--batch-size` -> batch_size); the less common ones
are taken as keywords too (`**options`, typed for checkers) and forwarded to the options dataclass that
holds them. Nothing is printed unless `quiet=False`; user errors raise `SdtoolError` (their messages name
options the CLI way: `--max-drop` is max_drop). No torch is imported until a function runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

from sdtool.api_results import EarlyExitResult, EvalResult, ExportResult, ProfileResult, PruneResult, TrainResult
from sdtool.choices import SPLITS
from sdtool.errors import SdtoolError
from sdtool.prune_options import PruneOptions

if TYPE_CHECKING:
    from typing import TypeAlias

    from typing_extensions import Unpack

    from sdtool.checkpoint import Checkpoint
    from sdtool.recipe import Recipe

    PathLike: TypeAlias = "str | os.PathLike[str]"
    Overrides: TypeAlias = "str | Sequence[str] | Mapping[str, Any] | None"

__all__ = ["distill", "early_exit", "evaluate", "export", "load", "profile", "prune", "train"]

_PRUNE = PruneOptions()  # the defaults, stated once in sdtool.prune_options


class PruneKeywords(TypedDict, total=False):
    """`prune`'s other keywords: PruneOptions fields (see `sdtool prune --help`) and the data options."""

    global_pruning: bool
    iterative_steps: int
    round_to: int | None
    protect_exits: bool
    taylor_batches: int
    seed: int
    overrides: Overrides
    allow_other_data: bool
    quiet: bool


class EarlyExitKeywords(TypedDict, total=False):
    """`early_exit`'s other keywords: FitOptions and RunOptions fields (sdtool.exit_eval)."""

    policy: str | None
    fallback: str | None
    cost: str
    sweep_out: PathLike | None
    overrides: Overrides
    batch_size: int | None
    latency_images: int
    repeats: int
    engine: str
    threads: int | None
    allow_other_data: bool
    quiet: bool


class ProfileKeywords(TypedDict, total=False):
    """`profile`'s other keywords: ProfileOptions fields."""

    warmup: int
    repeats: int
    quiet: bool


def _path(value: Any, name: str) -> str:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    raise SdtoolError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")


def _opt_path(value: Any, name: str) -> str | None:
    return None if value is None else _path(value, name)


def _overrides(value: Any) -> list[str]:
    """`--set` values from a list of "key=value" strings, one such string, or a mapping {key: value}."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        # JSON is YAML, which the recipe parses each value as: {"train.lr": 0.1} means train.lr=0.1.
        return [f"{k}={json.dumps(v)}" for k, v in value.items()]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise SdtoolError(
        'overrides must be a mapping such as {"train.epochs": 2} or a list such as ["train.epochs=2"], '
        f"got {type(value).__name__}"
    )


def _recipe(recipe: Any, overrides: Overrides) -> Recipe:
    """A checked Recipe from a YAML path, a dict or a Recipe (copied: the caller's is never changed)."""
    from sdtool.recipe import Recipe, apply_overrides, from_dict, load_recipe

    sets = _overrides(overrides)
    if isinstance(recipe, Recipe):
        return from_dict(apply_overrides(recipe.to_dict(), sets))
    if isinstance(recipe, Mapping):
        return from_dict(apply_overrides(copy.deepcopy(dict(recipe)), sets))
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(os.fspath(recipe), sets)
    raise SdtoolError(f"recipe must be a YAML path, a dict or a sdtool Recipe, got {type(recipe).__name__}")


def _split_options(fn: str, options: Mapping[str, Any], own: set[str], *targets: type) -> list[dict[str, Any]]:
    """`options` divided among the dataclasses `targets` by field name, then the function's `own` keywords
    (the last dict); any other keyword is a TypeError, as for any Python function."""
    parts: list[dict[str, Any]] = [{} for _ in range(len(targets) + 1)]
    for key, value in options.items():
        i = next((i for i, t in enumerate(targets) if key in {f.name for f in dataclasses.fields(t)}), None)
        if i is None and key not in own:
            raise TypeError(f"{fn}() got an unexpected keyword argument {key!r}")
        parts[len(targets) if i is None else i][key] = value
    return parts


@contextlib.contextmanager
def _quiet(quiet: bool) -> Iterator[None]:
    """`quiet`: no progress bars either during the call (the library shows them on a terminal whatever
    its log setting); the process's own setting is restored afterwards."""
    from sdtool import progress

    if not quiet:
        yield
        return
    with progress.disabled():
        yield


def load(path: PathLike, device: str = "cpu") -> Checkpoint:
    """The checkpoint at `path`: `Checkpoint(model, meta, path, sha256)`, the model rebuilt from the file
    alone (pruned shapes included), on `device` (auto, cpu, cuda, cuda:N, mps) and in eval mode."""
    from sdtool.checkpoint import load_checkpoint
    from sdtool.device import resolve_device

    return load_checkpoint(_path(path, "path"), resolve_device(device))


def _run_args(fn: str, recipe: Any, out: Any, overrides: Overrides, init: Any, resume: Any) -> tuple:
    """(recipe, out, init, resume) for fit: a new run from a recipe, or `resume` alone, as the CLI."""
    if resume is not None:
        if recipe is not None or overrides or init is not None:
            raise SdtoolError(
                f"{fn}(resume=...) continues a run exactly as it was set up; drop recipe, overrides and init "
                "(to change the run, start a new one with init=RUN_DIR/last.safetensors)"
            )
        return None, None, None, _path(resume, "resume")
    if recipe is None:
        raise SdtoolError(f"{fn}() needs a recipe (a YAML path, dict or Recipe), or resume=RUN_DIR")
    if out is None:
        raise SdtoolError(f"{fn}() needs out=, the run folder for its checkpoints and metrics")
    return _recipe(recipe, overrides), _path(out, "out"), _opt_path(init, "init"), None


def train(
    recipe: PathLike | Mapping[str, Any] | Recipe | None = None,
    out: PathLike | None = None,
    *,
    overrides: Overrides = None,
    init: PathLike | None = None,
    resume: PathLike | None = None,
    quiet: bool = True,
) -> TrainResult:
    """`sdtool train`: train per `recipe` (YAML path, dict or Recipe; `overrides` as `--set`) into run
    folder `out`, from `init`'s structure and weights if given; or continue the run folder `resume`."""
    from sdtool.engine import fit

    r, out_s, init_s, resume_s = _run_args("train", recipe, out, overrides, init, resume)
    with _quiet(quiet):
        result = fit(r, out_s, init=init_s, resume=resume_s, quiet=quiet)
    return TrainResult.from_json(result.to_json(), r.data.name if r else None)


def distill(
    recipe: PathLike | Mapping[str, Any] | Recipe | None = None,
    out: PathLike | None = None,
    *,
    teacher: str | PathLike | None = None,
    teacher_weights: PathLike | None = None,
    overrides: Overrides = None,
    init: PathLike | None = None,
    resume: PathLike | None = None,
    quiet: bool = True,
) -> TrainResult:
    """`sdtool distill`: `train` plus knowledge distillation from a frozen `teacher` (an sdtool checkpoint
    or torchvision:NAME with `teacher_weights`; default: the recipe's distill.teacher)."""
    from sdtool.distill import distill as run_distill

    if resume is not None and (teacher is not None or teacher_weights is not None):
        raise SdtoolError("distill(resume=...) rebuilds the teacher the run recorded; drop teacher and teacher_weights")
    r, out_s, init_s, resume_s = _run_args("distill", recipe, out, overrides, init, resume)
    with _quiet(quiet):
        result = run_distill(
            r,
            out_s or "",
            teacher=_opt_path(teacher, "teacher"),
            teacher_weights=_opt_path(teacher_weights, "teacher_weights"),
            init=init_s,
            quiet=quiet,
            resume=resume_s,
        )
    return TrainResult.from_json(result.to_json(), r.data.name if r else None)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise SdtoolError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def evaluate(
    ckpt: PathLike,
    *,
    data: str | PathLike | None = None,
    overrides: Overrides = None,
    split: str = "test",
    device: str = "auto",
    batch_size: int | None = None,
    allow_other_data: bool = False,
    quiet: bool = True,
) -> EvalResult:
    """`sdtool eval`: per-exit and ensemble accuracy of `ckpt` on `split` of its data set (or of `data`:
    a recipe file or a data-set name; `overrides`: data.* keys)."""
    from sdtool.evaluate import eval_checkpoint

    _check_split(split)
    args = (_path(ckpt, "ckpt"), _opt_path(data, "data"), _overrides(overrides) or None, split, device, batch_size)
    with _quiet(quiet):
        rep = eval_checkpoint(*args, allow_other_data=allow_other_data)
    return EvalResult.from_json(rep)


def prune(
    ckpt: PathLike,
    out: PathLike,
    *,
    ratio: float | None = None,
    target_macs: float | None = None,
    criterion: str = _PRUNE.criterion,
    evaluate: bool = False,
    data: str | PathLike | None = None,
    device: str = "auto",
    **options: Unpack[PruneKeywords],
) -> PruneResult:
    """`sdtool prune`: remove channels from every exit at once and write the smaller checkpoint to `out`.

    Exactly one of `ratio` (fraction of channels to remove) or `target_macs` (fraction of the full
    multi-exit MACs to keep). `evaluate`: test accuracy per exit before and after (on `device`). Other
    keywords: global_pruning, iterative_steps, round_to, protect_exits, taylor_batches, seed
    (PruneOptions), overrides (data.* keys), allow_other_data, quiet."""
    from sdtool.prune import prune_checkpoint

    settings, rest = _split_options("prune", options, {"overrides", "allow_other_data", "quiet"}, PruneOptions)
    opts = PruneOptions(criterion=criterion, ratio=ratio, target_macs=target_macs, **settings)
    args = (_path(ckpt, "ckpt"), _path(out, "out"), opts, evaluate, _opt_path(data, "data"))
    with _quiet(rest.get("quiet", True)):
        rep = prune_checkpoint(
            *args,
            _overrides(rest.get("overrides")) or None,
            device,
            allow_other_data=bool(rest.get("allow_other_data", False)),
        )
    return PruneResult.from_json(rep)


def early_exit(
    ckpt: PathLike,
    *,
    fit: bool = True,
    max_drop: float | None = None,
    budget: float | None = None,
    out: PathLike | None = None,
    data: str | PathLike | None = None,
    split: str = "test",
    device: str = "auto",
    **options: Unpack[EarlyExitKeywords],
) -> EarlyExitResult:
    """`sdtool eval --early-exit`: real early exit on `split`, timed against the deepest exit alone.

    fit: fit thresholds on the validation split first (max_drop points below the deepest exit, default
    0.5, or within `budget` x the reference cost), else run the checkpoint's stored ones; out: write the
    checkpoint with the fitted thresholds there. Other keywords: policy, fallback, cost, sweep_out
    (FitOptions), overrides, batch_size, latency_images, repeats, engine, threads, allow_other_data
    (RunOptions), quiet."""
    from sdtool.exit_eval import FitOptions, RunOptions, eval_early_exit

    _check_split(split)
    fit_kw, run_kw, rest = _split_options("early_exit", options, {"quiet"}, FitOptions, RunOptions)
    if "sweep_out" in fit_kw:
        fit_kw["sweep_out"] = _opt_path(fit_kw["sweep_out"], "sweep_out")
    if "overrides" in run_kw:
        run_kw["overrides"] = _overrides(run_kw["overrides"]) or None
    fit_opts = FitOptions(fit=fit, max_drop=max_drop, budget=budget, **fit_kw)
    run = RunOptions(data=_opt_path(data, "data"), split=split, device=device, **run_kw)
    quiet = rest.get("quiet", True)
    with _quiet(quiet):
        rep = eval_early_exit(_path(ckpt, "ckpt"), run, fit_opts, out=_opt_path(out, "out"), quiet=quiet)
    return EarlyExitResult.from_json(rep)


def profile(
    target: PathLike,
    *,
    input_size: tuple[int, int] | None = None,
    batch_size: int = 32,
    device: str = "auto",
    latency: bool = True,
    engine: str = "torch",
    threads: int | None = None,
    overrides: Overrides = None,
    **options: Unpack[ProfileKeywords],
) -> ProfileResult:
    """`sdtool profile`: parameters and MACs per exit of a checkpoint, or of the model a recipe (.yaml)
    builds (`overrides` as `--set`), and latency at batch 1 and `batch_size` unless `latency=False`.
    Other keywords: warmup, repeats, quiet."""
    from sdtool.profile import ProfileOptions
    from sdtool.profile import profile as run_profile

    (kw,) = _split_options("profile", options, {"warmup", "repeats", "quiet"})
    quiet = kw.pop("quiet", True)
    opts = ProfileOptions(
        input_size=input_size,
        batch=batch_size,
        device=device,
        latency=latency,
        threads=threads,
        overrides=_overrides(overrides) or None,
        engine=engine,
        **kw,  # warmup, repeats: ProfileOptions' defaults unless given
    )
    with _quiet(quiet):
        return ProfileResult.from_json(run_profile(_path(target, "target"), opts))


def export(
    ckpt: PathLike,
    out: PathLike,
    *,
    format: str = "safetensors",  # noqa: A002 - the CLI's --format
    exit: int | None = None,  # noqa: A002 - the CLI's --exit
    check: bool = True,
) -> ExportResult:
    """`sdtool export`: the multi-exit net, or exit `exit` (1-based) alone as a compact standalone model,
    as an sdtool checkpoint (safetensors), torch.export program (pt2) or ONNX file; `check` runs the
    written file and compares it with PyTorch."""
    from sdtool.export import export as run_export

    return ExportResult.from_json(run_export(_path(ckpt, "ckpt"), _path(out, "out"), format, exit, check))
