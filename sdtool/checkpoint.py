"""The shared checkpoint format: one `.safetensors` file, weights plus a JSON metadata document.

    tensors            the model's state dict
    __metadata__       {"sdtool": JSON} with format_version, sdtool_version, model spec, num_classes,
                       class_names, input spec, shapes (pruned modules), thresholds, val split, lineage

Loading never unpickles: safetensors holds raw tensors and the metadata is JSON. Writes go to a
temporary file in the target folder, are fsynced, then renamed, so a crash never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

from sdtool import __version__
from sdtool.errors import SdtoolError

FORMAT_VERSION = 1
META_KEY = "sdtool"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a fsynced temporary file in the same folder and a rename."""
    path = Path(path)
    if path.is_dir():
        raise SdtoolError(f"cannot write {path}: it is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise SdtoolError(f"cannot write {path}: {e.strerror or e}; choose another folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise SdtoolError(f"cannot write {path}: {e.strerror or e}; free space or choose another folder") from None
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically write tensors plus `meta` (JSON under the `sdtool` metadata key)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(tensors, metadata={META_KEY: json.dumps(meta)}))


def save(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Save a model checkpoint. `meta` must carry the model spec and data description (see docs)."""
    from sdtool.models.shapes import shape_changes

    full = dict(meta)
    full["format_version"] = FORMAT_VERSION
    full["sdtool_version"] = __version__
    full["model"] = model.spec
    full["shapes"] = shape_changes(model, model.spec)
    full.setdefault("lineage", [])
    state = model.state_dict()
    _check_rebuild(full, state)
    save_tensors(path, state, full)


def _check_rebuild(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Refuse to write a file that would not load: rebuild the structure from the metadata (shapes only,
    on the meta device) and compare every tensor's shape with the model's."""
    problem = None
    try:
        with torch.device("meta"):
            rebuilt = build_model(meta).state_dict()
    except SdtoolError as e:
        problem = str(e).split(";")[0]
    else:
        bad = [k for k in state if k not in rebuilt or rebuilt[k].shape != state[k].shape]
        if bad or len(rebuilt) != len(state):
            problem = (bad[0] if bad else next(k for k in rebuilt if k not in state)) + " would not reload"
    if problem:
        raise SdtoolError(
            f"this model's structure cannot be recorded in the checkpoint format ({problem}); "
            "nothing was written. Please report it with the model and the command"
        )


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata document of an sdtool file, validated; raises SdtoolError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise SdtoolError(f"checkpoint {path} not found; pass the path of an sdtool .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as e:  # random or truncated bytes
        raise SdtoolError(
            f"{path} is not a readable safetensors file (corrupt or truncated?): {str(e).splitlines()[0][:120]}"
        ) from None
    if raw is None:
        raise SdtoolError(
            f"{path} is a safetensors file but not an sdtool checkpoint (no sdtool metadata); "
            "train with sdtool or load foreign weights through the teacher options"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise SdtoolError(f"{path}: the sdtool metadata is not valid JSON; the file is damaged") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int):
        raise SdtoolError(f"{path}: the sdtool metadata has no format_version; the file is damaged")
    if version > FORMAT_VERSION:
        raise SdtoolError(
            f"{path} was written by a newer sdtool (format {version}, this one reads up to "
            f"{FORMAT_VERSION}); upgrade sdtool"
        )
    for key in ("model", "num_classes"):
        if key not in meta:
            raise SdtoolError(f"{path}: the sdtool metadata lacks {key!r}; the file is damaged")
    return meta


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    try:
        out = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
        return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SdtoolError(
            f"{path}: tensors could not be read (corrupt or truncated?): {str(e).splitlines()[0][:120]}"
        ) from None


def build_model(meta: dict[str, Any]) -> nn.Module:
    """A fresh model with the structure recorded in `meta` (spec plus pruned shapes), weights uninitialised."""
    from sdtool.models import create_model
    from sdtool.models.shapes import apply_shapes

    spec = meta["model"]
    model = create_model(spec["name"], **spec.get("args", {}))
    try:
        apply_shapes(model, meta.get("shapes") or {})
    except KeyError as e:
        raise SdtoolError(
            f"checkpoint shapes name module {e.args[0]!r}, which model {spec['name']} lacks; "
            "the file is damaged or from an incompatible sdtool"
        ) from None
    return model


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from the file alone and load its weights; returns (model in eval mode, meta)."""
    meta = read_meta(path)
    model = build_model(meta)
    tensors = load_tensors(path)
    state = model.state_dict()
    missing = [k for k in state if k not in tensors]
    extra = [k for k in tensors if k not in state]
    wrong = [k for k in state if k in tensors and tensors[k].shape != state[k].shape]
    if missing or extra or wrong:
        what = (
            f"missing {missing[0]}"
            if missing
            else f"unexpected {extra[0]}"
            if extra
            else f"{wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, the spec needs {tuple(state[wrong[0]].shape)}"
        )
        raise SdtoolError(f"{path}: tensors do not fit the model spec ({what}); the file is damaged or edited")
    model.load_state_dict(tensors)
    return model.to(device).eval(), meta


def lineage_entry(
    command: str,
    recipe: dict | None,
    parent: str | Path | None,
    started: str,
    metrics: dict | None = None,
    parent_sha256: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One step of a checkpoint's history: command, resolved recipe, parent hash, times, metrics.

    `parent_sha256` may be given when it was computed earlier (a run hashes its parent once, at its start).
    """
    entry = {
        "command": command,
        "sdtool_version": __version__,
        "recipe": recipe,
        "parent": str(parent) if parent else None,
        "parent_sha256": parent_sha256 or (sha256(parent) if parent else None),
        "started": started,
        "ended": now(),
        "metrics": metrics or {},
    }
    entry.update(extra)
    return entry


def input_size(meta: dict[str, Any]) -> int:
    """The square input side the checkpoint's network expects (32 when the file does not say)."""
    return int((meta.get("input") or {}).get("size") or 32)


def derived_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata a checkpoint derived from this one carries over; `save` fills in version, spec and shapes."""
    return {k: v for k, v in meta.items() if k not in ("format_version", "sdtool_version", "model", "shapes")}


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """`sdtool inspect`: the metadata, parameter count, exits and file size (tensors are validated too)."""
    model, meta = load(path)
    return {
        "path": str(path),
        "file_size": Path(path).stat().st_size,
        "sha256": sha256(path),
        "parameters": sum(p.numel() for p in model.parameters()),
        "exits": getattr(model, "num_exits", 1),
        "meta": meta,
    }
