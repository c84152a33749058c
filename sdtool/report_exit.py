"""Output of `sdtool eval --early-exit`: its terminal view, and the accuracy-vs-MACs sweep files.

Progress and logs go to stderr (sdtool.report's consoles), so `--json` output on stdout stays
machine-readable.
"""

from __future__ import annotations

import json

from rich.table import Table

from sdtool.report import err, fmt_macs, out
from sdtool.timing import fmt_range


def vs_deepest(drop: float) -> str:
    """An accuracy drop (deepest exit minus early exit, in points) in words that cannot be read backwards."""
    if round(drop, 2) == 0:
        return "the same as"
    return f"{abs(drop):.2f} points {'below' if drop > 0 else 'above'}"


def early_exit_view(rep: dict) -> None:
    """`sdtool eval --early-exit`: exit histogram, accuracy, expected MACs, speed-ups, fit summary."""
    table = Table(
        title=f"early exit ({rep['policy']}, fallback {rep['fallback']}) on {rep['data']} "
        f"{rep['split']} ({rep['n']} images)"
    )
    for col in ("exit", "threshold", "answers %", "top-1 % there", "MACs per sample"):
        table.add_column(col, justify="right")
    for e in rep["exits"]:
        thr = "-" if e["threshold"] is None else f"{e['threshold']:.4f}"
        name = str(e["exit"]) + (" (ensemble)" if e["answered_by"] == "ensemble" else "")
        table.add_row(
            name,
            thr if e["exit"] < len(rep["exits"]) else "rest",
            f"{100 * e['fraction']:.1f}",
            "-" if e["top1"] is None else f"{e['top1']:.2f}",
            fmt_macs(e["leave_macs"]),
        )
    out.print(table)
    t = rep["timing"]
    s = rep["wall_clock_speedup"]
    lines = [
        f"top-1 {rep['top1']:.2f}%: {vs_deepest(rep['accuracy_drop'])} the deepest exit alone "
        f"({rep['deepest_top1']:.2f}%)",
        f"expected MACs {fmt_macs(rep['expected_macs'])} = {rep['macs_fraction']:.3f} of the reference "
        f"({fmt_macs(rep['reference_macs'])}): {rep['macs_speedup']:.2f}x fewer",
        (
            f"expected time {rep['expected_ms']:.3f} ms/image at batch {t['batch_n']['batch_size']}: predicted "
            f"{rep['predicted_speedup']:.2f}x"
            if rep.get("expected_ms") is not None
            else ""
        ),
        f"wall-clock speed-up vs the deepest exit alone ({rep.get('engine', 'torch')}, {t['device']}, "
        f"{t['threads']} threads): "
        f"batch {t['batch_n']['batch_size']}: {s['batch_n']:.2f}x"
        + (_batch1_line(t["batch_1"]) if s.get("batch_1") is not None else ""),
    ]
    f = rep.get("fit")
    if f:
        goal = (
            f"max drop {f['max_drop']} points"
            if f["objective"] == "max_drop"
            else f"budget {f['budget']} of the reference"
        )
        lines.append(
            f"fitted on val ({f['n']} images, {goal}): top-1 {f['top1']:.2f}% vs deepest "
            f"{f['deepest_top1']:.2f}%, {f['macs_speedup']:.2f}x fewer MACs"
            + ("" if f["feasible"] else " (constraint NOT met)")
        )
    if rep.get("sweep"):
        lines.append(f"sweep written to {rep['sweep']['dir']}: {', '.join(rep['sweep']['files'])}")
    lines.append(
        f"thresholds written to {rep['written']}"
        if rep.get("written")
        else ("thresholds not saved (add --out PATH to write a checkpoint with them)" if f else "")
    )
    for line in lines:
        if line:
            out.print(line, highlight=False)
    for w in rep.get("warnings", []):
        err.print(f"warning: {w}", highlight=False)


def _batch1_line(b1: dict) -> str:
    """The batch-1 part of the speed-up line: median (fastest-slowest pass) of each figure."""
    return (
        f", batch 1: {fmt_range(b1, 'speedup', unit='x')} ({fmt_range(b1, 'early_exit_ms_per_image')} vs "
        f"{fmt_range(b1, 'deepest_ms_per_image')} ms/image, median (range) of {b1['repeats']} passes over "
        f"{b1['images']} images)"
    )


