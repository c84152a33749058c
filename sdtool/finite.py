"""Nothing non-finite is committed: a run whose loss, weights or evaluation loss became NaN or infinite stops
before that epoch writes `best`, `last`, the resume state or its metrics row, so `--resume` and every
checkpoint keep the last good epoch, which the one-line error names.

The loss is checked as training goes (`stop_unless_finite_loss`); the weights after the epoch's last step,
which no loss has seen yet (`stop_unless_finite_weights`); the evaluation loss before anything is written
(`check_eval`). Under torchrun every process takes each decision together (`distributed.any_flag`), or the
others would wait forever in the next collective; `check_eval` runs on rank 0 inside `commit_epoch`, whose
failure flag tells the others.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from sdtool import distributed
from sdtool.errors import SdtoolError
from sdtool.runfolder import LAST_FILE

if TYPE_CHECKING:
    from sdtool.trainloop import Run


def kept(run: Run, epoch: int) -> str:
    """What the run folder keeps when (0-based) `epoch` fails: the epoch before it, unless none was committed."""
    if epoch > run.progress.start_epoch or run.resuming:
        return f"{run.run_dir / LAST_FILE} holds epoch {epoch}, the last good one"
    return "no checkpoint was written"


def stop_unless_finite_loss(run: Run, epoch: int, i: int, loss_sum: float, seen: int) -> None:
    # Every process must take the same decision, or the others would hang in the next step.
    if distributed.any_flag(not math.isfinite(loss_sum), run.device, run.dist):
        raise SdtoolError(
            f"loss became {loss_sum / seen if math.isfinite(loss_sum) else loss_sum} at epoch "
            f"{epoch + 1}, step {i + 1} (lr {run.progress.lr:.3g}); {kept(run, epoch)}; lower train.lr"
        )


def _weights_finite(run: Run) -> bool:
    """The network's weights and buffers, the loss side's and the extra term's trained tensors (one sync)."""
    tensors = [t for m in (run.model, run.criterion) for t in m.state_dict().values() if t.is_floating_point()]
    if run.extra is not None:
        tensors += [p.detach() for p in run.extra.parameters() if p.requires_grad]
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def stop_unless_finite_weights(run: Run, epoch: int) -> None:
    """The last step's update is not seen by any loss of the epoch: check its result before it is saved."""
    if distributed.any_flag(not _weights_finite(run), run.device, run.dist):
        raise SdtoolError(
            f"the weights became NaN or infinite in epoch {epoch + 1} (lr {run.progress.lr:.3g}); "
            f"{kept(run, epoch)}; lower train.lr or set train.grad_clip"
        )


def check_eval(run: Run, epoch: int, row: dict[str, Any]) -> None:
    """Finite weights can still overflow in the forward pass: refuse an evaluation with a non-finite loss."""
    if "eval" not in row:
        return
    ev = row["eval"]
    losses = [(f"exit {e['exit']}", e["loss"]) for e in ev["exits"]]
    losses += [("the ensemble", ev["ensemble"]["loss"])] if ev.get("ensemble") else []
    bad = [(name, loss) for name, loss in losses if not math.isfinite(loss)]
    if bad:
        name, loss = bad[0]
        raise SdtoolError(
            f"the {row['eval_split']} loss of {name} became {loss} after epoch {epoch + 1} "
            f"(lr {run.progress.lr:.3g}); {kept(run, epoch)}; lower train.lr"
        )
