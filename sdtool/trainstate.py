"""Training state for exact resume, stored without pickle.

`train_state.safetensors` beside the run's checkpoints holds every tensor needed to continue exactly:
optimizer buffers, the loss-side modules (adaptation layers), RNG states, the gradient scaler; its JSON
metadata holds the scalar state (epoch, step, best metric, optimizer hyper-parameters). It is written
atomically after `last.safetensors`, so both always describe the same finished epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import nn

from sdtool.checkpoint import load_tensors, save_tensors
from sdtool.errors import SdtoolError

if TYPE_CHECKING:
    from sdtool.distributed import DistContext
    from sdtool.trainloop import ExtraLoss

STATE_FILE = "train_state.safetensors"


def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors keyed 'opt.<param>.<name>', JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        scalars[str(pid)] = {}
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{name}"] = v
            else:
                scalars[str(pid)][name] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], js: dict) -> dict:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in js["scalars"].items()}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": js["param_groups"]}


def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states (CPU, and every visible GPU)."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def gather_rng(device: torch.device, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Every process's RNG states as 'rng.rank<R>.<name>' tensors (augmentation differs per process)."""
    from sdtool.distributed import gather_tensors

    out = {}
    for name, state in rng_tensors().items():
        for r, s in enumerate(gather_tensors(state, device, ctx)):
            out[f"rng.rank{r}.{name}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor], rank: int) -> None:
    prefix = f"rng.rank{rank}."
    torch.set_rng_state(tensors[prefix + "cpu"])
    cuda = sorted((k for k in tensors if k.startswith(prefix + "cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def _trainable(extra: ExtraLoss | None) -> dict[str, torch.Tensor]:
    """The extra loss term's own trainable tensors (e.g. FitNet adapters), not its frozen teacher."""
    return {} if extra is None else {n: p for n, p in extra.named_parameters() if p.requires_grad}


def save_state(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_module: nn.Module,
    scaler: torch.amp.GradScaler | None,
    rng: dict[str, torch.Tensor],
    scalars: dict[str, Any],
    extra: ExtraLoss | None = None,
) -> None:
    """One self-contained file: the model weights are stored here too, so a crash between writing
    `last.safetensors` and this file can never pair weights and optimizer state of different epochs."""
    opt_tensors, opt_json = _split_optimizer(optimizer.state_dict())
    tensors = dict(opt_tensors)
    tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    tensors.update({f"loss.{k}": v for k, v in loss_module.state_dict().items()})
    tensors.update({f"extra.{k}": v for k, v in _trainable(extra).items()})
    tensors.update(rng)
    meta = {"scalars": scalars, "optimizer": opt_json}
    if scaler is not None and scaler.is_enabled():
        meta["scaler"] = {k: (float(v) if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}
    save_tensors(run_dir / STATE_FILE, tensors, meta)


def read_scalars(run_dir: Path) -> dict:
    """The scalar state (epoch, step, world size, ...) without touching any tensor."""
    path = run_dir / STATE_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("sdtool", "{}"))["scalars"]
    except Exception:  # noqa: BLE001 - any unreadable state is the same problem for the user
        raise SdtoolError(
            f"{path} is unreadable (damaged?); the run cannot be resumed exactly, "
            f"start it again or use --init {run_dir / 'last.safetensors'}"
        ) from None


def load_state(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_module: nn.Module,
    scaler: torch.amp.GradScaler | None,
    rank: int = 0,
    extra: ExtraLoss | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer, loss modules, scaler and RNG; returns the scalar state (epoch, step, ...)."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise SdtoolError(f"{path} not found; --resume needs a run folder written by `sdtool train`")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("sdtool", "{}"))
    tensors = load_tensors(path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(_join_optimizer(tensors, meta["optimizer"]))
    loss_module.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("loss.")})
    with torch.no_grad():
        for name, p in _trainable(extra).items():
            p.copy_(tensors[f"extra.{name}"])
    if scaler is not None and "scaler" in meta:
        scaler.load_state_dict(meta["scaler"])
    restore_rng(tensors, rank)
    return meta["scalars"]
