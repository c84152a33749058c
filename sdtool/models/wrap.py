"""Exits on any model: cut an `nn.Module` into stages after named modules and wrap it as a MultiExitNet.

    net = wrap_model(torchvision.models.resnet50(num_classes=10), ["layer1", "layer2", "layer3"],
                     num_classes=10)
    logits, feats = net(x)                 # 4 exits, shallow to deep

How: the module is traced with torch.fx (the modules named in `exits_after` are kept whole), the
graph is cut right after each named module, and each piece becomes a stage (`torch.fx.GraphModule`
holding the original submodules under their original names, so `stages.1.layer2.0.conv1.weight` is
the original `layer2.0.conv1.weight`; nothing is copied). A dry run at `input_size` gives each stage's
channel width and downsampling factor, which the exits' heads follow.

The final exit replaces the model's tail: everything after its last 4-D feature map (global pooling,
flatten, dropout, classifier) becomes global average pooling and a new Linear layer; trailing adaptive
/ global pooling is skipped first, so the last stage ends at the real feature map. When the tail was a
single Linear of the right size, its weights are copied into the final classifier.

Limits (each fails with one line saying which):
  * the forward must be traceable by torch.fx: no control flow that depends on tensor values;
  * a cut must be a bottleneck: nothing computed before it may be used after it other than the named
    module's output (a skip connection crossing the cut is refused; cut after the whole block);
  * exit points and the last feature map must be 4-D (N, C, H, W) tensors; one input tensor.

Checkpoints store a registry name and JSON arguments, so a wrapped model is saved and reloaded through
a registered builder: `torchvision_wrapped(arch, exits_after, ...)` for torchvision's models
(`model.name: torchvision:resnet50` in a recipe), `timm_wrapped` for timm's (`timm:NAME`,
sdtool/models/timm_wrap.py), or your own `@register_model` function that builds
your network and returns `wrap_model(...)` of it.
"""

from __future__ import annotations

import difflib
from itertools import pairwise
from typing import cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from sdtool.errors import SdtoolError
from sdtool.models.mobile import ChannelShuffle, prunable_shuffles
from sdtool.models.multi_exit import MultiExitNet
from sdtool.models.registry import register_model

_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_GLOBAL_POOL_FNS = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d)


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps the exit modules whole (one node each), so cuts fall on their outputs."""

    def __init__(self, keep: set[str], leaves: tuple[type[nn.Module], ...] = ()):
        super().__init__()
        self.keep = keep
        self.leaves: tuple[type[nn.Module], ...] = (ChannelShuffle, *leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # A ChannelShuffle stays one module so that the pruner finds it (see sdtool/prune.py). `leaves` are a
        # library's layers that tracing would get wrong, e.g. timm's BatchNormAct2d, whose forward branches on
        # self.training: traced through, the training-mode branch would be frozen into the graph.
        return qualname in self.keep or isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module, exits_after: list[str], leaves: tuple[type[nn.Module], ...] = ()) -> fx.GraphModule:
    names = dict(module.named_modules())
    for name in exits_after:
        if name not in names or name == "":
            close = difflib.get_close_matches(name, [n for n in names if n], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SdtoolError(f"model.exits_after: {type(module).__name__} has no module {name!r}{hint}")
    if len(set(exits_after)) != len(exits_after):
        raise SdtoolError("model.exits_after lists a module twice; list each exit point once")
    try:
        graph = _Tracer(set(exits_after), leaves).trace(module)
    except Exception as e:  # noqa: BLE001 - any tracing failure means the same thing to the user
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise SdtoolError(
            f"cannot trace {type(module).__name__} with torch.fx ({first}); wrapping needs a "
            "forward without data-dependent control flow"
        ) from None
    return fx.GraphModule(module, graph)


def _is_global_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(cast(str, node.target)), _GLOBAL_POOLS)  # call_module: a module name
    return node.op == "call_function" and node.target in _GLOBAL_POOL_FNS


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _feature_end(gm: fx.GraphModule, order: dict[fx.Node, int]) -> fx.Node:
    """The last 4-D feature map the output depends on, before any trailing global pooling."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    seen, stack = set(), [out]
    while stack:  # ancestors of the output
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    cands = [n for n in seen if n.op not in ("output", "get_attr") and len(_shape(n) or ()) == 4]
    if not cands:
        raise SdtoolError(
            "the wrapped model computes no 4-D (N, C, H, W) feature map; exits need convolutional features"
        )
    node = max(cands, key=order.__getitem__)
    while _is_global_pool(gm, node) and node.all_input_nodes and len(_shape(node.all_input_nodes[0]) or ()) == 4:
        node = node.all_input_nodes[0]
    return node


