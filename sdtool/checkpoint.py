"""The shared checkpoint format: one `.safetensors` file, weights plus a JSON metadata document.

    tensors            the model's state dict
    __metadata__       {"sdtool": JSON} with format_version, sdtool_version, model spec, num_classes,
                       class_names, input spec, shapes (pruned modules), thresholds, val split, lineage
                       (typed as `sdtool.meta.CheckpointMeta`)

    ckpt = load_checkpoint("runs/sd/best.safetensors")      # Checkpoint(model, meta, path, sha256)
    ckpt.meta.num_classes, ckpt.meta.input_size, ckpt.model.num_exits
    ckpt.derive("prune", model=smaller, metrics=m).save("pruned.safetensors")

Loading never unpickles: safetensors holds raw tensors and the metadata is JSON. Before any model is built
with real memory or any tensor is read, the metadata is checked field by field (types, signs, hard caps),
and the structure it describes against this machine's memory and against the tensors' names, shapes and
dtypes in the safetensors header. Writes go to a temporary file in the target folder, are fsynced, then
renamed, so a crash never leaves a half-written file under the final name. Every command that writes a
checkpoint derives it from its parent with `Checkpoint.derive`, so each records its step the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from sdtool import __version__, memory
from sdtool.errors import SdtoolError
from sdtool.fileio import META_KEY, atomic_write_bytes, load_tensors, now, save_tensors, sha256
from sdtool.meta import CheckpointMeta, DataRef, InputSpec, LineageEntry, ModelSpec, Thresholds, ValSplit

if TYPE_CHECKING:
    from sdtool.models.multi_exit import MultiExitNet

__all__ = [
    "Checkpoint",
    "CheckpointMeta",
    "DataRef",
    "InputSpec",
    "LineageEntry",
    "ModelSpec",
    "Thresholds",
    "ValSplit",
    "check_checkpoint",
    "load_checkpoint",
    "load_meta",
    "load",
    "save",
    "atomic_write_bytes",
    "load_tensors",
    "now",
    "save_tensors",
    "sha256",
    "read_meta",
]

FORMAT_VERSION = 1
# safetensors' dtype names for the dtypes a state dict holds.
_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.bool: "BOOL",
}


def _read_raw(path: Path) -> tuple[Any, dict[str, tuple[list[int], str]]]:
    """The JSON metadata and the tensor header ({name: (shape, dtype)}) of a file; nothing is allocated."""
    if not path.is_file():
        raise SdtoolError(f"checkpoint {path} not found; pass the path of an sdtool .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            header = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
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
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nested deeper than Python's stack
        raise SdtoolError(f"{path}: the sdtool metadata is not valid JSON; the file is damaged") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise SdtoolError(f"{path}: the sdtool metadata has no format_version; the file is damaged")
    if version > FORMAT_VERSION:
        raise SdtoolError(
            f"{path} was written by a newer sdtool (format {version}, this one reads up to "
            f"{FORMAT_VERSION}); upgrade sdtool"
        )
    return meta, header


def load_meta(path: str | Path) -> CheckpointMeta:
    """The typed metadata of an sdtool file, checked field by field; raises SdtoolError for anything else."""
    raw, _ = _read_raw(Path(path))
    return CheckpointMeta.from_json(raw, str(path))


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata document of an sdtool file as JSON (checked like `load_meta`)."""
    raw, _ = _read_raw(Path(path))
    CheckpointMeta.from_json(raw, str(path))
    return raw


def _as_meta(meta: CheckpointMeta | dict[str, Any], where: str = "metadata") -> CheckpointMeta:
    return meta if isinstance(meta, CheckpointMeta) else CheckpointMeta.from_json(meta, where)


def build_model(meta: CheckpointMeta | dict[str, Any]) -> MultiExitNet:
    """A fresh model with the structure recorded in `meta` (spec plus pruned shapes), weights uninitialised."""
    from sdtool.models import create_model
    from sdtool.models.multi_exit import MultiExitNet
    from sdtool.models.shapes import apply_shapes

    m = _as_meta(meta)
    model = create_model(m.model.name, **m.model.args)
    if not isinstance(model, MultiExitNet):
        raise SdtoolError(
            f"model builder {m.model.name!r} returned a {type(model).__name__}, not a MultiExitNet; "
            "a registered builder must return one (wrap your network with sdtool.models.wrap_model)"
        )
    try:
        apply_shapes(model, m.shapes)
    except KeyError as e:
        raise SdtoolError(
            f"checkpoint shapes name module {e.args[0]!r}, which model {m.model.name} lacks; "
            "the file is damaged or from an incompatible sdtool"
        ) from None
    return model


