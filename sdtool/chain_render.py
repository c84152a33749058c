"""`sdtool report`'s outputs: Markdown, self-contained HTML, the terminal summary, and the folder they go in.

The collected data (sdtool.chain_report) becomes a list of `Section`s (a title, columns, rows of text,
notes), which each format renders the same way: report.md (with the PNGs beside it), report.html (the
PNGs inlined as base64 data URIs, the style inline: one file that opens anywhere), report.json (the data)
and the rich tables on the terminal.

The folder: `--out` must be new, empty, or an earlier report's folder (its report.json says it was written
by `sdtool report` and it holds nothing but a report's files), which is then replaced as a whole. Files are
written into a temporary folder beside it and renamed into place at the end, so a failure leaves neither a
half-written folder nor a damaged earlier report.
"""

from __future__ import annotations

import base64
import html as _html
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtool import chain_plots, plotting
from sdtool.chain_report import REPORT_KIND
from sdtool.errors import SdtoolError
from sdtool.outputs import check_dir, fsync_files, staging_folder
from sdtool.report import fmt_macs

REPORT_FILES = ("report.md", "report.html", "report.json")


@dataclass
class Section:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def _g(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:g}" if isinstance(v, float) else str(v)


def _is_num(v: Any) -> bool:  # recorded metrics are free-form JSON: show only what is a number
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pct(v: Any) -> str:
    return f"{v:.2f}" if _is_num(v) else ""


def _macs(v: Any) -> str:
    return fmt_macs(v) if _is_num(v) and v > 0 else ""


def _lat(t: dict | None) -> str:
    return "" if not t else f"{t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f})"


def _kv(d: dict | None) -> str:
    return ", ".join(f"{k}={_g(v)}" for k, v in (d or {}).items() if v is not None)


def _status(s: dict) -> str:
    if s["status"] == "ok" and s.get("found_at"):
        return f"ok (found at {s['found_at']})"
    return s["status"]


def _deepest(s: dict) -> str:
    top = s["exits"][-1]["top1"] if s["exits"] else None
    split = (s["accuracy"] or {}).get("split")
    return "" if top is None else f"{top:.2f} ({split})"


def steps_section(rep: dict) -> Section:
    cols = ["#", "step", "checkpoint", "status", "params", "MACs", "deepest top-1 %", "ensemble top-1 %"]
    cols += ["latency ms, full net", "parameters"]
    rows = [
        [
            str(s["step"]),
            s["label"],
            s["checkpoint"] or "",
            _status(s),
            f"{s['params']:,}" if s["params"] else "",
            _macs(s["macs"]),
            _deepest(s),
            _pct((s["accuracy"] or {}).get("ensemble_top1")),
            _lat(s["latency_ms"]),
            _kv(s["parameters"]),
        ]
        for s in rep["steps"]
    ]
    lat = rep["latency"]
    note = (
        f"Latency: batch 1 on the CPU ({lat['threads']} threads), {lat['warmup']} warm-up runs, then median "
        f"(min-max) of {lat['repeats']} timed runs, on each step's file found on disk and unchanged."
        if lat
        else "Latency: not measured (--no-latency)."
    )
    return Section("Steps", cols, rows, [note])


def exits_section(rep: dict) -> Section:
    rows = []
    for s in rep["steps"]:
        for e in s["exits"]:
            rows.append(
                [
                    f"{s['step']}. {s['label']}",
                    str(e["exit"]),
                    f"{e['params']:,}" if e["params"] else "",
                    _macs(e["macs"]),
                    _pct(e["top1"]),
                    _lat(e["latency_ms"]),
                ]
            )
    cols = ["step", "exit", "params (alone)", "MACs (alone)", "top-1 %", "latency ms (alone)"]
    return Section("Per exit", cols, rows)


def sources_section(rep: dict) -> Section:
    rows = []
    for s in rep["steps"]:
        a = s["accuracy"] or {}
        acc = f"{a['source']}: {a.get('split')} split, n={a.get('n')}" if a else "not recorded"
        rows.append([f"{s['step']}. {s['label']}", s["costs_source"] or "not recorded", acc])
    notes = [
        "Accuracy comes from the metrics each step recorded (training: its validation split, or test without "
        "one; prune: test), so splits can differ between steps; --evaluate re-measures every step on disk on "
        "the test split."
    ]
    return Section("Where the numbers come from", ["step", "costs", "accuracy"], rows, notes)


