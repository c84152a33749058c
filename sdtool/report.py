"""All output formatting: rich tables and progress on the terminal, JSON for machines.

Progress (sdtool.progress) and logs go to stderr so that `--json` output on stdout stays machine-readable;
`quiet` (what --json sets) silences the logs, not the progress bars.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from sdtool.progress import epoch_progress, progress  # noqa: F401 - the bars' home is sdtool.progress
from sdtool.timing import by_batch, fmt_range

if TYPE_CHECKING:
    from rich.console import JustifyMethod

    from sdtool.meta import CheckpointMeta

err = Console(stderr=True)
out = Console()


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def make_logger(quiet: bool) -> Callable[..., None]:
    def log(msg: str, table: Table | None = None) -> None:
        if quiet:
            return
        if msg:
            err.print(msg, highlight=False)
        if table is not None:
            err.print(table)

    return log


@dataclass(frozen=True)
class RunSetup:
    """How a run executes, for its start line; `runtime` is FitResult.runtime (memory format, threads,
    OpenMP wait policy)."""

    device: Any  # a torch.device
    amp: Any  # the autocast dtype; None = off
    steps: int  # per epoch
    eval_split: str
    n_val: int  # validation images
    runtime: dict
    world: int = 1  # processes


def run_header(recipe, model, bundle, setup: RunSetup) -> str:
    """The start line of a run: what is trained on which data (recipe, model, data bundle), and how."""
    from sdtool.cpu import describe

    n_params = sum(p.numel() for p in model.parameters())
    s, amp = setup, {None: "off"}.get(setup.amp, str(setup.amp).replace("torch.", ""))
    return (
        f"{recipe.model.name} ({n_params / 1e6:.3f} M params, {model.num_exits} exits, mode {recipe.sd.mode}) "
        f"on {recipe.data.name}: {len(bundle.train)} train / {s.n_val} val / {len(bundle.test)} test images, "
        f"{s.steps} steps per epoch; device {s.device}, {describe(s.runtime)}, {s.runtime['memory_format']}, amp {amp}"
        f"{f', {s.world} processes' if s.world > 1 else ''}; "
        f"evaluating on {s.eval_split}"
    )


def epoch_line(row: dict) -> str:
    return (
        f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, train acc {row['train_top1']:.2f}%, "
        f"{row['images_per_s']:.0f} img/s ({row['threads']} threads"
        + (f", OMP {row['omp_wait_policy']}" if row.get("omp_wait_policy") else "")
        + (f", {row['memory_format']}" if row.get("memory_format") else "")
        + f"), lr {row['lr']:.4g}"
        + teacher_cost(row)
    )


def teacher_cost(row: dict) -> str:
    """`sdtool distill`: the external teacher's share of the training time (the epoch row's teacher_seconds)."""
    seconds = row.get("teacher_seconds")
    if seconds is None or not row.get("train_seconds"):
        return ""
    return (
        f", teacher {seconds:.1f} s ({100 * seconds / row['train_seconds']:.0f}% of training, "
        f"{row.get('teacher_ms_per_step', 0):.1f} ms/step)"
    )


def accuracy_table(rep: dict, title: str | None = None) -> Table:
    """Per-exit and ensemble top-1/top-5 (percent) and loss, shallow to deep."""
    table = Table(title=title)
    for col in ("exit", "top-1 %", "top-5 %", "loss"):
        table.add_column(col, justify="right")
    for e in rep["exits"]:
        table.add_row(str(e["exit"]), f"{e['top1']:.2f}", f"{e['top5']:.2f}", f"{e['loss']:.4f}")
    if rep.get("ensemble"):
        e = rep["ensemble"]
        table.add_row("ensemble", f"{e['top1']:.2f}", f"{e['top5']:.2f}", f"{e['loss']:.4f}")
    return table


def epoch_table(row: dict) -> Table | None:
    if "eval" not in row:
        return None
    return accuracy_table(row["eval"], title=f"epoch {row['epoch']} on {row['eval_split']} ({row['eval']['n']} images)")


def fit_summary(result) -> None:
    if result.test is not None:
        out.print(
            accuracy_table(result.test, title=f"test split, {result.test['checkpoint']} ({result.test['n']} images)")
        )
    out.print(
        f"run folder: {result.run_dir}  (last: {result.last.name}"
        f"{', best: ' + result.best.name if result.best else ''})",
        highlight=False,
    )


def inspect_view(path: str, meta: CheckpointMeta, size: int, n_params: int) -> None:
    table = Table(title=f"{path}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    args = ", ".join(f"{k}={v}" for k, v in meta.model.args.items())
    table.add_row("model", f"{meta.model.name}({args})")
    table.add_row("parameters", f"{n_params:,}")
    table.add_row("pruned modules", str(len(meta.shapes)))
    names = meta.class_names or []
    table.add_row(
        "classes", f"{meta.num_classes}: {', '.join(map(str, names[:10]))}" + (" ..." if len(names) > 10 else "")
    )
    inp = meta.input
    if inp is not None:
        table.add_row("input", f"{inp.size}x{inp.size}, mean {inp.mean}, std {inp.std}")
    table.add_row("validation split", json.dumps(meta.val_split.to_json() if meta.val_split else None))
    table.add_row("thresholds", json.dumps(meta.thresholds.to_json() if meta.thresholds else None))
    table.add_row("format", f"{meta.format_version} (sdtool {meta.sdtool_version})")
    table.add_row("file size", f"{size / 1e6:.2f} MB")
    out.print(table)
    lin = Table(title="lineage")
    for col in ("step", "command", "parent sha256", "started", "ended", "metrics"):
        lin.add_column(col)
    for i, e in enumerate(meta.lineage):
        m = e.metrics
        short = {k: v for k, v in m.items() if not isinstance(v, dict)}
        for split in ("val", "test"):
            if isinstance(m.get(split), dict) and m[split].get("exits"):
                short[f"{split} deepest top-1"] = round(m[split]["exits"][-1]["top1"], 2)
        lin.add_row(
            str(i + 1), e.command, (e.parent_sha256 or "-")[:12], e.started or "", e.ended or "", json.dumps(short)
        )
    out.print(lin)


# --- profile, export (issue 4; early exit: sdtool.report_exit) --------------------------------------------------------


def fmt_macs(macs: float) -> str:
    """MACs in millions, with enough digits for tiny test models too."""
    return f"{macs / 1e6:,.1f} M" if macs >= 1e8 else f"{macs / 1e6:.3g} M"


def profile_view(rep: dict) -> None:
    """`sdtool profile`: cost per exit (alone and cumulative), reference, ensemble, full net, latency."""
    h, w = rep["input_size"]
    lat = rep.get("latency")
    sizes = [str(b) for b in lat["batch_sizes"]] if lat else []
    table = Table(title=f"{rep['target']}: {rep['model']['name']}, {rep['num_classes']} classes, {h}x{w} input")
    for col in ("exit", "stage", "params", "MACs alone", "share of ref.", "MACs in early exit"):
        table.add_column(col, justify="right")
    for b in sizes:
        table.add_column(f"ms @ batch {b}", justify="right")
    by_name = {r["name"]: r for r in (lat["exits"] + [lat["full"]])} if lat else {}

    def lat_cells(name: str) -> list[str]:
        r = by_name.get(name)
        return [fmt_range(by_batch(r, "latency_ms", b), "latency_ms") for b in sizes] if r else []

    for e in rep["exits"]:
        table.add_row(
            str(e["exit"]),
            str(e["stage"]),
            f"{e['params'] / 1e6:.3f} M",
            fmt_macs(e["macs"]),
            f"{e['share_of_reference']:.3f}",
            fmt_macs(e["cumulative_macs"]),
            *lat_cells(f"exit {e['exit']}"),
        )
    if rep.get("ensemble"):
        en = rep["ensemble"]
        table.add_row(
            "ensemble",
            "all",
            f"{en['params'] / 1e6:.3f} M",
            fmt_macs(en["macs"]),
            f"{en['share_of_reference']:.3f}",
            "",
            *[""] * len(sizes),
        )
    f = rep["full"]
    table.add_row(
        "full net",
        "all",
        f"{f['params'] / 1e6:.3f} M",
        fmt_macs(f["macs"]),
        f"{f['share_of_reference']:.3f}",
        "",
        *lat_cells("full"),
    )
    out.print(table)
    out.print(
        f"reference cost = exit {rep['reference']['exit']} alone ({fmt_macs(rep['reference']['macs'])} MACs); "
        f"{rep['parameters']:,} parameters in all. MACs: {rep['macs_counter']}.",
        highlight=False,
    )
    if lat:
        peak = [r for r in lat["exits"] + [lat["full"]] if r.get("peak_memory_bytes") is not None]
        mem = (
            "; peak memory " + ", ".join(f"{r['name']} {r['peak_memory_bytes'] / 2**20:.1f} MiB" for r in peak)
            if peak
            else f"; peak memory {lat['peak_memory']}"
        )
        out.print(
            f"latency: median (fastest–slowest) of {lat['repeats']} runs after {lat['warmup']} warm-up, "
            f"device {lat['device']}, "
            f"{lat['threads']} {(lat.get('engine') or {}).get('engine', 'torch')} threads{mem}",
            highlight=False,
        )


def export_view(rep: dict) -> None:
    """`sdtool export`: what was written and how closely it reproduces the PyTorch model."""
    what = f"exit {rep['exit']} alone" if rep.get("exit") else f"all {rep['exits']} exits"
    out.print(
        f"wrote {rep['out']} ({rep['format']}, {what}, {rep['parameters']:,} parameters, "
        f"{rep['file_size'] / 1e6:.2f} MB)",
        highlight=False,
    )
    c = rep.get("check")
    if c:
        out.print(
            f"checked: {c['runtime']} output vs PyTorch on {c['inputs']} random inputs, max |diff| "
            f"{c['max_abs_diff']:.2e}, same predictions: {c['same_argmax']}",
            highlight=False,
        )


def bundle_view(rep: dict) -> None:
    """`sdtool export --early-exit`: the bundle written, its policy and its check."""
    pol = rep["policy"]
    thr = ", ".join("-" if v is None else f"{v:.4f}" for v in pol["values"]) or "none (one exit)"
    out.print(
        f"wrote early-exit bundle {rep['out']} ({rep['exits']} exits, {len(rep['files'])} files, "
        f"{rep['bundle_size'] / 1e6:.2f} MB)",
        highlight=False,
    )
    out.print(f"policy {pol['policy']}, fallback {pol['fallback']}, thresholds {thr}", highlight=False)
    c = rep["check"]
    out.print(
        f"checked: {c['runtime']} vs PyTorch on {c['inputs']} random inputs, every exit: max |diff| "
        f"{c['max_abs_diff']:.2e}",
        highlight=False,
    )
    f = rep.get("fit")
    if f:
        out.print(
            f"fitted on val ({f['n']} images): top-1 {f['top1']:.2f}% vs deepest {f['deepest_top1']:.2f}%, "
            f"{f['macs_speedup']:.2f}x fewer MACs"
            + (f", predicted {f['predicted_speedup']:.2f}x faster" if f.get("predicted_speedup") else ""),
            highlight=False,
        )
    out.print(
        f"run it: sdtool predict {rep['out']} IMAGE...  (or, without sdtool: python -c 'from sdtool_runtime "
        "import EarlyExitSession' inside the folder; docs/deploy.md)",
        highlight=False,
    )
    for w in rep.get("warnings", []):
        err.print(f"warning: {w}", highlight=False)


def predict_view(rep: dict) -> None:
    """`sdtool predict`: one row per image."""
    table = Table(title=f"{rep['target']} ({rep['engine']['engine']})")
    cols: tuple[tuple[str, JustifyMethod], ...] = (
        ("image", "left"),
        ("class", "left"),
        ("confidence", "right"),
        ("exit", "right"),
    )
    for col, just in cols:
        table.add_column(col, justify=just)
    for r in rep["predictions"]:
        table.add_row(r["file"], f"{r['name']} ({r['class']})", f"{r['confidence']:.3f}", str(r["exit"]))
    out.print(table)


# --- prune and pipeline (issue 5) -------------------------------------------------------------------


def prune_view(rep: dict) -> None:
    """`sdtool prune`: params and MACs per exit (each exit alone) before/after, accuracy if evaluated."""
    acc = rep.get("accuracy") or {}
    ab = acc.get("before")
    aa = acc.get("after") or {}  # there whenever `before` is: prune evaluates both or neither
    o = rep["options"]
    target = f"ratio {o['ratio']}" if o.get("ratio") is not None else f"target {o['target_macs']} of the MACs"
    table = Table(title=f"{rep['checkpoint']} -> {rep['out']} ({o['criterion']}, {target})")
    cols = ["exit", "params before", "params after", "MACs before", "MACs after", "MACs kept"]
    cols += ["top-1 % before", "top-1 % after"] if ab else []
    for col in cols:
        table.add_column(col, justify="right")
    rows = list(zip(rep["before"]["exits"], rep["after"]["exits"], strict=True))
    for k, (b, a) in enumerate(rows):
        cells = [
            str(b["exit"]),
            f"{b['params']:,}",
            f"{a['params']:,}",
            fmt_macs(b["macs"]),
            fmt_macs(a["macs"]),
            f"{a['macs'] / b['macs']:.3f}",
        ]
        if ab:
            cells += [f"{ab['exits'][k]['top1']:.2f}", f"{aa['exits'][k]['top1']:.2f}"]
        table.add_row(*cells)
    b, a = rep["before"]["full"], rep["after"]["full"]
    cells = [
        "full net",
        f"{b['params']:,}",
        f"{a['params']:,}",
        fmt_macs(b["macs"]),
        fmt_macs(a["macs"]),
        f"{a['macs'] / b['macs']:.3f}",
    ]
    if ab:
        ens_b, ens_a = ab.get("ensemble"), aa.get("ensemble")
        cells += [f"{ens_b['top1']:.2f}" if ens_b else "", f"{ens_a['top1']:.2f}" if ens_a else ""]
    table.add_row(*cells)
    out.print(table)
    note = (
        f"; accuracy on the {acc.get('split', 'test')} split ({ab['n']} images, full-net row: ensemble)" if ab else ""
    )
    out.print(
        f"channel ratio {rep['ratio']:.4f} ({len(rep['search'])} pruning run(s), {rep['seconds']:.2f} s); "
        f"{rep['pruned_modules']} modules resized; sha256 {rep['sha256'][:12]}{note}",
        highlight=False,
    )


def pipeline_view(rep: dict) -> None:
    """`sdtool pipeline`: one row per step with its checkpoint, cost and deepest-exit accuracy."""
    table = Table(title=f"pipeline {rep['recipe']} -> {rep['out']}")
    for col in ("step", "checkpoint", "params", "MACs (full net)", "deepest top-1 %", "note"):
        table.add_column(col)
    for s in rep["steps"]:
        table.add_row(
            s["step"],
            s["checkpoint"] or "",
            f"{s['params']:,}" if s.get("params") else "",
            fmt_macs(s["macs"]) if s.get("macs") else "",
            f"{s['top1']:.2f}" if s.get("top1") is not None else "",
            s.get("note", ""),
        )
    out.print(table)
    out.print(f"final checkpoint: {rep['final']}", highlight=False)
