"""`sdtool export`: the whole multi-exit net, or one exit as a compact standalone model, as a file.

Formats:
  * safetensors - an sdtool checkpoint (weights + JSON metadata). With `--exit K` the model is the
                  `truncated` spec (models/truncate.py): only the stages, attention, head and
                  classifier exit K needs; `sdtool profile`, `eval` and `export` take it like any
                  checkpoint.
  * pt2         - `torch.export.export` + `torch.export.save` (TorchScript is deprecated in this
                  torch); load with `torch.export.load(path).module()`.
  * onnx        - `torch.onnx.export(..., dynamo=True)`; needs the optional extra `sdtool[onnx]`.
pt2 and onnx graphs take a normalized float batch (N, 3, S, S) with a dynamic batch size and return
the logits only: one tensor for a single exit, else a tuple shallow to deep. The input spec (size,
mean, std), class names and exit are embedded as JSON (pt2: extra file `sdtool.json`; onnx: model
metadata `sdtool`). Every export is loaded back and run on random inputs against PyTorch; the
largest difference is reported.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdtool import checkpoint, outputs
from sdtool.choices import FORMATS
from sdtool.errors import SdtoolError
from sdtool.meta import CheckpointMeta
from sdtool.models.multi_exit import MultiExitNet
from sdtool.onnx_graphs import require_onnx


class LogitsOnly(nn.Module):
    """Graph-friendly wrapper: tensors out (logits per exit), the pooled features dropped."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        logits, _ = self.net(x)
        return logits[0] if len(logits) == 1 else tuple(logits)


def _outputs(y) -> list[torch.Tensor]:
    return list(y) if isinstance(y, (tuple, list)) else [y]


def _embedded_meta(meta: CheckpointMeta, model: MultiExitNet, exit: int | None) -> dict:  # noqa: A002
    names = ["logits"] if model.num_exits == 1 else [f"logits_exit{k + 1}" for k in range(model.num_exits)]
    return {
        "sdtool_version": meta.sdtool_version,
        "model": model.spec,
        "exit": exit,
        "outputs": names,
        "num_classes": meta.num_classes,
        "class_names": meta.class_names,
        "input": meta.input.to_json() if meta.input else None,
        "layout": "NCHW float32, normalized: (pixel/255 - mean) / std",
    }


def _save_pt2(wrapper: nn.Module, x: torch.Tensor, out: Path, extra: dict):
    batch = torch.export.Dim("batch", min=1, max=65536)
    ep = torch.export.export(wrapper, (x,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(ep, buf, extra_files={"sdtool.json": json.dumps(extra)})
    checkpoint.atomic_write_bytes(out, buf.getvalue())
    return ep


def _save_onnx(wrapper: nn.Module, x: torch.Tensor, out: Path, extra: dict) -> None:
    import contextlib
    import warnings

    import onnx

    # The exporter writes its file into a temporary folder beside `out` (the system's temporary folder
    # may be small); a folder that cannot be written is the user's to fix, not an exporter failure.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = tempfile.TemporaryDirectory(dir=out.parent)
    except OSError as e:
        raise SdtoolError(
            f"--out {out}: cannot write in {out.parent} ({outputs.reason(e)}); choose another folder"
        ) from None
    with tmpdir as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter prints progress lines and warnings
        f = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(
                wrapper,
                (x,),
                str(f),
                dynamo=True,
                input_names=["input"],
                output_names=extra["outputs"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                external_data=False,
            )
        except Exception as e:  # a failed write (disk full) wrapped by the exporter: name the folder
            err = outputs.os_error(e)
            if err is None:
                raise
            raise outputs.write_error(out, err) from None
        proto = onnx.load(str(f))
    onnx.helper.set_model_props(proto, {"sdtool": json.dumps(extra)})
    checkpoint.atomic_write_bytes(out, proto.SerializeToString())


def _check(fmt: str, out: Path, wrapper: nn.Module, size: int, program=None) -> dict:
    """Run the export on random inputs and compare with the PyTorch model.

    pt2 is checked through the exported program that was serialised, not by reading the archive back:
    `torch.export.load` unpickles, and sdtool never unpickles a file.
    """
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _outputs(wrapper(x))
        if fmt == "safetensors":
            got, runtime = _outputs(LogitsOnly(checkpoint.load(out)[0])(x)), "sdtool (safetensors)"
        elif fmt == "pt2":
            got, runtime = _outputs(program.module()(x)), "torch.export (the serialised program)"
        else:
            import onnxruntime as ort

            sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = [torch.from_numpy(a) for a in sess.run(None, {"input": x.numpy()})]
            runtime = f"onnxruntime {ort.__version__}"
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got, strict=True))
    same = all(bool((a.argmax(1) == b.argmax(1)).all()) for a, b in zip(ref, got, strict=True))
    return {"runtime": runtime, "inputs": x.shape[0], "max_abs_diff": diff, "same_argmax": same}


def export(
    path: str,
    out: str,
    fmt: str = "safetensors",
    exit: int | None = None,  # noqa: A002
    check: bool = True,
) -> dict:
    """Write checkpoint `path` (or its exit `exit`, 1-based) to `out` in format `fmt`; see the module doc."""
    started = checkpoint.now()
    if fmt not in FORMATS:
        raise SdtoolError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    outp = Path(out)
    if outp.resolve() == Path(path).resolve():
        raise SdtoolError(f"--out {out} is the checkpoint being exported; choose another path")
    # Before any work: the file holds the source's tensors at most (fewer with --exit), in any format.
    outputs.check_file(outp, "--out", need_bytes=outputs.source_size(path))
    ckpt = checkpoint.load_checkpoint(path)
    model, meta = ckpt.model, ckpt.meta
    k_all = model.num_exits
    if exit is not None and not 1 <= exit <= k_all:
        raise SdtoolError(f"--exit {exit} is out of range; {path} has exits 1..{k_all}")
    if exit is not None:
        from sdtool.models.truncate import truncate

        model = truncate(model, exit - 1).eval()
    size = meta.input_size
    wrapper = LogitsOnly(model).eval()
    program = None
    if fmt == "safetensors":
        # One exit alone: the thresholds and metrics described the multi-exit net, not this exit.
        changes: dict[str, Any] = {"thresholds": None, "metrics": {}} if exit is not None else {}
        exported = {"exit": exit, "of_exits": k_all, "format": fmt}
        command = f"export --exit {exit}" if exit else "export"
        ckpt.derive(command, model, started=started, lineage={"exported": exported}, **changes).save(outp)
    else:
        extra = _embedded_meta(meta, model, exit)
        x = torch.randn(2, 3, size, size)
        try:
            program = (_save_pt2 if fmt == "pt2" else _save_onnx)(wrapper, x, outp, extra)
        except SdtoolError:
            raise
        except Exception as e:  # noqa: BLE001 - an exporter failure is a limitation to report in one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise SdtoolError(
                f"{fmt} export failed ({type(e).__name__}: {first}); try --format safetensors "
                "or pt2, or report this model"
            ) from None
    rep = {
        "checkpoint": str(path),
        "out": str(outp),
        "format": fmt,
        "exit": exit,
        "exits": model.num_exits,
        "source_exits": k_all,
        "model": model.spec,
        "parameters": sum(p.numel() for p in model.parameters()),
        "file_size": outp.stat().st_size,
        "input": meta.input.to_json() if meta.input else None,
        "check": _check(fmt, outp, wrapper, size, program) if check else None,
    }
    return rep
