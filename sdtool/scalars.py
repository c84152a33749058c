"""Optional TensorBoard scalars of a training run (`train.tensorboard: true`), through torch's SummaryWriter.

metrics.jsonl stays the record (resume reconciles it; `sdtool report` reads the checkpoints): the event files
under RUN_DIR/tensorboard/ are a view of the same rows for people who watch runs in TensorBoard. They are
written by process 0 after the epoch's files, so an epoch whose commit failed is in neither.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from sdtool.errors import SdtoolError

TB_DIR = "tensorboard"


def check_available() -> None:
    """Fail before any data is read when the recipe asks for scalars that cannot be written."""
    if importlib.util.find_spec("tensorboard") is None:
        raise SdtoolError(
            "train.tensorboard: true needs the tensorboard package; pip install 'sdtool[tensorboard]' "
            "or set train.tensorboard=false"
        )


_SKIP = ("epoch", "threads", "world_size")  # bookkeeping, not curves


def flatten(row: dict[str, Any]) -> dict[str, float]:
    """The scalars of one metrics.jsonl row, named for TensorBoard's grouping: `train/loss`, `train/lr`,
    `train/part_<loss term>`, `val/exit1_top1`, `val/ensemble_top1` (`test/...` without a validation split)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in _SKIP or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[f"train/{key.removeprefix('train_')}"] = float(value)
        elif key == "train_parts" and isinstance(value, dict):
            out.update({f"train/part_{k}": float(v) for k, v in value.items() if isinstance(v, int | float)})
    ev, split = row.get("eval"), row.get("eval_split", "eval")
    if isinstance(ev, dict):
        for i, e in enumerate(ev.get("exits", []), 1):
            out.update({f"{split}/exit{i}_{k}": float(e[k]) for k in ("top1", "top5", "loss") if k in e})
        ens = ev.get("ensemble")
        if isinstance(ens, dict):
            out.update({f"{split}/ensemble_{k}": float(ens[k]) for k in ("top1", "top5", "loss") if k in ens})
    return out


class ScalarLog:
    """One SummaryWriter for a run folder, opened at the first epoch written (so a run that fails earlier
    leaves no event file). A resumed run drops events from epochs after its resume point (`purge_step`)."""

    def __init__(self, run_dir: Path, start_epoch: int):
        self.path = run_dir / TB_DIR
        self.start_epoch = start_epoch
        self._writer: Any = None

    def write(self, epoch: int, row: dict[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # Steps are epochs (1-based, as in the checkpoints' metrics), so curves of resumed runs line up.
            purge = self.start_epoch + 1 if self.start_epoch > 0 else None
            self._writer = SummaryWriter(log_dir=str(self.path), purge_step=purge)
        for name, value in flatten(row).items():
            self._writer.add_scalar(name, value, global_step=epoch + 1)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