def pruning_section(rep: dict) -> Section | None:
    keys = ["criterion", "ratio", "target_macs", "ratio_used", "global_pruning", "iterative_steps", "round_to"]
    keys += ["protect_exits", "macs_fraction", "params_fraction"]
    rows = [[str(s["step"]), *(_g(s["pruning"].get(k)) for k in keys)] for s in rep["steps"] if s["pruning"]]
    return Section("Pruning", ["step", *keys], rows) if rows else None


def distillation_section(rep: dict) -> Section | None:
    keys = ["teacher", "teacher_model", "teacher_status", "teacher_output", "alpha", "temperature", "targets"]
    keys += ["feature"]
    rows = [[str(s["step"]), *(_g(s["distillation"].get(k)) for k in keys)] for s in rep["steps"] if s["distillation"]]
    return Section("Distillation", ["step", *keys], rows) if rows else None


def _constraint(fit: dict) -> str:
    if fit.get("objective") == "max_drop":
        return f"max drop {_g(fit.get('max_drop'))} points"
    if fit.get("objective") == "budget":
        return f"budget {_g(fit.get('budget'))} of the reference ({fit.get('cost', 'macs')})"
    return ""


def early_exit_section(rep: dict) -> Section | None:
    rows = []
    for s in rep["steps"]:
        ee = s["early_exit"]
        if not ee:
            continue
        fit = ee["fitted_on"] or {}
        thr = ", ".join("-" if v is None else f"{v:.4f}" for v in ee["values"]) if ee["values"] is not None else ""
        base = [str(s["step"]), ee["policy"] or "", ee["fallback"] or "", _constraint(fit), thr]
        results: list[tuple[str, dict]] = list(ee["results"].items()) or [("", {})]
        for split, r in results:
            rows.append(
                [
                    *base,
                    split,
                    _pct(r.get("top1")),
                    _pct(r.get("deepest_top1")),
                    _macs(r.get("expected_macs")),
                    f"{r['macs_speedup']:.2f}x" if _is_num(r.get("macs_speedup")) else "",
                ]
            )
    cols = ["step", "policy", "fallback", "constraint", "thresholds", "split", "top-1 %", "deepest alone %"]
    cols += ["expected MACs", "fewer MACs"]
    notes = ["Thresholds: one per shallow exit in the policy's unit; '-' means that exit never answers."]
    return Section("Early exit", cols, rows, notes) if rows else None


def commands_section(rep: dict) -> Section:
    rows = [
        [str(s["step"]), s["command"], "sdtool " + " ".join(s["argv"]) if s.get("argv") else "", s["ended"] or ""]
        for s in rep["steps"]
    ]
    return Section("Commands", ["step", "command", "command line", "ended"], rows)


def sections(rep: dict) -> list[Section]:
    candidates = [
        steps_section(rep),
        exits_section(rep),
        sources_section(rep),
        pruning_section(rep),
        distillation_section(rep),
        early_exit_section(rep),
        commands_section(rep),
    ]
    return [s for s in candidates if s is not None]


def _head(rep: dict) -> list[str]:
    m = rep["model"]
    return [
        f"Checkpoint: {rep['checkpoint']} (sha256 {rep['sha256'][:16]}...)",
        f"Model: {m['name']} {json.dumps(m.get('args', {}))}; {rep['num_classes']} classes; "
        f"input {rep['input_size']}x{rep['input_size']}; data {rep['data']}",
        f"{len(rep['steps'])} steps; written by sdtool {rep['sdtool_version']} on {rep['created']}",
    ]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(rep: dict, images: list[tuple[str, str, bytes]]) -> str:
    lines = ["# Compression report", "", *(f"- {x}" for x in _head(rep)), ""]
    if rep["warnings"]:
        lines += ["## Warnings", "", *(f"- {w}" for w in rep["warnings"]), ""]
    for sec in sections(rep):
        lines += [f"## {sec.title}", "", "| " + " | ".join(sec.columns) + " |"]
        lines.append("|" + "---|" * len(sec.columns))
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in sec.rows]
        lines += ["", *(f"{n}\n" for n in sec.notes)]
    lines += ["## Plots", ""]
    lines += [f"![{title}]({name})\n" for name, title, _ in images]
    if rep["plots"]["note"]:
        lines += [rep["plots"]["note"] + ".", ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;text-align:left}th{background:#f2f2f2}"
    ".warn{color:#a00}img{max-width:700px;display:block;margin:1em 0}"
)


