"""All output formatting: rich tables and progress on the terminal, JSON for machines.

Progress and logs go to stderr so that `--json` output on stdout stays machine-readable.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

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


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self.progress, self.task = progress, task

    def update(self, loss: float, acc: float, ips: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, loss=loss, acc=acc, ips=ips)


@contextlib.contextmanager
def epoch_progress(epoch: int, epochs: int, steps: int, quiet: bool) -> Iterator[_Bar]:
    if quiet:
        yield _Bar(None, None)
        return
    progress = Progress(
        TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2f}%  {task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True)
    with progress:
        task = progress.add_task("train", total=steps, loss=0.0, acc=0.0, ips=0.0)
        yield _Bar(progress, task)


def run_header(recipe, model, bundle, device, adt, steps: int, eval_split: str, n_val: int) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    amp = {None: "off"}.get(adt, str(adt).replace("torch.", ""))
    import torch

    return (f"{recipe.model.name} ({n_params / 1e6:.3f} M params, {model.num_exits} exits, mode {recipe.sd.mode}) "
            f"on {recipe.data.name}: {len(bundle.train)} train / {n_val} val / {len(bundle.test)} test images, "
            f"{steps} steps per epoch; device {device}, {torch.get_num_threads()} threads, amp {amp}; "
            f"evaluating on {eval_split}")


def epoch_line(row: dict) -> str:
    return (f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, train acc {row['train_top1']:.2f}%, "
            f"{row['images_per_s']:.0f} img/s ({row['threads']} threads), lr {row['lr']:.4g}")


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
    return accuracy_table(row["eval"], title=f"epoch {row['epoch']} on {row['eval_split']} "
                                              f"({row['eval']['n']} images)")


def fit_summary(result) -> None:
    if result.test is not None:
        out.print(accuracy_table(result.test, title=f"test split, {result.test['checkpoint']} "
                                                    f"({result.test['n']} images)"))
    out.print(f"run folder: {result.run_dir}  (last: {result.last.name}"
              f"{', best: ' + result.best.name if result.best else ''})", highlight=False)


def inspect_view(path: str, meta: dict, size: int, n_params: int) -> None:
    table = Table(title=f"{path}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    spec = meta["model"]
    args = ", ".join(f"{k}={v}" for k, v in spec.get("args", {}).items())
    table.add_row("model", f"{spec['name']}({args})")
    table.add_row("parameters", f"{n_params:,}")
    table.add_row("pruned modules", str(len(meta.get("shapes") or {})))
    table.add_row("classes", f"{meta['num_classes']}: {', '.join(map(str, (meta.get('class_names') or [])[:10]))}"
                  + (" ..." if len(meta.get("class_names") or []) > 10 else ""))
    inp = meta.get("input") or {}
    table.add_row("input", f"{inp.get('size')}x{inp.get('size')}, mean {inp.get('mean')}, std {inp.get('std')}")
    table.add_row("validation split", json.dumps(meta.get("val_split")))
    table.add_row("thresholds", json.dumps(meta.get("thresholds")))
    table.add_row("format", f"{meta['format_version']} (sdtool {meta.get('sdtool_version')})")
    table.add_row("file size", f"{size / 1e6:.2f} MB")
    out.print(table)
    lin = Table(title="lineage")
    for col in ("step", "command", "parent sha256", "started", "ended", "metrics"):
        lin.add_column(col)
    for i, e in enumerate(meta.get("lineage", [])):
        m = e.get("metrics") or {}
        short = {k: v for k, v in m.items() if not isinstance(v, dict)}
        for split in ("val", "test"):
            if isinstance(m.get(split), dict) and m[split].get("exits"):
                short[f"{split} deepest top-1"] = round(m[split]["exits"][-1]["top1"], 2)
        lin.add_row(str(i + 1), e.get("command", ""), (e.get("parent_sha256") or "-")[:12],
                    e.get("started", ""), e.get("ended", ""), json.dumps(short))
    out.print(lin)
