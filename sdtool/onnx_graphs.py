"""ONNX graphs of the pieces early exit needs, cut from one export of the whole multi-exit network.

The network is exported once (`torch.onnx.export(..., dynamo=True)`, dynamic batch axis) with every
exit's stage output and logits as graph outputs:

    input -> [stages of exit 1] -> h1 -> [attention, head, classifier 1] -> logits1
          h1 -> [stages of exit 2] -> h2 -> ... -> hK -> [pooling, classifier K] -> logitsK

and each piece is then extracted from that graph by tensor names (`onnx.utils.Extractor`): exporting
is the slow part (seconds), extracting takes milliseconds, and every piece comes from the same
traced network. Pieces, for exit k (1-based):
  * step k        - h(k-1) -> (hk, logitsk): exit k's stages and its head fused in one graph, so a
                    sample costs one session run per exit it reaches (the last step: logitsK only);
  * stages k      - h(k-1) -> hk: the stages alone, for an exit that never answers (its head is not
                    run) and for timing a head as (step time - stages time);
  * deepest       - input -> logitsK: the deepest exit alone, early exit's reference in the same engine.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from sdtool.errors import SdtoolError

if TYPE_CHECKING:
    from sdtool.models.multi_exit import MultiExitNet

ONNX_EXTRA = "ONNX export needs the optional packages onnx, onnxscript and onnxruntime: pip install sdtool[onnx]"
INPUT = "input"


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise SdtoolError(ONNX_EXTRA) from None


def h_name(k: int) -> str:
    """Stage output of exit k (0-based) as a graph tensor name (1-based in the name)."""
    return f"h{k + 1}"


def logits_name(k: int) -> str:
    return f"logits{k + 1}"


class _AllOutputs(nn.Module):
    """(h1, logits1, ..., h(K-1), logits(K-1), logitsK): every tensor a piece boundary needs."""

    def __init__(self, net: MultiExitNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        outs, h = [], x
        for k in range(self.net.num_exits):
            h = self.net.stages_to_exit(h, k)
            z, _ = self.net.exit_output(k, h)
            outs += [z] if k == self.net.num_exits - 1 else [h, z]
        return tuple(outs)


def export_proto(model: nn.Module, size: int, channels: int = 3):
    """The whole multi-exit net as one ONNX ModelProto whose outputs are named as above (CPU, float32)."""
    require_onnx()
    import onnx

    net = cast("MultiExitNet", model)
    k_all = net.num_exits
    names = [n for k in range(k_all - 1) for n in (h_name(k), logits_name(k))] + [logits_name(k_all - 1)]
    wrapper = _AllOutputs(net).eval()
    x = torch.randn(2, channels, size, size)
    with (
        tempfile.TemporaryDirectory() as tmp,
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
    ):  # the exporter prints progress lines
        warnings.simplefilter("ignore")
        f = Path(tmp) / "all.onnx"
        try:
            torch.onnx.export(
                wrapper,
                (x,),
                str(f),
                dynamo=True,
                input_names=[INPUT],
                output_names=names,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                external_data=False,
            )
        except Exception as e:  # noqa: BLE001 - an exporter failure is a limitation to report in one line
            from sdtool.outputs import os_error, reason

            err = os_error(e)
            if err is not None:  # the graph could not be written: the temporary folder's problem, not the model's
                raise SdtoolError(
                    f"cannot write the ONNX graph in the temporary folder {tmp} ({reason(err)}); "
                    "free space there or set TMPDIR to another folder"
                ) from None
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise SdtoolError(
                f"ONNX export failed ({type(e).__name__}: {first}); use the torch engine, or report this model"
            ) from None
        proto = onnx.load(str(f))
    if has_external_data(proto):
        raise SdtoolError("the exported graph references external data; export a smaller model or report this")
    return proto


def has_external_data(proto) -> bool:
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)


@dataclass
class Pieces:
    """Serialized graphs (bytes) by piece name: step1..stepK, stages1..stages(K-1), deepest (= exit K
    alone), alone1..alone(K-1) (each shallow exit alone) and full (every exit's outputs)."""

    graphs: dict[str, bytes]
    num_exits: int
    identity: dict | None = None  # embedded in the step graphs; a bundle's manifest must name the same source

    def step(self, k: int) -> bytes:
        return self.graphs[f"step{k + 1}"]

    def stages(self, k: int) -> bytes:
        return self.graphs[f"stages{k + 1}"]


def cut_pieces(proto, num_exits: int, identity: dict | None = None) -> Pieces:
    """Extract every piece from the all-outputs graph; `identity` (JSON-able) is embedded in each as
    the metadata `sdtool_bundle_step` together with the piece's step number."""
    from onnx import helper, utils

    ex = utils.Extractor(proto)
    graphs: dict[str, bytes] = {}

    def add(name: str, inputs: list[str], outputs: list[str], step: int | None) -> None:
        sub = ex.extract_model(inputs, outputs)
        props = {"sdtool_piece": name}
        if identity is not None and step is not None:
            props["sdtool_bundle_step"] = json.dumps({**identity, "step": step, "piece": name})
        helper.set_model_props(sub, props)
        graphs[name] = sub.SerializeToString()

    for k in range(num_exits):
        src = INPUT if k == 0 else h_name(k - 1)
        if k == num_exits - 1:
            add(f"step{k + 1}", [src], [logits_name(k)], k + 1)
        else:
            add(f"step{k + 1}", [src], [h_name(k), logits_name(k)], k + 1)
            add(f"stages{k + 1}", [src], [h_name(k)], k + 1)
    add("deepest", [INPUT], [logits_name(num_exits - 1)], None)
    for k in range(num_exits - 1):  # each shallow exit alone (profile), never shipped in a bundle
        add(f"alone{k + 1}", [INPUT], [logits_name(k)], None)
    graphs["full"] = proto.SerializeToString()
    return Pieces(graphs, num_exits, identity)


def model_pieces(model: nn.Module, size: int, identity: dict | None = None) -> Pieces:
    """Export `model` once and cut it into pieces (see the module doc)."""
    from sdtool.models.multi_exit import MultiExitNet

    if not isinstance(model, MultiExitNet):
        raise SdtoolError("early-exit graphs need an sdtool multi-exit model")
    return cut_pieces(export_proto(model.eval(), size), model.num_exits, identity)
