"""Files that survive crashes: atomic writes (temporary file, fsync, rename), hashing, tensor files.

A crash, a kill or a full disk never leaves a half-written file under its final name; the error a user
sees names the file and what to do.
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

from sdtool.errors import SdtoolError

META_KEY = "sdtool"  # the safetensors metadata key that holds sdtool's JSON document


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def new_file_mode() -> int:
    """0o666 less the process's umask (usually 0644): what open() would give a new file."""
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # elsewhere the umask can only be read by setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


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
            if hasattr(os, "fchmod"):  # mkstemp makes the file 0600; give it the mode open() gives any new file
                os.fchmod(f.fileno(), new_file_mode())
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


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    try:
        out = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a dict: keys() is its API)
                out[k] = f.get_tensor(k)
        return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SdtoolError(
            f"{path}: tensors could not be read (corrupt or truncated?): {str(e).splitlines()[0][:120]}"
        ) from None


def read_state_dict(path: str | Path, what: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file or of a `.pth`/`.pt` state dict, read with
    `torch.load(weights_only=True)` only, so a pickle that names any other object is refused (`what`
    prefixes the error, e.g. "model.pretrained: "). Training scripts' wrappers ({"state_dict": ...},
    {"model": ...}) and DistributedDataParallel's `module.` prefix are undone."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return load_tensors(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every unpickling failure means "not a plain state dict"
        first = (str(e).splitlines() or [type(e).__name__])[0][:100]
        raise SdtoolError(
            f"{what}{p} is not a plain state dict loadable with weights_only=True ({first}); "
            "save it with torch.save(model.state_dict()) or as .safetensors"
        ) from None
    for key in ("state_dict", "model"):  # common wrappers of training scripts
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise SdtoolError(
            f"{what}{p} does not hold a state dict (a mapping of names to tensors); save model.state_dict()"
        )
    return {str(k).removeprefix("module."): v for k, v in obj.items()}
