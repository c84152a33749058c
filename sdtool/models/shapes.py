"""Structural shapes of a model as plain JSON, so a pruned network can be rebuilt without pickle.

Pruning changes channel counts inside modules. A checkpoint stores, for every module whose shape
differs from a fresh build of the model spec, its constructor-relevant sizes; `apply_shapes` resizes a
fresh build to match before the weights are loaded. Torch-Pruning's own `tp.state_dict` is not used
because it pickles module attributes.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch
from torch import nn


def _shape_of(m: nn.Module) -> dict | None:
    if isinstance(m, nn.Conv2d):
        return {"type": "conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
    if isinstance(m, nn.modules.batchnorm._BatchNorm):  # SyncBatchNorm too
        return {"type": "batchnorm2d", "num_features": m.num_features}
    if isinstance(m, nn.Linear):
        return {"type": "linear", "in_features": m.in_features, "out_features": m.out_features}
    return None


def module_shapes(model: nn.Module) -> dict[str, dict]:
    return {name: s for name, m in model.named_modules() if (s := _shape_of(m)) is not None}


@lru_cache(maxsize=16)
def _reference_shapes(spec_json: str) -> str:
    from sdtool.models.registry import create_model

    spec = json.loads(spec_json)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        ref = create_model(spec["name"], **spec["args"])
    return json.dumps(module_shapes(ref))


def shape_changes(model: nn.Module, spec: dict) -> dict[str, dict]:
    """Modules whose shapes differ from a fresh build of `spec` (empty for an unpruned model)."""
    ref = json.loads(_reference_shapes(json.dumps(spec, sort_keys=True)))
    return {k: v for k, v in module_shapes(model).items() if ref.get(k) != v}


def apply_shapes(model: nn.Module, shapes: dict[str, dict]) -> None:
    """Resize modules in place to the recorded shapes (parameters re-created empty; load weights next)."""
    modules = dict(model.named_modules())
    for name, s in shapes.items():
        m = modules.get(name)
        current = _shape_of(m) if m is not None else None
        if m is None or current is None or current["type"] != s["type"]:
            raise KeyError(name)
        if s["type"] == "conv2d":
            m.in_channels, m.out_channels, m.groups = s["in_channels"], s["out_channels"], s["groups"]
            k = m.kernel_size
            m.weight = nn.Parameter(torch.empty(m.out_channels, m.in_channels // m.groups, *k))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(m.out_channels))
        elif s["type"] == "batchnorm2d":
            n = m.num_features = s["num_features"]
            if m.affine:
                m.weight = nn.Parameter(torch.empty(n))
                m.bias = nn.Parameter(torch.empty(n))
            if m.track_running_stats:
                m.running_mean = torch.zeros(n)
                m.running_var = torch.ones(n)
        else:
            m.in_features, m.out_features = s["in_features"], s["out_features"]
            m.weight = nn.Parameter(torch.empty(m.out_features, m.in_features))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(m.out_features))