SWEEP_FILES = ["sweep.json", "sweep.csv", "sweep.png"]
PNG = "sweep.png"
_hinted = False  # PLOT_HINT is said once per process, however many sweeps are written


def sweep_files() -> list[str]:
    """The sweep files this process writes: sweep.png only where matplotlib is installed."""
    from sdtool import plotting

    return list(SWEEP_FILES) if plotting.pyplot() is not None else [f for f in SWEEP_FILES if f != PNG]


def sweep_report(folder) -> dict:
    """The report's "sweep" entry: its folder, its files and its picture (None without matplotlib)."""
    files = sweep_files()
    return {"dir": str(folder), "files": files, "png": PNG if PNG in files else None}


def write_sweep(sweep: dict, folder) -> list[str]:
    """The accuracy-vs-MACs sweep as sweep.json, sweep.csv and sweep.png (matplotlib, Agg; left out with
    a warning when it is missing) in `folder`, all of them or none (written under temporary names, then
    renamed)."""
    from sdtool.outputs import staged_write

    written: list[str] = []
    staged_write(lambda st: written.extend(stage_sweep(sweep, folder, st)), lambda: None)
    return written


def stage_sweep(sweep: dict, folder, st) -> list[str]:
    """Write the sweep files under temporary names into `st` (a sdtool.outputs.Staged); `st.commit()`
    puts them in place; returns their names. A failed write names the file and leaves nothing (the
    caller aborts `st`). Without matplotlib there is no sweep.png, and a warning says so once."""
    from pathlib import Path

    from sdtool import plotting
    from sdtool.outputs import write_error

    plt = plotting.pyplot()
    files = [f for f in SWEEP_FILES if plt is not None or f != PNG]
    d = st.folder(Path(folder))
    paths = {name: st.path(d / name) for name in files}
    name = ""
    try:
        name = "sweep.json"
        paths[name].write_text(json.dumps(sweep, indent=2) + "\n")
        name = "sweep.csv"
        with open(paths[name], "w", newline="") as fh:
            _sweep_csv(sweep, fh)
        if plt is not None:
            name = PNG
            _sweep_png(plt, sweep, paths[name])
    except OSError as e:
        raise write_error(d / name, e) from None
    if plt is None:
        _hint_once()
    return files


def _hint_once() -> None:
    global _hinted
    from sdtool.plotting import PLOT_HINT

    if not _hinted:
        _hinted = True
        err.print(f"warning: {PLOT_HINT}", highlight=False, markup=False, soft_wrap=True)


def _sweep_csv(sweep: dict, fh) -> None:
    import csv

    wr = csv.writer(fh)
    wr.writerow(["curve", "threshold_or_budget", "thresholds", "top1", "macs_fraction"])
    for p in sweep["shared"]:
        wr.writerow(["shared", p["threshold"], "", f"{p['top1']:.4f}", f"{p['macs_fraction']:.6f}"])
    for p in sweep["fitted"]:
        wr.writerow(
            [
                "fitted",
                f"{p['budget']:.6f}",
                json.dumps(p["values"]),
                f"{p['top1']:.4f}",
                f"{p['macs_fraction']:.6f}",
            ]
        )
    for p in sweep["exits_alone"]:
        wr.writerow([f"exit {p['exit']} alone", "", "", f"{p['top1']:.4f}", f"{p['macs_fraction']:.6f}"])


def _sweep_png(plt, sweep: dict, path) -> None:
    """Draw the sweep with `plt` (matplotlib.pyplot, from sdtool.plotting.pyplot())."""
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for key, label, style in (("shared", "one shared threshold", "-"), ("fitted", "per-exit fit for a budget", "o-")):
        pts = sorted((p["macs_fraction"], p["top1"]) for p in sweep[key])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, label=label)
    alone = sweep["exits_alone"]
    ax.scatter(
        [p["macs_fraction"] for p in alone],
        [p["top1"] for p in alone],
        marker="s",
        c="k",
        zorder=3,
        label="each exit alone",
    )
    ch = sweep.get("chosen")
    if ch:
        ax.scatter([ch["macs_fraction"]], [ch["top1"]], marker="*", s=160, c="tab:red", zorder=4, label="fitted")
    ax.set_xlabel("expected MACs / reference (deepest exit alone)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(
        f"early exit on the fitting split ({sweep['policy']}, fallback {sweep['fallback']}, n={sweep['n']})", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")  # the temporary name has no .png suffix to infer it from
    finally:
        plt.close(fig)
