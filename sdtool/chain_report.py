"""`sdtool report`: what a checkpoint's chain of steps did, collected from its lineage (nothing is printed here).

Lineage entry i (sdtool.meta.LineageEntry) made checkpoint i, whose path and sha256 entry i+1 records as its
parent; the last checkpoint is the file itself. Each step's figures come from the best source there is:

    costs      measured on the step's file (sdtool.profile.exit_costs) when it is on disk and unchanged;
               else recorded by a prune step (its `after`, or the next prune's `before`); else the parent's,
               for steps that keep the structure (fine-tune, thresholds, export; `export --exit K`: exit K)
    accuracy   re-measured on the test split with `evaluate`; else recorded by the step (training: its `val`
               or `test` report; prune: `after.test`); else the parent's, for steps that keep the weights
    latency    batch 1 on the CPU (median, min and max of `repeats` runs after `warmup`), on the step's file

A parent whose file is gone is "missing"; one whose sha256 differs from the recorded one is "changed since"
and is not measured (it is no longer the model the chain recorded). Paths are recorded as given on the
command line; a file not found there is looked for, by its sha256, under the checkpoint's folder and the
two above it, so a chain's folder can move.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sdtool import __version__
from sdtool.errors import SdtoolError
from sdtool.fileio import now, sha256
from sdtool.meta import CheckpointMeta, LineageEntry, Thresholds

REPORT_KIND = "sdtool chain report"  # report.json's "report": how a later report recognises its own folder
OK_STATUS = ("ok", "target")  # a file that is the one the chain recorded: measured


@dataclass
class ReportOptions:
    """What `collect` measures: latency (batch 1, CPU; `warmup` untimed runs, then `repeats` timed ones),
    and, with `evaluate`, per-exit test accuracy of every step on disk (`data`: another data set or recipe
    for it; `device`: where it runs)."""

    latency: bool = True
    warmup: int = 3
    repeats: int = 10
    evaluate: bool = False
    data: str | None = None
    device: str = "auto"
    allow_other_data: bool = False  # --evaluate on a data set other than the recorded one

    def check(self) -> None:
        if self.repeats < 1 or self.warmup < 0:
            raise SdtoolError("--repeats must be at least 1 and --warmup at least 0")
        if (self.data is not None or self.device != "auto" or self.allow_other_data) and not self.evaluate:
            raise SdtoolError(
                "--data, --device and --allow-other-data belong to --evaluate (latency is timed on the CPU); "
                "add --evaluate"
            )


def _find_moved(recorded: Path, digest: str | None, base: Path) -> Path | None:
    """A file with the recorded sha256 at the recorded path's tail under `base` or the two folders above
    it (the chain's folder moved, or the path was relative to another working folder)."""
    if digest is None:
        return None
    parts = recorded.parts[1:] if recorded.is_absolute() else recorded.parts
    for b in [base, *list(base.parents)[:2]]:
        for i in range(len(parts)):
            cand = b.joinpath(*parts[i:])
            if cand.is_file() and cand.resolve() != recorded.resolve() and sha256(cand) == digest:
                return cand
    return None


def locate(recorded: str | None, digest: str | None, base: Path) -> tuple[str, Path | None]:
    """(status, the file to read): ok, missing, changed since, not verified (no sha256 recorded) or not recorded."""
    if recorded is None:
        return "not recorded", None
    p = Path(recorded)
    if p.is_file():
        if digest is None:
            return "not verified", p
        return ("ok", p) if sha256(p) == digest else ("changed since", p)
    moved = _find_moved(p, digest, base)
    return ("ok", moved) if moved is not None else ("missing", None)


def _obj(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _label(e: LineageEntry) -> str:
    if e.command in ("train", "distill") and e.parent:
        return "fine-tune" if e.command == "train" else "distill (from --init)"
    if e.command.startswith("eval --early-exit"):
        return "thresholds"
    if e.command.startswith("export --exit"):
        return "export exit " + e.command.split()[-1]
    return e.command


def _exported_exit(e: LineageEntry) -> int | None:
    """`export --exit K`: K (the file's one exit is the parent's exit K)."""
    return _int(_obj(e.extra.get("exported")).get("exit"))


def _keeps_structure(e: LineageEntry) -> bool:
    return (bool(e.parent) and e.command in ("train", "distill")) or e.command.startswith(("eval", "export"))


def _parameters(e: LineageEntry) -> dict:
    """The settings that say what the step did (the full recipe stays in the checkpoint)."""
    r, x = e.recipe or {}, e.extra
    if e.command in ("train", "distill") and r:
        sd, t, d = r.get("sd") or {}, r.get("train") or {}, r.get("data") or {}
        p = {"model": (r.get("model") or {}).get("name"), "mode": sd.get("mode"), "data": d.get("name")}
        p |= {"epochs": t.get("epochs"), "optimizer": t.get("optimizer"), "lr": t.get("lr")}
        p["batch_size"] = d.get("batch_size")
        if sd.get("mode") == "self_distill":
            p |= {"alpha": sd.get("alpha"), "beta": sd.get("beta"), "T": sd.get("temperature")}
        p["init"] = e.parent
    elif e.command == "prune":
        o = _obj(x.get("options"))
        p = {k: o.get(k) for k in ("criterion", "ratio", "target_macs")}
        p |= {"global": o.get("global_pruning") or None, "ratio_used": x.get("ratio_used")}
    elif x.get("exported"):
        p = {k: _obj(x["exported"]).get(k) for k in ("exit", "of_exits", "format")}
    else:
        p = {}
    return {k: v for k, v in p.items() if v is not None}


def _pruning(e: LineageEntry) -> dict | None:
    if e.command != "prune":
        return None
    opts = _obj(e.extra.get("options"))
    kept = {k: _num(e.metrics.get(k)) for k in ("macs_fraction", "params_fraction")}
    return {**opts, "ratio_used": e.extra.get("ratio_used"), **kept}


def _distillation(e: LineageEntry, base: Path) -> dict | None:
    d = (e.recipe or {}).get("distill") or {}
    t = _obj(e.extra.get("teacher"))
    if e.command != "distill" and not t:
        return None
    source = t.get("source") or d.get("teacher")
    kind = t.get("kind")
    status = locate(source, t.get("sha256"), base)[0] if kind == "sdtool" and isinstance(source, str) else None
    keys = ("teacher_output", "alpha", "temperature", "targets", "feature", "feature_weight")
    out = {"teacher": source, "teacher_kind": kind, "teacher_model": t.get("model"), "teacher_status": status}
    return out | {"teacher_sha256": t.get("sha256")} | {k: d.get(k) for k in keys}


def _accuracy_of(rep: Any, split: str, source: str, exit_k: int | None = None) -> dict | None:
    """An accuracy report ({n, exits: [{exit, top1}], ensemble}) in the report's form (exit numbers of
    the parent for a single exported exit)."""
    if not isinstance(rep, dict) or not isinstance(rep.get("exits"), list):
        return None
    exits = {
        (exit_k or x["exit"]): _num(x.get("top1"))
        for x in rep["exits"]
        if isinstance(x, dict) and isinstance(x.get("exit"), int)
    }
    ens = _obj(rep.get("ensemble"))
    return {"split": split, "n": rep.get("n"), "source": source, "exits": exits, "ensemble_top1": _num(ens.get("top1"))}


def _recorded_accuracy(e: LineageEntry) -> dict | None:
    m = e.metrics
    if e.command == "prune":
        return _accuracy_of((m.get("after") or {}).get("test"), "test", "recorded")
    split = next((s for s in ("val", "test") if isinstance(m.get(s), dict)), None)
    return _accuracy_of(m.get(split), split, "recorded") if split else None


def _costs_of(brief: Any, source: str) -> dict | None:
    """A prune step's record of costs ({params, macs, exits: [{exit, params, macs}]})."""
    if not isinstance(brief, dict) or not isinstance(brief.get("exits"), list):
        return None
    exits = {
        x["exit"]: {"params": _int(x.get("params")), "macs": _int(x.get("macs"))}
        for x in brief["exits"]
        if isinstance(x, dict) and isinstance(x.get("exit"), int)
    }
    return {"params": _int(brief.get("params")), "macs": _int(brief.get("macs")), "exits": exits, "source": source}


def _new_step(i: int, e: LineageEntry, status: str, path: Path | None, recorded: str | None, base: Path) -> dict:
    found = str(path) if path is not None and str(path) != recorded else None
    step = {"step": i + 1, "label": _label(e), "command": e.command, "argv": e.extra.get("argv")}
    step |= {"checkpoint": recorded, "found_at": found, "status": status, "sdtool_version": e.sdtool_version}
    step |= {"started": e.started, "ended": e.ended, "parameters": _parameters(e), "pruning": _pruning(e)}
    step |= {"distillation": _distillation(e, base), "early_exit": None, "accuracy": _recorded_accuracy(e)}
    step["costs"] = _costs_of(e.metrics.get("after"), "recorded") if e.command == "prune" else None
    return step | {"latency": None, "_path": path, "_entry": e}


def chain_steps(meta: CheckpointMeta, target: Path) -> list[dict]:
    """One step per lineage entry, with where its checkpoint is and whether it is the recorded one."""
    lineage = meta.lineage or [LineageEntry(command="unknown (no lineage recorded)")]
    base = target.resolve().parent
    steps = []
    for i, e in enumerate(lineage):
        if i + 1 < len(lineage):
            child = lineage[i + 1]
            status, path = locate(child.parent, child.parent_sha256, base)
            steps.append(_new_step(i, e, status, path, child.parent, base))
        else:
            steps.append(_new_step(i, e, "target", target, str(target), base))
    return steps


def _inherit(steps: list[dict]) -> None:
    """Fill costs and accuracy a step did not measure or record from the steps around it."""
    for s, nxt in zip(steps, steps[1:], strict=False):
        if s["costs"] is None and nxt["command"] == "prune":
            s["costs"] = _costs_of(nxt["_entry"].metrics.get("before"), f"recorded by step {nxt['step']} (prune)")
    for prev, s in zip(steps, steps[1:], strict=False):
        e, k = s["_entry"], _exported_exit(s["_entry"])
        if s["costs"] is None and prev["costs"] is not None and _keeps_structure(e):
            pc, src = prev["costs"], f"as step {prev['step']}"
            if k is not None and k in pc["exits"]:
                one = pc["exits"][k]
                s["costs"] = {**one, "exits": {k: one}, "source": f"{src}'s exit {k}"}
            elif k is None:
                s["costs"] = {**pc, "source": f"{src} (same structure)"}
        if s["accuracy"] is None and prev["accuracy"] is not None and e.command.startswith(("eval", "export")):
            pa, src = prev["accuracy"], f"as step {prev['step']}"
            if k is not None and k in pa["exits"]:
                one = {"exits": {k: pa["exits"][k]}, "ensemble_top1": None, "source": f"{src}'s exit {k}"}
                s["accuracy"] = pa | one
            elif k is None:
                s["accuracy"] = {**pa, "source": f"{src} (same weights)"}


def _time_ms(fn: Callable[[], object], warmup: int, repeats: int) -> dict:
    """Median, min and max milliseconds of `fn()` over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def _measure(step: dict, opts: ReportOptions) -> CheckpointMeta:
    """Costs and (unless switched off) batch-1 CPU latency of the step's file, each exit alone and the
    full net; the file's metadata is returned for its thresholds."""
    import torch

    from sdtool.checkpoint import load_checkpoint
    from sdtool.profile import exit_costs

    ckpt = load_checkpoint(step["_path"])
    model, size = ckpt.model, ckpt.meta.input_size
    k_exp = _exported_exit(step["_entry"])

    def name(k: int) -> int:  # an exported exit keeps its number in the parent
        return k_exp if k_exp is not None and model.num_exits == 1 else k

    c = exit_costs(model, (size, size))
    exits = {name(x["exit"]): {"params": x["params"], "macs": x["macs"]} for x in c["exits"]}
    step["costs"] = {"params": c["full"]["params"], "macs": c["full"]["macs"], "exits": exits, "source": "measured"}
    if opts.latency:
        channels = ckpt.meta.input.channels if ckpt.meta.input else 3
        x = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            per_exit = {
                name(k + 1): _time_ms(partial(model.forward_until, x, k), opts.warmup, opts.repeats)
                for k in range(model.num_exits)
            }
            full = _time_ms(lambda: model(x), opts.warmup, opts.repeats)
        step["latency"] = {"full": full, "exits": per_exit}
    return ckpt.meta


def _evaluate(step: dict, opts: ReportOptions) -> None:
    from sdtool.evaluate import eval_checkpoint

    rep = eval_checkpoint(
        str(step["_path"]), opts.data, None, "test", opts.device, allow_other_data=opts.allow_other_data
    )
    k = _exported_exit(step["_entry"]) if len(rep["exits"]) == 1 else None
    step["accuracy"] = _accuracy_of(rep, "test", "evaluated", k)


def _early_exit(step: dict, th: Thresholds | None) -> None:
    """A thresholds step's policy, constraint and results (fit split and the split it was reported on)."""
    ee = step["_entry"].metrics.get("early_exit")
    results = {k: v for k, v in ee.items() if isinstance(v, dict)} if isinstance(ee, dict) else {}
    fit = th.fitted_on if th is not None and isinstance(th.fitted_on, dict) else {}
    step["early_exit"] = {
        "policy": th.policy if th else None,
        "fallback": th.fallback if th else None,
        "values": list(th.values) if th else None,
        "fitted_on": fit or None,
        "results": results,
    }
    keys = ("objective", "max_drop", "budget", "cost")
    step["parameters"] |= {k: fit[k] for k in keys if fit.get(k) is not None}
    if th is not None:
        step["parameters"] |= {"policy": th.policy, "fallback": th.fallback}


def _finish(step: dict) -> dict:
    """The step as JSON: per-exit rows joining costs, accuracy and latency; private fields dropped."""
    costs, acc, lat = step["costs"] or {}, step["accuracy"] or {}, step["latency"] or {}
    ce, ae, le = costs.get("exits") or {}, acc.get("exits") or {}, lat.get("exits") or {}
    rows = [
        {"exit": k, **{c: ce.get(k, {}).get(c) for c in ("params", "macs")}, "top1": ae.get(k), "latency_ms": le.get(k)}
        for k in sorted({*ce, *ae, *le})
    ]
    out = {k: v for k, v in step.items() if not k.startswith("_") and k not in ("costs", "accuracy", "latency")}
    out["params"], out["macs"], out["costs_source"] = costs.get("params"), costs.get("macs"), costs.get("source")
    out["accuracy"] = {k: v for k, v in acc.items() if k != "exits"} or None
    out["latency_ms"] = lat.get("full")
    out["exits"] = rows
    return out


def _warnings(steps: list[dict]) -> list[str]:
    why = {
        "missing": "is missing",
        "changed since": "has changed since the chain recorded it (its sha256 differs)",
        "not verified": "has no recorded sha256, so it is not verified or measured",
        "unreadable": "cannot be loaded here",
    }
    out = [
        f"step {s['step']} ({s['label']}): {s['checkpoint']} {why[s['status']]}"
        + (f" ({s['load_error']})" if s.get("load_error") else "")
        + "; the report uses what the chain recorded"
        for s in steps
        if s["status"] in why
    ]
    for s in steps:
        d = s["distillation"] or {}
        if d.get("teacher_status") in ("missing", "changed since"):
            out.append(f"step {s['step']} ({s['label']}): teacher {d['teacher']} {why[d['teacher_status']]}")
    return out


def collect(path: str | Path, opts: ReportOptions | None = None, log: Callable[[str], None] = print) -> dict:
    """The report's data for checkpoint `path` (sdtool.cli_report.resolve_target finds the one of a run
    folder); see the module doc for where each figure comes from. Progress goes to `log`."""
    import torch

    from sdtool.checkpoint import check_checkpoint

    opts = opts or ReportOptions()
    opts.check()
    path = Path(path)
    meta = check_checkpoint(path)
    steps = chain_steps(meta, path)
    metas: dict[int, CheckpointMeta] = {len(steps) - 1: meta}
    todo = [s for s in steps if s["status"] in OK_STATUS]
    for n, s in enumerate(todo, 1):
        what = "costs and latency" if opts.latency else "costs"
        log(f"step {s['step']}/{len(steps)} ({s['label']}, {n}/{len(todo)} on disk): {what} of {s['_path']}")
        try:
            metas[s["step"] - 1] = _measure(s, opts)
        except SdtoolError as e:  # e.g. a model plugin that is not installed here: report what was recorded
            s["status"], s["load_error"] = "unreadable", str(e)
            continue
        if opts.evaluate:
            log(f"step {s['step']}/{len(steps)}: per-exit test accuracy")
            _evaluate(s, opts)
    _inherit(steps)
    fits = [i for i, s in enumerate(steps) if s["command"].startswith("eval --early-exit")]
    for i in fits:
        # Only a fit sets thresholds and prune, train and export --exit drop them: the file's thresholds
        # belong to the last fit in its lineage.
        th = metas[i].thresholds if i in metas else (meta.thresholds if i == fits[-1] else None)
        _early_exit(steps[i], th)
    return {
        "report": REPORT_KIND,
        "sdtool_version": __version__,
        "created": now(),
        "checkpoint": str(path),
        "sha256": sha256(path),
        "model": meta.model.to_json(),
        "num_classes": meta.num_classes,
        "input_size": meta.input_size,
        "data": meta.data.name if meta.data else None,
        "latency": (
            {"device": "cpu", "batch_size": 1, "threads": torch.get_num_threads(), "warmup": opts.warmup}
            | {"repeats": opts.repeats, "statistic": "median, min and max of the timed runs"}
            if opts.latency
            else None
        ),
        "evaluated": opts.evaluate,
        "warnings": _warnings(steps),
        "steps": [_finish(s) for s in steps],
    }
