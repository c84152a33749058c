"""`sdtool pipeline`: the paper's composition, train -> prune -> fine-tune -> early exit, from one recipe.

    OUT/train/            sdtool train with the recipe (self-distillation by default)
    OUT/pruned.safetensors  sdtool prune of train's best (or last) checkpoint, per the `prune` section
    OUT/finetune/         sdtool train --init pruned.safetensors for prune.finetune_epochs epochs
    OUT/final.safetensors   with eval.early_exit: the fine-tuned model plus thresholds fitted on the
                          validation split (sdtool eval --early-exit --fit-thresholds)
    OUT/pipeline.json     the summary printed by the command

Each step is the same library call its command makes, so every checkpoint carries the full lineage
(train -> prune -> train [-> thresholds]) with parent hashes. Options are checked before training
starts, so a bad prune section fails in a second, not after the training run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from sdtool import checkpoint, report
from sdtool.errors import SdtoolError
from sdtool.outputs import check_dir
from sdtool.recipe import Recipe, apply_overrides, from_dict

if TYPE_CHECKING:
    from sdtool.prune import PruneOptions


def _costs(path: Path) -> dict:
    from sdtool.profile import exit_costs

    ckpt = checkpoint.load_checkpoint(path)
    model, size = ckpt.model, ckpt.meta.input_size
    return exit_costs(model, (size, size))["full"]


def _step(name: str, path: Path | None, top1: float | None, note: str = "", costs: dict | None = None) -> dict:
    costs = costs or (_costs(path) if path else {})
    return {
        "step": name,
        "checkpoint": str(path) if path else None,
        "params": costs.get("params"),
        "macs": costs.get("macs"),
        "top1": top1,
        "note": note,
    }


def _deepest(rep: dict | None) -> float | None:
    return rep["exits"][-1]["top1"] if rep and rep.get("exits") else None


def run_pipeline(recipe: Recipe, out: str | Path, recipe_path: str | None = None, quiet: bool = False) -> dict:
    """Run the steps the recipe asks for under `out`; returns the summary (also OUT/pipeline.json).

    Accuracies are deepest-exit top-1 on the test split (reported, never used to select anything).
    """
    out = Path(out)
    opts = _checked_options(recipe, out)
    log = report.make_logger(quiet)
    log("pipeline: train")
    ckpt, step = _train(recipe, out, quiet)
    steps = [step]
    if opts is not None:
        log("pipeline: prune")
        ckpt, step, costs = _prune(recipe, opts, ckpt, out)
        steps.append(step)
        if recipe.prune.finetune_epochs > 0:
            log("pipeline: fine-tune the pruned model")
            ckpt, step = _finetune(recipe, ckpt, costs, out, quiet)
            steps.append(step)
    if recipe.eval.early_exit:
        log("pipeline: fit early-exit thresholds")
        ckpt, step = _early_exit(recipe, ckpt, out, quiet)
        steps.append(step)
    rep = {"recipe": recipe_path, "out": str(out), "final": str(ckpt), "steps": steps}
    checkpoint.atomic_write_bytes(out / "pipeline.json", (json.dumps(rep, indent=2) + "\n").encode())
    return rep


def _checked_options(recipe: Recipe, out: Path) -> PruneOptions | None:
    """Every option the later steps use, checked before training starts; returns the prune options
    (None when the recipe does not prune)."""
    from sdtool.distributed import from_env
    from sdtool.prune import PruneOptions

    if from_env().enabled:
        raise SdtoolError(
            "sdtool pipeline runs in one process; for several GPUs run its steps as commands "
            "(torchrun ... sdtool train, then sdtool prune, sdtool train --init ...)"
        )
    p, ev = recipe.prune, recipe.eval
    opts = PruneOptions.from_recipe(p) if p.enabled else None
    if opts is not None:
        opts.check()
        if p.finetune_epochs < 0:
            raise SdtoolError(f"prune.finetune_epochs must be >= 0, got {p.finetune_epochs}")
    if ev.early_exit:
        if recipe.sd.mode == "plain":
            raise SdtoolError("eval.early_exit needs several exits but sd.mode is plain; use self_distill")
        if not recipe.data.val_size:
            raise SdtoolError(
                "eval.early_exit fits thresholds on a validation split, never on test; set data.val_size (e.g. 0.1)"
            )
    if (out / "pipeline.json").exists():
        raise SdtoolError(f"{out} already holds a pipeline run; choose a new --out folder")
    # Before training (sdtool.outputs): a folder that can be created and written. Its size is not known
    # yet (the model is built once the data set is loaded); each step's own write checks its file.
    check_dir(out, "--out")
    return opts


def _train(recipe: Recipe, out: Path, quiet: bool) -> tuple[Path, dict]:
    """Train with the recipe into OUT/train: (its best, else last, checkpoint, the step row)."""
    from sdtool.engine import fit

    res = fit(recipe, out / "train", quiet=quiet)
    ckpt = res.best or res.last
    return ckpt, _step("train", ckpt, _deepest(res.test))


def _prune(recipe: Recipe, opts: PruneOptions, ckpt: Path, out: Path) -> tuple[Path, dict, dict]:
    """Prune `ckpt` into OUT/pruned.safetensors: (that path, the step row, the pruned net's full costs)."""
    from sdtool.prune import prune_checkpoint

    pruned = out / "pruned.safetensors"
    pr = prune_checkpoint(ckpt, pruned, opts, evaluate=True, device=recipe.train.device)
    costs = pr["after"]["full"]
    note = f"{opts.criterion}: {pr['macs_fraction']:.2f} MACs, {pr['params_fraction']:.2f} params"
    return pruned, _step("prune", pruned, _deepest(pr["accuracy"]["after"]), note, costs), costs


def _finetune(recipe: Recipe, pruned: Path, costs: dict, out: Path, quiet: bool) -> tuple[Path, dict]:
    """Train the pruned model for prune.finetune_epochs into OUT/finetune: (its best, else last,
    checkpoint, the step row). Fine-tuning keeps the shapes, so `costs` are the pruned net's."""
    from sdtool.engine import fit

    epochs = recipe.prune.finetune_epochs
    # The pruned checkpoint brings the weights: model.pretrained applied to the first training only.
    ft = from_dict(apply_overrides(recipe.to_dict(), [f"train.epochs={epochs}", "model.pretrained=null"]))
    res = fit(ft, out / "finetune", init=str(pruned), quiet=quiet)
    ckpt = res.best or res.last
    return ckpt, _step("fine-tune", ckpt, _deepest(res.test), f"{ft.sd.mode}, {epochs} ep.", costs)


def _early_exit(recipe: Recipe, ckpt: Path, out: Path, quiet: bool) -> tuple[Path, dict]:
    """Fit early-exit thresholds on the validation split per the eval section into OUT/final.safetensors:
    (that path, the step row)."""
    from sdtool.exit_eval import FitOptions, RunOptions, eval_early_exit

    ev = recipe.eval
    final = out / "final.safetensors"
    ee = eval_early_exit(
        str(ckpt),
        RunOptions(latency_images=0),
        FitOptions(
            fit=True,
            max_drop=ev.max_drop if ev.budget is None else None,
            budget=ev.budget,
            policy=ev.policy,
            fallback=ev.fallback,
        ),
        out=str(final),
        quiet=quiet,
    )
    note = f"{ee['macs_speedup']:.2f}x fewer MACs vs deepest"
    return final, _step("early exit", final, ee["top1"], note, _costs(final))