def _stage(gm: fx.GraphModule, nodes: list[fx.Node], start: fx.Node | None, end: fx.Node, i: int) -> fx.GraphModule:
    """A GraphModule computing `end` from `start`'s value (or the input) with `nodes` (in order)."""
    g = fx.Graph()
    x = g.placeholder("x")
    env: dict[fx.Node, fx.Node] = {}
    inside = set(nodes)

    def arg(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n is start or (start is None and n.op == "placeholder"):
            return x
        if n.op == "get_attr":  # parameters used by functional ops: re-read in this stage
            env[n] = g.node_copy(n)
            return env[n]
        raise AssertionError(n)  # excluded by _check_cut

    for n in nodes:
        if n.op == "placeholder":
            continue
        if n.op == "get_attr" and n in inside:
            continue  # copied on first use
        env[n] = g.node_copy(n, arg)
    g.output(arg(end))
    if start is not None:
        # The exit head reads the previous stage's output too: an in-place op on it here would corrupt
        # the head's input and its saved tensors for backward (e.g. a ReLU(inplace=True) right after the cut).
        for n in x.users:
            if n.op == "call_module" and getattr(gm.get_submodule(cast(str, n.target)), "inplace", False):
                # Any module with an `inplace` flag (ReLU, Hardtanh, ...); nn.Module.__setattr__ is annotated
                # for tensors and modules only.
                gm.get_submodule(cast(str, n.target)).inplace = False  # type: ignore[assignment]
            elif n.op == "call_function" and n.kwargs.get("inplace"):
                n.kwargs = {**n.kwargs, "inplace": False}
    stage = fx.GraphModule(gm, g, class_name=f"Stage{i}")
    stage.graph.eliminate_dead_code()  # e.g. nodes of an auxiliary branch the stage output does not need
    stage.graph.lint()
    stage.recompile()
    # Drop submodules the pruned graph no longer calls, so each stage holds only its own weights.
    stage.delete_all_unused_submodules()
    return stage


def _check_cut(pieces: list[list[fx.Node]], ends: list[fx.Node], names: list[str]) -> None:
    """Every value a stage reads from outside must be the previous stage's end (or a parameter)."""
    where = {n: i for i, nodes in enumerate(pieces) for n in nodes}
    for i, nodes in enumerate(pieces):
        for n in nodes:
            for a in n.all_input_nodes:
                j = where.get(a, i)
                if j == i or a.op == "get_attr" or (i > 0 and a is ends[i - 1]):
                    continue
                what = "the input" if a.op == "placeholder" else f"{a.name!r}"
                raise SdtoolError(
                    f"cannot cut after {names[i - 1]!r}: {what}, computed before the cut, is used "
                    f"after it (a skip connection crosses it); cut after the module that closes it"
                )


def wrap_model(
    module: nn.Module,
    exits_after: list[str],
    num_classes: int,
    head: str = "byot",
    attention: bool = True,
    input_size: int = 32,
    exits: list[int] | None = None,
    leaf_modules: tuple[type[nn.Module], ...] = (),
) -> MultiExitNet:
    """`module` cut after each module in `exits_after` (qualified names, e.g. "layer2" or "features.6").

    Stage k (1-based) ends at exits_after[k-1]; the last stage ends at the model's last feature map.
    `exits` chooses which stages get an exit (1-based; None = all, [] = only the final one); the
    stage cuts themselves never change what the network computes. Modules of the `leaf_modules` types are
    traced as one call each, not through (a library's no-trace layers, e.g. timm's get_notrace_modules()).
    """
    if num_classes is None or num_classes < 1:
        raise SdtoolError("model.num_classes must be a positive integer (or null to take the data set's)")
    exits_after = list(exits_after or [])
    gm = _trace(module, exits_after, tuple(leaf_modules))
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    if sum(n.op == "placeholder" for n in nodes) != 1:
        raise SdtoolError(f"{type(module).__name__}.forward takes several inputs; wrapping needs one image batch")
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = module.training
    module.eval()  # the dry run must not touch batch-norm statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(1, 3, input_size, input_size, device=device))
    except Exception as e:  # noqa: BLE001
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise SdtoolError(
            f"{type(module).__name__} does not run on 3x{input_size}x{input_size} inputs ({first}); "
            "set the input size it expects"
        ) from None
    finally:
        module.train(was_training)

    cut_nodes = []
    for name in exits_after:
        calls = [n for n in nodes if n.op == "call_module" and n.target == name]
        if len(calls) != 1:
            raise SdtoolError(
                f"model.exits_after: module {name!r} is called {len(calls)} times in the forward; "
                "an exit point must run exactly once"
            )
        cut_nodes.append(calls[0])
    cut_nodes.sort(key=order.__getitem__)
    names = [n.target for n in cut_nodes]
    end = _feature_end(gm, order)
    for n in cut_nodes:
        if len(_shape(n) or ()) != 4:
            raise SdtoolError(
                f"model.exits_after: {n.target!r} outputs shape {_shape(n)}; exits need 4-D (N, C, H, W) feature maps"
            )
    if cut_nodes and order[end] <= order[cut_nodes[-1]]:
        raise SdtoolError(
            f"model.exits_after: {names[-1]!r} is not followed by any feature layer; the last stage would be empty"
        )
    ends = cut_nodes + [end]
    bounds = [-1] + [order[n] for n in ends]
    pieces = [nodes[a + 1 : b + 1] for a, b in pairwise(bounds)]
    _check_cut(pieces, ends, names)
    stages = [_stage(gm, piece, ends[i - 1] if i else None, ends[i], i) for i, piece in enumerate(pieces)]

    end_shapes = [cast(tuple[int, ...], _shape(n)) for n in ends]  # all 4-D (checked above)
    sizes = [input_size] + [s[-1] for s in end_shapes]
    strides = [max(1, round(a / b)) if b else 1 for a, b in pairwise(sizes)]
    widths = [s[1] for s in end_shapes]
    labels = [f"..{names[0]}" if names else "all"] + [f"{a}..{b}" for a, b in pairwise(names)]
    if names:
        labels.append(f"{names[-1]}..{end.target if end.op == 'call_module' else end.name}")
    net = MultiExitNet(
        stages, widths, num_classes, exits=exits, head=head, attention=attention, strides=strides, stage_names=labels
    )
    _copy_classifier(gm, end, order, net)
    return net


def _copy_classifier(gm: fx.GraphModule, end: fx.Node, order: dict, net: MultiExitNet) -> None:
    """Reuse the model's own classifier for the final exit when its tail is one Linear of the right size."""
    tail = [n for n in gm.graph.nodes if order[n] > order[end] and n.op == "call_module"]
    linears = [
        cast(nn.Linear, gm.get_submodule(cast(str, n.target)))
        for n in tail
        if isinstance(gm.get_submodule(cast(str, n.target)), nn.Linear)
    ]
    fc = cast(nn.Linear, net.classifiers[-1])
    if len(linears) == 1 and linears[0].weight.shape == fc.weight.shape and linears[0].bias is not None:
        with torch.no_grad():
            fc.weight.copy_(linears[0].weight)
            fc.bias.copy_(linears[0].bias)


# The torchvision families whose layout is known, by name prefix: (the default exit points, the module ending
# the last stage or None where it is not recorded). The exit points are model.exits_after's default (other
# families need it set); with the last stage's module they name a torchvision teacher's stage outputs for
# feature distillation in `sdtool distill` (ResNet families only; the others cannot teach features).
_TORCHVISION_LAYOUTS: dict[str, tuple[list[str], str | None]] = {
    "resnet": (["layer1", "layer2", "layer3"], "layer4"),
    "resnext": (["layer1", "layer2", "layer3"], "layer4"),
    "wide_resnet": (["layer1", "layer2", "layer3"], "layer4"),
    "mobilenet_v2": (["features.3", "features.6", "features.13"], None),
    "shufflenet_v2": (["stage2", "stage3"], None),
}


def _layout(arch: str) -> tuple[list[str], str | None] | None:
    return next((v for k, v in _TORCHVISION_LAYOUTS.items() if arch.startswith(k)), None)


def default_exits(arch: str) -> list[str] | None:
    """The default exit points of torchvision:`arch` (model.exits_after); None when its layout is not known."""
    layout = _layout(arch)
    return list(layout[0]) if layout is not None else None


def torchvision_stages(arch: str) -> list[str] | None:
    """The modules ending each stage of torchvision:`arch`, shallow to deep (a teacher's feature maps);
    None when they are not known."""
    layout = _layout(arch)
    if layout is None or layout[1] is None:
        return None
    return [*layout[0], layout[1]]


def torchvision_builder(arch: str):
    """torchvision's builder for `arch`; an unknown name fails with one line (and a close match)."""
    import torchvision

    try:
        return torchvision.models.get_model_builder(arch)
    except ValueError:
        close = difflib.get_close_matches(arch, torchvision.models.list_models(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SdtoolError(f"torchvision has no model {arch!r}{hint}; see torchvision.models.list_models()") from None


@register_model
def torchvision_wrapped(
    arch: str,
    exits_after: list[str] | None = None,
    num_classes: int = 1000,
    head: str = "byot",
    attention: bool = True,
    exits: list[int] | None = None,
    input_size: int = 32,
):
    """torchvision.models.<arch>(weights=None, num_classes=...) with exits after `exits_after` (wrap_model)."""
    builder = torchvision_builder(arch)
    if exits_after is None:
        exits_after = default_exits(arch)
        if exits_after is None:
            raise SdtoolError(
                f"torchvision:{arch} has no default exit points; set model.exits_after to the names "
                "of the modules after which exits go"
            )
    try:
        module = builder(weights=None, num_classes=num_classes)
    except TypeError as e:
        raise SdtoolError(f"torchvision:{arch} cannot be built with num_classes={num_classes}: {e}") from None
    prunable_shuffles(module)
    return wrap_model(module, exits_after, num_classes, head, attention, input_size, exits)
