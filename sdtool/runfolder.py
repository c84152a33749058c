"""The files of a run folder besides checkpoints and resume state, and the run to continue (`--resume`).

recipe.yaml                  the resolved recipe the run trains with (a resumed run reads it back)
run.json                     `RunInfo`: what the run decided when it started, reused when it resumes
metrics.jsonl                one row per finished epoch (sdtool/trainloop.py appends them)
last.safetensors, best.safetensors, train_state.safetensors (sdtool/trainstate.py)
.lock                        while a process writes the run (sdtool/runlock.py)
tensorboard/                 with train.tensorboard: the metrics rows as TensorBoard scalars (sdtool/scalars.py)

Every file but metrics.jsonl is replaced atomically (sdtool/fileio.py), so a crash leaves the old file or
the new one; metrics.jsonl is appended to, and a line a crash cut short is dropped when the run resumes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from sdtool.errors import SdtoolError
from sdtool.fileio import atomic_write_bytes
from sdtool.outputs import check_dir
from sdtool.recipe import Recipe, dump_yaml, from_dict
from sdtool.runlock import warn
from sdtool.trainstate import STATE_FILE

RECIPE_FILE = "recipe.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LAST_FILE = "last.safetensors"
BEST_FILE = "best.safetensors"
# The files sdtool writes into a run folder (their stale temporary files are removed when it starts again).
RUN_FILES = (RECIPE_FILE, RUN_FILE, METRICS_FILE, LAST_FILE, BEST_FILE, STATE_FILE)


@dataclass(frozen=True)
class RunInfo:
    """run.json: what a run decided when it started; a resumed run reuses it rather than deciding again."""

    init: str | None = None  # the --init checkpoint
    init_sha256: str | None = None  # hashed once, when the run started: the file may have moved since
    command: str | None = None  # the command that started the run
    channels_last: bool | None = None  # None in run.json files from before `train.channels_last: auto`

    @classmethod
    def read(cls, run_dir: Path) -> RunInfo:
        path = run_dir / RUN_FILE
        try:
            info = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
            raise SdtoolError(f"{path} cannot be read ({e}); restore it, or start a new run") from None
        types = {"init": str, "init_sha256": str, "command": str, "channels_last": bool}
        bad = [
            k
            for k, t in types.items()
            if isinstance(info, dict) and info.get(k) is not None and not isinstance(info[k], t)
        ]
        if not isinstance(info, dict) or bad:
            raise SdtoolError(
                f"{path} is damaged ({'field ' + bad[0] if bad else 'not an object'}); restore it, or start a new run"
            )
        return cls(info.get("init"), info.get("init_sha256"), info.get("command"), info.get("channels_last"))

    def write(self, run_dir: Path) -> None:
        atomic_write_bytes(run_dir / RUN_FILE, json.dumps(dataclasses.asdict(self)).encode())


def load_run(resume: str | Path) -> tuple[Path, Recipe, RunInfo]:
    """The run folder to continue: its path, its recipe.yaml and its run.json (each read once)."""
    from sdtool.recipe import load_yaml

    run_dir = Path(resume)
    saved = run_dir / RECIPE_FILE
    if not saved.is_file():
        raise SdtoolError(f"{run_dir} has no {RECIPE_FILE}; --resume needs a run folder written by sdtool train")
    return run_dir, from_dict(load_yaml(saved)), RunInfo.read(run_dir)


def new_run_dir(out: str | Path) -> Path:
    """The folder of a new run; one that holds a run already is refused (it is continued with --resume)."""
    run_dir = Path(out)
    if (run_dir / STATE_FILE).exists():
        raise SdtoolError(
            f"{run_dir} already holds a run; use --resume {run_dir} to continue it or --out with a new folder"
        )
    return run_dir


def start_run_folder(run_dir: Path, recipe: Recipe, info: RunInfo, need_bytes: int = 0) -> None:
    """A new run's folder: its recipe, its run.json, no metrics from an earlier run there. With `need_bytes`
    (what the first epoch will write), a disk without that much room fails now, not after an epoch."""
    check_dir(run_dir, "--out", need_bytes=need_bytes)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / RECIPE_FILE, dump_yaml(recipe).encode())
    info.write(run_dir)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)


def append_metrics(run_dir: Path, row: dict) -> None:
    """Add an epoch's row to metrics.jsonl (a crash may cut it short: `truncate_metrics` drops such a line)."""
    path = run_dir / METRICS_FILE
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise SdtoolError(f"cannot write {path}: {e.strerror or e}; free space, then --resume {run_dir}") from None


def truncate_metrics(path: Path, last_row: dict | None) -> None:
    """Make metrics.jsonl end at the resumed epoch: drop rows of an epoch that was cut short, and
    restore the committed epoch's row if the process died before appending it (or while it did)."""
    rows = _read_metrics(path)
    if last_row is not None:
        rows = [r for r in rows if r["epoch"] < last_row["epoch"]] + [last_row]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a last line that is not a whole row (a crash cut it) is dropped, with a warning."""
    text = path.read_text(errors="replace") if path.is_file() else ""  # a crash may leave any bytes at the end
    lines = [(n, x) for n, x in enumerate(text.splitlines(), 1) if x.strip()]
    rows = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows.append(row)
        elif n == lines[-1][0]:
            warn(f"{path}: dropped its last line, cut short by a crash ({len(line)} characters)")
        else:
            raise SdtoolError(
                f"{path} line {n} is not a metrics row (damaged?); delete that line, then --resume {path.parent}"
            )
    return rows
