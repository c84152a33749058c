"""`sdtool export --early-exit` and `sdtool predict`: a deployable early-exit bundle and its use.

A bundle is a folder (see sdtool/runtime.py for how it runs):

    manifest.json        format, policy and thresholds, fallback, ensemble kind, input spec, class
                         names, per-exit MACs and measured latency, the thread settings they were
                         measured with, the source checkpoint's sha256 and lineage, a sha256 per graph
    step1.onnx ...       one graph per exit step (stages + head fused; stages only where an exit never
                         answers), dynamic batch axis, every weight inside the graph
    sdtool_runtime.py    a copy of sdtool/runtime.py: numpy + onnxruntime are all a server needs

The folder is written under a temporary name beside `--out` and renamed when complete, so a crash or
an error never leaves a half-written bundle under the final name; an existing non-empty `--out` is
refused. Before the rename, the bundle is loaded with the runtime and its logits are compared with
PyTorch's, exit by exit, on random inputs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from sdtool import __version__, checkpoint, runtime
from sdtool.early_exit import early_exit_forward, leave_costs
from sdtool.errors import SdtoolError
from sdtool.exit_fit import ExitContext, FitOptions, PolicyChoice, choose_policy, stored_fit, written_with_sweep
from sdtool.exit_policy import ExitPolicy, confidence
from sdtool.outputs import fsync_files, staging_folder

if TYPE_CHECKING:
    from sdtool.checkpoint import Checkpoint
    from sdtool.engines import OrtEngine
    from sdtool.meta import InputSpec
    from sdtool.models.multi_exit import MultiExitNet


def _check_out(out: Path, src: Path, sweep_out: str | None) -> None:
    """Both outputs, before any work (sdtool.outputs): the bundle folder (new or empty, room for about
    the checkpoint's size: the steps hold its tensors once) and the fit's --sweep-out folder."""
    from sdtool.exit_eval import check_outputs
    from sdtool.outputs import check_dir, source_size

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SdtoolError(f"--out {out} already exists and is not an empty folder; choose a new folder for the bundle")
    if out.resolve() == src.resolve():
        raise SdtoolError(f"--out {out} is the checkpoint being exported; choose a new folder")
    if sweep_out and Path(sweep_out).resolve() == out.resolve():
        raise SdtoolError(f"--sweep-out {sweep_out} is also --out; give the sweep a folder of its own")
    check_dir(out, "--out", empty=True, need_bytes=source_size(src))
    check_outputs(str(src), None, sweep_out)


@dataclass
class BundleOptions:
    """How `export --early-exit` runs, besides how its thresholds are chosen (FitOptions).

    data, overrides, batch_size: a threshold fit's data (as for `sdtool eval`; default: the
    checkpoint's) and the batch size of its validation pass and of `--cost latency`'s timing (default:
    the recipe's eval_batch_size); threads: ONNX Runtime's CPU threads (default: the cores this process
    may use); latency_batch: the batch size at which each step's latency is measured for the manifest
    (batch 1 is always measured too); repeats: timed runs per figure (0 = do not measure);
    allow_other_data: fit on a data set other than the one the checkpoint was trained on (else refused).
    """

    data: str | None = None
    overrides: list[str] | None = None
    batch_size: int | None = None
    threads: int | None = None
    latency_batch: int = 64
    repeats: int = 5
    allow_other_data: bool = False

    def check(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise SdtoolError(f"--threads must be at least 1, got {self.threads}")
        if self.latency_batch < 1 or self.repeats < 0:
            raise SdtoolError(f"--latency-batch must be at least 1, got {self.latency_batch}")


def export_bundle(
    path: str,
    out: str,
    opts: FitOptions | None = None,
    run: BundleOptions | None = None,
    quiet: bool = False,
    progress: bool = True,
) -> dict:
    """Write the early-exit bundle of checkpoint `path` to folder `out` (see the module doc).

    opts: how thresholds are chosen; without `opts.fit` the checkpoint's stored thresholds are used.
    run: the fit's data, threads and the latency measured for the manifest (default BundleOptions()).
    quiet: no log lines; progress: progress bars on stderr (only on a terminal; not silenced by `quiet`).
    """
    from sdtool import report
    from sdtool.engines import OrtEngine, bundle_layout
    from sdtool.onnx_graphs import model_pieces, require_onnx
    from sdtool.profile import exit_costs

    require_onnx()
    log = report.make_logger(quiet)
    started = checkpoint.now()
    opts = opts or FitOptions()
    opts.check()
    run = run or BundleOptions()
    run.check()
    outp = Path(out)
    _check_out(outp, Path(path), opts.sweep_out)
    ckpt, spec_in = _deployable(path, opts)
    model, meta = ckpt.model, ckpt.meta
    size = meta.input_size
    costs = exit_costs(model, (size, size))
    log(f"exporting {path} to ONNX and cutting it into exit steps")
    pieces = model_pieces(model, size, identity={"source_sha256": ckpt.sha256})
    engine = OrtEngine(model, size, threads=run.threads, pieces=pieces, ensemble=meta.ensemble)
    if model.num_exits > 1:
        ctx = _fit_context(ckpt, run, costs, engine, log, progress) if opts.fit else None
        choice = choose_policy(path, ckpt, opts, ctx)
    elif opts.fit:  # `export --exit K` output: one step, nothing to decide
        raise SdtoolError(f"{path} has a single exit; there are no thresholds to fit")
    else:
        choice = PolicyChoice(ExitPolicy("max_softmax", [], "deepest", meta.ensemble))
    manifest, graphs = bundle_layout(pieces, choice.policy, spec_in, model.num_classes, ckpt.sha256, meta.class_names)
    timing = _step_times(engine, size, run, log, progress)
    _add_step_costs(manifest, costs, choice.policy, timing)
    manifest.update(_provenance(path, ckpt, costs, timing, engine.settings, choice.fit))
    check = written_with_sweep(choice, lambda: _write(outp, manifest, graphs, model, size, run.threads))
    return {
        "checkpoint": str(path),
        "out": str(outp),
        "format": "onnx early-exit bundle",
        "exits": model.num_exits,
        "policy": manifest["policy"],
        "files": sorted([*graphs, runtime.MANIFEST, runtime.RUNTIME_FILE]),
        "bundle_size": sum(f.stat().st_size for f in outp.iterdir()),
        "check": check,
        "fit": choice.fit,
        "sweep": choice.sweep,
        "warnings": choice.warnings,
        "timing": timing,
        "started": started,
    }


def _deployable(path: str, opts: FitOptions) -> tuple[Checkpoint, InputSpec]:
    """The checkpoint and its input spec, refused before the slow export when a bundle cannot be made."""
    ckpt = checkpoint.load_checkpoint(path)
    spec_in = ckpt.meta.input
    if spec_in is None or not spec_in.mean or not spec_in.std:
        raise SdtoolError(f"{path} records no input normalisation (mean, std); it cannot be deployed without it")
    if ckpt.model.num_exits > 1 and not opts.fit and ckpt.meta.thresholds is None:
        raise SdtoolError(
            f"{path} has no fitted thresholds; add --fit-thresholds (and --max-drop D or --budget F), "
            f"or fit them first with sdtool eval {path} --early-exit --fit-thresholds --out NEW"
        )
    return ckpt, spec_in


def _step_times(
    engine: OrtEngine, size: int, run: BundleOptions, log: Callable[[str], None], progress: bool
) -> dict | None:
    """Each step's measured latency at batch 1 and `run.latency_batch` (None with `run.repeats` 0)."""
    if run.repeats <= 0:
        return None
    log(f"timing each step in ONNX Runtime (batch 1 and {run.latency_batch})")
    batches = sorted({1, run.latency_batch})
    return {str(b): engine.piece_times(size, b, warmup=2, repeats=run.repeats, progress=progress) for b in batches}


def _fit_context(
    ckpt: Checkpoint, run: BundleOptions, costs: dict, engine: OrtEngine, log: Callable[[str], None], progress: bool
) -> ExitContext:
    """A threshold fit on the validation split, on the CPU, timed (`--cost latency`) in the bundle's engine."""
    from sdtool.checkpoint_data import checkpoint_data

    cfg, bundle = checkpoint_data(ckpt, run.data, run.overrides, "val", allow_other_data=run.allow_other_data)
    bs = run.batch_size or cfg.eval_batch_size
    return ExitContext(cfg, bundle, torch.device("cpu"), bs, costs, engine, log, progress)


def _add_step_costs(manifest: dict, costs: dict, pol: ExitPolicy, timing: dict | None) -> None:
    """Each step's MACs (alone, stages, head, leaving there) and measured latency (median, and the
    fastest and slowest repeat as `stages_min`, `stages_max`, `head_min`, `head_max`), into the manifest."""
    leave = leave_costs(costs, pol.computed())
    for k, step in enumerate(manifest["steps"]):
        e = costs["exits"][k]
        step["macs"] = {"alone": e["macs"], "stages": e["stages_macs"], "head": e["head_macs"], "leave": leave[k]}
        if timing:
            step["latency_ms_per_image"] = {
                b: {f"{part}{s}": t[f"{part}_ms{s}"][k] for part in ("stages", "head") for s in ("", "_min", "_max")}
                for b, t in timing.items()
            }


def _provenance(
    path: str, ckpt: Checkpoint, costs: dict, timing: dict | None, settings: dict, fit_rep: dict | None
) -> dict:
    """The manifest's record of what was exported, by which sdtool, from which checkpoint, measured how."""
    meta = ckpt.meta
    return {
        "sdtool_version": __version__,
        "created": checkpoint.now(),
        "model": ckpt.model.spec,
        "reference_macs": costs["reference"]["macs"],
        **{
            f"deepest_latency_ms_per_image{s}": {b: t[f"deepest_ms{s}"] for b, t in timing.items()} if timing else None
            for s in ("", "_min", "_max")
        },
        "runtime_settings": settings,
        "source": {
            "path": str(path),
            "sha256": ckpt.sha256,
            "lineage": [e.to_json() for e in meta.lineage],
            "thresholds_fitted_on": stored_fit(fit_rep) or (meta.thresholds.fitted_on if meta.thresholds else None),
        },
        "runtime": runtime.RUNTIME_FILE,
    }


def _write(
    out: Path, manifest: dict, graphs: dict[str, bytes], model: MultiExitNet, size: int, threads: int | None
) -> dict:
    """Write the folder under a temporary name, check it with the runtime, then rename it into place."""
    with staging_folder(out) as tmp:
        for name, data in graphs.items():
            (tmp / name).write_bytes(data)
        shutil.copyfile(Path(runtime.__file__), tmp / runtime.RUNTIME_FILE)
        (tmp / runtime.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        fsync_files(tmp)
        check = check_bundle(tmp, model, size, threads)
        if out.exists():
            out.rmdir()  # empty (checked before any work)
        os.replace(tmp, out)
    return check


TOLERANCE = 1e-3  # of the logits' scale: float32 graphs against eager PyTorch differ by ~1e-5 of it


@torch.no_grad()
def check_bundle(folder: Path, model: MultiExitNet, size: int, threads: int | None = None) -> dict:
    """Load the bundle with the runtime and compare it with PyTorch on random inputs: every shipped
    exit's logits, and early exit's choices (a different choice is allowed only where a confidence
    lies within 1e-4 of its threshold). A bundle that does not reproduce the model is refused."""
    sess = runtime.EarlyExitSession(folder, threads=threads)
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    ref, _ = model(x)
    got = sess.run_exits(x.numpy())
    scale = max(1.0, max(float(r.abs().max()) for r in ref))
    diffs = [float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref, strict=True) if g is not None]
    worst = max(diffs)
    pol = ExitPolicy(sess.policy, sess.values, sess.fallback, sess.ensemble_kind)
    _, e_ref = early_exit_forward(model, x, pol)
    _, e_got = sess.predict(x.numpy())
    thr = pol.score_thresholds()
    bad = [
        i
        for i in range(len(x))
        if int(e_ref[i]) != int(e_got[i])
        and not any(abs(float(confidence(ref[k][i : i + 1], pol.policy)[0]) - thr[k]) < 1e-4 for k in range(len(thr)))
    ]
    if worst > TOLERANCE * scale or bad:
        what = (
            f"max |logit diff| {worst:.2e}"
            if worst > TOLERANCE * scale
            else f"exit choices differ on {len(bad)} inputs"
        )
        raise SdtoolError(
            f"the exported graphs do not reproduce the PyTorch model ({what}); nothing was written. "
            "Please report it with the model"
        )
    return {
        "runtime": f"onnxruntime {sess.settings['onnxruntime']}",
        "inputs": x.shape[0],
        "max_abs_diff": worst,
        "exits_compared": len(diffs),
        "tolerance": TOLERANCE * scale,
        "same_exit_choices": True,
    }


# --------------------------------------------------------------------------------------------------
# sdtool predict


def predict(target: str, inputs: list[str], threads: int | None = None, resize: bool = False, top: int = 1) -> dict:
    """`sdtool predict`: classify image files (or an npz of uint8 images) with a bundle or a checkpoint.

    A bundle runs on ONNX Runtime; a checkpoint runs real early exit in PyTorch with its stored
    thresholds (or its deepest exit when it has none).
    """
    if top < 1:
        raise SdtoolError(f"--top must be at least 1, got {top}")
    if threads is not None and threads < 1:
        raise SdtoolError(f"--threads must be at least 1, got {threads}")
    p = Path(target)
    if p.is_dir():
        sess = runtime.EarlyExitSession(p, threads=threads)
        images = runtime.load_images(_paths(inputs), sess.size, sess.channels, resize)
        rows = sess.classify(images, top=top)
        engine, names = sess.settings, sess.class_names
    else:
        rows, engine, names = _predict_checkpoint(p, inputs, threads, resize, top)
    for r, f in zip(rows, _sources(inputs), strict=True):
        r["file"] = f
    return {
        "target": str(target),
        "engine": engine,
        "images": len(rows),
        "predictions": rows,
        "classes": len(names) if names else None,
    }


def _paths(inputs: list[str]) -> list[str | os.PathLike]:
    """The inputs as runtime.load_images takes them (a list of either kind of path; list is invariant)."""
    return list(inputs)


def _sources(inputs: list[str]) -> list[str]:
    """One label per image: the file name, or `file.npz[i]` for each image of an npz file."""
    out = []
    for f in inputs:
        if f.lower().endswith(".npz"):
            with np.load(f, allow_pickle=False) as d:
                out += [f"{f}[{i}]" for i in range(len(d["x"]))]
        else:
            out.append(f)
    return out


@torch.no_grad()
def _predict_checkpoint(path: Path, inputs: list[str], threads: int | None, resize: bool, top: int):
    if threads:
        torch.set_num_threads(threads)
    ckpt = checkpoint.load_checkpoint(path)
    model, meta = ckpt.model, ckpt.meta
    spec = meta.input
    if spec is None or not spec.mean or not spec.std:
        raise SdtoolError(f"{path} records no input normalisation (mean, std); it cannot classify raw images")
    images = runtime.load_images(_paths(inputs), spec.size, spec.channels, resize)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    k_all = model.num_exits
    if meta.thresholds is not None and k_all > 1:
        z, e = early_exit_forward(model, x, ExitPolicy.stored(meta.thresholds, meta.ensemble))
    else:
        z, e = model.forward_until(x, k_all - 1), torch.full((len(x),), k_all - 1)
    p = torch.softmax(z.float(), dim=1)
    names = meta.class_names
    rows = []
    for i in range(len(x)):
        conf, idx = p[i].topk(min(top, p.shape[1]))
        c = int(idx[0])
        rows.append(
            {
                "class": c,
                "name": names[c] if names else str(c),
                "confidence": float(conf[0]),
                "exit": int(e[i]) + 1,
                "top": [{"class": int(j), "confidence": float(v)} for v, j in zip(conf, idx, strict=True)],
            }
        )
    engine = {
        "engine": "torch",
        "threads": torch.get_num_threads(),
        "early_exit": meta.thresholds is not None and k_all > 1,
    }
    return rows, engine, names