def _check_tensors(where: str, expected: dict[str, torch.Tensor], header: dict[str, tuple[list[int], str]]) -> None:
    """The file's tensors must be exactly the model's: same names, shapes and dtypes (nothing is cast)."""
    missing = [k for k in expected if k not in header]
    extra = [k for k in header if k not in expected]
    wrong = [k for k in expected if k in header and list(expected[k].shape) != header[k][0]]
    dtype = [k for k in expected if k in header and _DTYPES.get(expected[k].dtype) != header[k][1]]
    if missing or extra or wrong or dtype:
        if missing:
            what = f"missing {missing[0]}"
        elif extra:
            what = f"unexpected {extra[0]}"
        elif wrong:
            what = (
                f"{wrong[0]} has shape {tuple(header[wrong[0]][0])}, the spec needs {tuple(expected[wrong[0]].shape)}"
            )
        else:
            what = f"{dtype[0]} is {header[dtype[0]][1]}, the model holds {_DTYPES.get(expected[dtype[0]].dtype)}"
        raise SdtoolError(f"{where}: tensors do not fit the model spec ({what}); the file is damaged or edited")


class Checkpoint:
    """A model with its metadata, and where it came from (`path` and its `sha256`, None until saved).

    `sha256` is computed on first use: loading a large file does not pay for hashing it unless a child
    is derived from it.
    """

    def __init__(
        self, model: MultiExitNet, meta: CheckpointMeta, path: str | Path | None = None, sha256: str | None = None
    ):
        self.model, self.meta = model, meta
        self.path = Path(path) if path is not None else None
        self._sha256 = sha256

    @property
    def sha256(self) -> str | None:
        if self._sha256 is None and self.path is not None:
            self._sha256 = sha256(self.path)
        return self._sha256

    def __repr__(self) -> str:
        return f"Checkpoint({self.meta.model.name}, {self.model.num_exits} exits, path={self.path})"

    def derive(
        self,
        command: str,
        model: MultiExitNet | None = None,
        *,
        recipe: dict[str, Any] | None = None,
        step_metrics: dict[str, Any] | None = None,
        started: str | None = None,
        lineage: dict[str, Any] | None = None,
        **changes: Any,
    ) -> Checkpoint:
        """A child of this checkpoint made by `command`: `model` (default: the same), this metadata with
        `changes` applied (CheckpointMeta fields, e.g. `thresholds=` or `metrics=`), and one lineage entry
        naming this checkpoint as the parent, with `recipe`, `step_metrics`, the command line and the
        `lineage` extras. Save it with `.save(path)`."""
        entry = LineageEntry(
            command=command,
            sdtool_version=__version__,
            recipe=recipe,
            parent=str(self.path) if self.path is not None else None,
            parent_sha256=self.sha256,
            started=started or now(),
            ended=now(),
            metrics=step_metrics or {},
            extra={"argv": sys.argv[1:], **(lineage or {})},
        )
        meta = self.meta.replace(lineage=[*self.meta.lineage, entry], **changes)
        return Checkpoint(model if model is not None else self.model, meta)

    def save(self, path: str | Path) -> Checkpoint:
        """Write atomically (refusing a structure that would not reload); returns the saved checkpoint."""
        from sdtool.models.shapes import shape_changes

        spec = self.model.spec
        meta = self.meta.replace(
            format_version=FORMAT_VERSION,
            sdtool_version=__version__,
            model=ModelSpec.from_json(spec, "the model's spec"),
            shapes=shape_changes(self.model, spec),
        )
        state = self.model.state_dict()
        _check_rebuild(meta, state)
        save_tensors(path, state, meta.to_json())
        return Checkpoint(self.model, meta, path)

    def data(
        self,
        data: str | None = None,
        overrides: list[str] | None = None,
        split: str = "test",
        train: bool = False,
        *,
        allow_other_data: bool = False,
    ):
        """The data to run this checkpoint on, checked against it (see `sdtool.checkpoint_data`); a data set
        other than the recorded one is refused unless `allow_other_data`."""
        from sdtool.checkpoint_data import checkpoint_data

        return checkpoint_data(self, data, overrides, split, train, allow_other_data=allow_other_data)


