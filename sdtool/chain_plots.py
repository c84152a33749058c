"""The PNG plots of `sdtool report`, drawn from the collected data (sdtool.chain_report) with matplotlib.

    accuracy_vs_macs.png     top-1 against MACs: one series per step, a point per exit (a step that keeps
                             its parent's weights, thresholds or export, is not drawn again)
    early_exit_stepN.png     for each thresholds step N: each exit alone, the deepest exit, the chosen
                             operating point and its constraint (the max-drop line or the budget line)

A checkpoint stores the chosen point of a threshold fit (`thresholds.fitted_on`), not the whole sweep
(`eval --sweep-out` writes that to its own folder), so the early-exit plot draws what is stored.
Each function takes pyplot (sdtool.plotting.pyplot(), never None here) and writes PNG bytes to `path`.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

ACCURACY_PNG = "accuracy_vs_macs.png"


def plots_for(rep: dict) -> list[tuple[str, str]]:
    """(file name, title) of every plot the report's data supports."""
    out = []
    if _drawn(rep):
        out.append((ACCURACY_PNG, "Accuracy vs MACs, per exit and per step"))
    for s in rep["steps"]:
        if _curve(s) is not None:
            out.append((f"early_exit_step{s['step']}.png", f"Early exit of step {s['step']} ({s['label']})"))
    return out


def draw(plt: ModuleType, rep: dict, name: str, path: Path) -> None:
    """Draw plot `name` (one of `plots_for`) to `path`."""
    if name == ACCURACY_PNG:
        _accuracy_vs_macs(plt, rep, path)
    else:
        step = int(name.removeprefix("early_exit_step").removesuffix(".png"))
        _early_exit(plt, next(s for s in rep["steps"] if s["step"] == step), path)


def _drawn(rep: dict) -> list[dict]:
    """The steps of the accuracy-vs-MACs plot: those with points, less the ones that keep their parent's
    weights (thresholds, export), whose points would repeat the parent's."""
    steps, out = rep["steps"], []
    for i, s in enumerate(steps):
        same = s["command"].startswith(("eval", "export")) and i > 0 and bool(_points(steps[i - 1]))
        if _points(s) and not same:
            out.append(s)
    return out


def _points(step: dict) -> list[tuple[float, float, int]]:
    """(MACs, top-1, exit) of every exit of `step` with both recorded."""
    return [(e["macs"], e["top1"], e["exit"]) for e in step["exits"] if e["macs"] and e["top1"] is not None]


def _save(plt: ModuleType, fig, path: Path) -> None:
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")  # a temporary name may have no .png suffix to infer it from
    finally:
        plt.close(fig)


def _accuracy_vs_macs(plt: ModuleType, rep: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    markers = "osD^v<>ph*"
    for i, s in enumerate(_drawn(rep)):
        pts = _points(s)
        split = (s["accuracy"] or {}).get("split") or "?"
        label = f"{s['step']}. {s['label']} ({split})"
        ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], "-" + markers[i % len(markers)], ms=5, label=label)
        for m, a, k in pts:
            ax.annotate(str(k), (m / 1e6, a), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("MACs of the exit alone (millions)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("accuracy vs MACs per exit (numbers: exit; in brackets: the accuracy's split)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, framealpha=0.6)
    _save(plt, fig, path)


def _curve(step: dict) -> dict | None:
    """What the early-exit plot of a thresholds step shows, or None when the fit was not recorded."""
    ee = step.get("early_exit") or {}
    fit = ee.get("fitted_on")
    if not fit or _num(fit.get("macs_fraction")) is None or _num(fit.get("top1")) is None:
        return None
    exits = [e for e in step["exits"] if e["macs"]]
    ref = exits[-1]["macs"] if exits else None
    alone = [(e["macs"] / ref, e["top1"], e["exit"]) for e in exits if ref and e["top1"] is not None]
    return {"fit": fit, "alone": alone, "split": (step["accuracy"] or {}).get("split"), "results": ee["results"]}


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _early_exit(plt: ModuleType, step: dict, path: Path) -> None:
    c = _curve(step)
    assert c is not None  # plots_for lists only steps with a recorded fit
    fit = c["fit"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    if c["alone"]:
        ax.scatter(
            [p[0] for p in c["alone"]],
            [p[1] for p in c["alone"]],
            marker="s",
            c="k",
            zorder=3,
            label=f"each exit alone ({c['split']}, as recorded)",
        )
        for x, y, k in c["alone"]:
            ax.annotate(f"exit {k}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    deepest = _num(fit.get("deepest_top1"))
    if deepest is not None:
        ax.scatter([1.0], [deepest], marker="o", c="tab:blue", zorder=4, label=f"deepest exit alone ({fit['split']})")
    if fit.get("objective") == "max_drop" and deepest is not None and _num(fit.get("max_drop")) is not None:
        ax.axhline(deepest - fit["max_drop"], ls="--", c="tab:red", lw=1, label=f"max drop {fit['max_drop']:g} points")
    elif fit.get("objective") == "budget" and fit.get("cost", "macs") == "macs" and _num(fit.get("budget")):
        ax.axvline(fit["budget"], ls="--", c="tab:red", lw=1, label=f"budget {fit['budget']:g} of the reference")
    ax.scatter(
        [fit["macs_fraction"]],
        [fit["top1"]],
        marker="*",
        s=180,
        c="tab:red",
        zorder=5,
        label=f"chosen thresholds ({fit.get('split', 'val')}, n={fit.get('n')})",
    )
    for split, r in c["results"].items():
        if split.startswith("fit") or not _num(r.get("macs_speedup")) or _num(r.get("top1")) is None:
            continue
        ax.scatter([1 / r["macs_speedup"]], [r["top1"]], marker="P", s=90, c="tab:green", zorder=5, label=f"on {split}")
    ax.set_xlabel("expected MACs / reference (deepest exit alone)")
    ax.set_ylabel("top-1 accuracy (%)")
    title = f"early exit, step {step['step']}: {fit.get('objective', '?')}"
    ax.set_title(title + " (the full sweep is not stored in the checkpoint)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, framealpha=0.6)
    _save(plt, fig, path)
