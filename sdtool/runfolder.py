"""The files of a run folder besides checkpoints and resume state, and the run to continue (`--resume`).

recipe.yaml                  the resolved recipe the run trains with (a resumed run reads it back)
run.json                     `RunInfo`: what the run decided when it started, reused when it resumes
metrics.jsonl                one row per finished epoch (sdtool/trainloop.py appends them)
last.safetensors, best.safetensors, train_state.safetensors (sdtool/trainstate.py)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from sdtool.errors import SdtoolError
from sdtool.recipe import Recipe, dump_yaml, from_dict
from sdtool.trainstate import STATE_FILE

RECIPE_FILE = "recipe.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LAST_FILE = "last.safetensors"
BEST_FILE = "best.safetensors"


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
        info = json.loads(path.read_text()) if path.is_file() else {}
        return cls(info.get("init"), info.get("init_sha256"), info.get("command"), info.get("channels_last"))

    def write(self, run_dir: Path) -> None:
        (run_dir / RUN_FILE).write_text(json.dumps(dataclasses.asdict(self)))


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


def start_run_folder(run_dir: Path, recipe: Recipe, info: RunInfo) -> None:
    """A new run's folder: its recipe, its run.json, no metrics from an earlier run there."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECIPE_FILE).write_text(dump_yaml(recipe))
    info.write(run_dir)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)


def truncate_metrics(path: Path, last_row: dict | None) -> None:
    """Make metrics.jsonl end at the resumed epoch: drop rows of an epoch that was cut short, and
    restore the committed epoch's row if the process died before appending it."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    if last_row is not None:
        rows = [r for r in rows if r["epoch"] < last_row["epoch"]] + [last_row]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