def html(rep: dict, images: list[tuple[str, str, bytes]]) -> str:
    e = _html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>sdtool report</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>Compression report</h1><ul>",
        *(f"<li>{e(x)}</li>" for x in _head(rep)),
        "</ul>",
    ]
    if rep["warnings"]:
        parts += ["<h2>Warnings</h2><ul>", *(f'<li class="warn">{e(w)}</li>' for w in rep["warnings"]), "</ul>"]
    for sec in sections(rep):
        parts += [f"<h2>{e(sec.title)}</h2><table><tr>", *(f"<th>{e(c)}</th>" for c in sec.columns), "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in sec.rows]
        parts += ["</table>", *(f"<p>{e(n)}</p>" for n in sec.notes)]
    parts.append("<h2>Plots</h2>")
    for _, title, png in images:
        data = base64.b64encode(png).decode("ascii")
        img = f'<img alt="{e(title)}" src="data:image/png;base64,{data}">'
        parts.append(f"<figure>{img}<figcaption>{e(title)}</figcaption></figure>")
    if rep["plots"]["note"]:
        parts.append(f"<p>{e(rep['plots']['note'])}.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def terminal_view(rep: dict) -> None:
    """The steps table and where the report went."""
    from rich.table import Table

    from sdtool.report import out

    sec = steps_section(rep)
    keep = [0, 1, 3, 4, 5, 6, 8]  # the checkpoint paths and parameters are in the report files
    table = Table(title=f"compression report of {rep['checkpoint']}")
    for i in keep:
        table.add_column(sec.columns[i], justify="left" if i in (1, 3) else "right")
    for row in sec.rows:
        table.add_row(*(row[i] for i in keep))
    out.print(table)
    wr = rep.get("written")
    if wr:
        out.print(f"report written to {wr['dir']}: {', '.join(wr['files'])}", highlight=False, markup=False)


def _previous_report(p: Path) -> bool:
    try:
        kind = json.loads((p / "report.json").read_text()).get("report")
    except (OSError, ValueError, AttributeError):
        return False
    return kind == REPORT_KIND and all(
        f.is_file() and (f.name in REPORT_FILES or f.suffix == ".png") for f in p.iterdir()
    )


def check_out(out: str | Path) -> Path:
    """Refuse, before any work, an --out that is a file, cannot be written, or is a non-empty folder that
    does not hold an earlier report (which is replaced)."""
    p = Path(out)
    if p.is_dir() and any(p.iterdir()) and not _previous_report(p):
        raise SdtoolError(
            f"--out {p} is not empty and holds no earlier sdtool report; choose a new or empty folder "
            "(a folder written by sdtool report is replaced)"
        )
    return check_dir(p, "--out")


def _swap(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` in the place of `out` (absent, empty, or an earlier report)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old / out.name, out)  # the earlier report stays as it was
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_report(rep: dict, out: str | Path) -> dict:
    """Draw the plots and write report.md, report.html and report.json to `out`; returns {"dir", "files"}
    (also stored in `rep["written"]`). Without matplotlib, `rep["plots"]["note"]` says how to get plots."""
    out = Path(out)
    plt = plotting.pyplot()
    planned = chain_plots.plots_for(rep) if plt is not None else []
    rep["plots"] = {"files": [n for n, _ in planned], "note": None if plt is not None else plotting.PLOT_HINT}
    rep["written"] = {"dir": str(out), "files": [*REPORT_FILES, *rep["plots"]["files"]]}
    with staging_folder(out) as tmp:
        images = []
        for name, title in planned:
            assert plt is not None  # nothing is planned without matplotlib
            chain_plots.draw(plt, rep, name, tmp / name)
            images.append((name, title, (tmp / name).read_bytes()))
        (tmp / "report.md").write_text(markdown(rep, images), encoding="utf-8")
        (tmp / "report.html").write_text(html(rep, images), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(rep, indent=2, default=str) + "\n", encoding="utf-8")
        fsync_files(tmp)
        _swap(tmp, out)
    return rep["written"]