def _check_rebuild(meta: CheckpointMeta, state: dict[str, torch.Tensor]) -> None:
    """Refuse to write a file that would not load: rebuild the structure from the metadata (shapes only,
    on the meta device) and compare every tensor's shape and dtype with the model's."""
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
        elif cast := next((k for k in state if state[k].dtype != rebuilt[k].dtype), None):
            # Loading never casts (a tensor of another dtype is refused), so neither may saving.
            raise SdtoolError(
                f"{cast} is {state[cast].dtype} but the model's builder makes {rebuilt[cast].dtype}; convert the "
                "model back (e.g. model.float()) before saving it; nothing was written"
            )
    if problem:
        raise SdtoolError(
            f"this model's structure cannot be recorded in the checkpoint format ({problem}); "
            "nothing was written. Please report it with the model and the command"
        )


def _skeleton(meta: CheckpointMeta, where: str) -> MultiExitNet:
    """The structure on PyTorch's meta device: shapes only, nothing allocated however large the sizes."""
    try:
        with torch.device("meta"):
            return build_model(meta)
    except SdtoolError as e:  # a builder's own check (e.g. model.exits): say which file
        raise SdtoolError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a builder handed sizes it never expected (overflow, ...): the file's fault
        spec, first = json.dumps(meta.model.to_json()), (str(e).splitlines() or [""])[0][:120]
        raise SdtoolError(
            f"{where}: the model spec {spec if len(spec) <= 120 else spec[:117] + '...'} cannot be built "
            f"({type(e).__name__}: {first}); the file is damaged or was edited"
        ) from e


def check_checkpoint(path: str | Path) -> CheckpointMeta:
    """The typed metadata, after every check `load_checkpoint` makes before it builds the model or reads a
    tensor (metadata, structure, memory, tensor header); cheap, so a command can call it before slow work."""
    raw, header = _read_raw(Path(path))
    meta = CheckpointMeta.from_json(raw, str(path))
    skeleton = _skeleton(meta, str(path))
    memory.check_model_fits(str(path), meta, skeleton)
    _check_tensors(str(path), skeleton.state_dict(), header)
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from the file alone and load its weights (eval mode, on `device`).

    Order matters for damaged or hostile files: everything `check_checkpoint` checks (metadata, structure on
    the meta device, memory, tensor header) comes first; only then is the real model built and tensors read.
    """
    path = Path(path)
    meta = check_checkpoint(path)
    model = build_model(meta)
    model.load_state_dict(load_tensors(path))
    return Checkpoint(model.to(device).eval(), meta, path)


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[MultiExitNet, dict[str, Any]]:
    """`(model, metadata as JSON)`: the interface before `load_checkpoint`, kept for Python users."""
    ckpt = load_checkpoint(path, device)
    return ckpt.model, ckpt.meta.to_json()


def save(path: str | Path, model: MultiExitNet, meta: CheckpointMeta | dict[str, Any]) -> None:
    """Save `model` with `meta` (typed or its JSON; the spec, shapes and versions are filled in).

    Prefer `Checkpoint.derive(...).save(path)`, which also records the step in the lineage."""
    m = (
        meta
        if isinstance(meta, CheckpointMeta)
        else CheckpointMeta.from_json({"model": model.spec, **meta}, "metadata to save")
    )
    Checkpoint(model, m).save(path)


def lineage_entry(
    command: str,
    recipe: dict | None,
    parent: str | Path | None,
    started: str,
    metrics: dict | None = None,
    parent_sha256: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One step of a checkpoint's history as JSON (for Python users building metadata by hand)."""
    return LineageEntry(
        command=command,
        sdtool_version=__version__,
        recipe=recipe,
        parent=str(parent) if parent else None,
        parent_sha256=parent_sha256 or (sha256(parent) if parent else None),
        started=started,
        ended=now(),
        metrics=metrics or {},
        extra=extra,
    ).to_json()


def input_size(meta: CheckpointMeta | dict[str, Any]) -> int:
    """The square input side the checkpoint's network expects (32 when the file does not say)."""
    if isinstance(meta, CheckpointMeta):
        return meta.input_size
    return int((meta.get("input") or {}).get("size") or 32)


def derived_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata a checkpoint derived from this one carries over; `save` fills in version, spec and shapes."""
    return {k: v for k, v in meta.items() if k not in ("format_version", "sdtool_version", "model", "shapes")}


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """`sdtool inspect`: the metadata, parameter count, exits and file size (tensors are validated too)."""
    ckpt = load_checkpoint(path)
    return {
        "path": str(path),
        "file_size": Path(path).stat().st_size,
        "sha256": ckpt.sha256,
        "parameters": sum(p.numel() for p in ckpt.model.parameters()),
        "exits": ckpt.model.num_exits,
        "meta": ckpt.meta.to_json(),
    }
