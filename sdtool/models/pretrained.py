"""Pretrained backbone weights for a freshly built MultiExitNet (`model.pretrained` in a recipe).

    model.pretrained: IMAGENET1K_V1                     # torchvision's weights, read from torch's cache only
    model.pretrained: weights/resnet18.pth              # a state dict: torch.load(weights_only=True)
    model.pretrained: runs/sd/best.safetensors          # any .safetensors, an sdtool checkpoint too

Tensors are matched by name and shape onto the backbone (the stages) and the final classifier; exits,
attention and heads are new and start from their initialisation. A source tensor may carry the target's own
name (an sdtool checkpoint, or torch.save of a MultiExitNet's state dict) or torchvision's name, translated
per family: the built-in ResNets, mobilenet_v2 and shufflenet_v2_x1_0 are made of torchvision's blocks in
torchvision's order (sdtool/models/resnet.py, mobile.py), so only the stage prefix differs, e.g.

    resnet18       layer1.0.conv1.weight   <- stages.0.1.0.conv1.weight     (stage 1 = Sequential(stem, layer1))
                   layer2.0.conv1.weight   <- stages.1.0.conv1.weight
    mobilenet_v2   features.5.conv.0.0.weight <- stages.1.1.conv.0.0.weight (stage cuts at features 4, 7, 14)
    torchvision:*  layer2.0.conv1.weight   <- stages.1.layer2.0.conv1.weight (wrap.py keeps the original names)

The final classifier is the source's last Linear (`fc`, `classifier.1`, or an sdtool checkpoint's deepest
`classifiers.N`). The run refuses weights that leave more than the stem convolution (e.g. 7x7 ImageNet vs
3x3 CIFAR) and the classifier (e.g. 1000 vs 10 classes) unloaded, unless `model.pretrained_strict: false`:
anything else unloaded means another architecture or width, which would silently train from scratch.

torchvision weights are never downloaded: sdtool runs offline, so the file must already be in torch's cache
(`torch.hub.get_dir()/checkpoints/<the file name of the weights' url>`); otherwise one line says which file
to put where.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
from torch import nn

from sdtool.errors import SdtoolError
from sdtool.fileio import sha256
from sdtool.models.multi_exit import MultiExitNet

if TYPE_CHECKING:
    from sdtool.recipe import ModelConfig

FILE_SUFFIXES = (".pth", ".pt", ".safetensors")
# Built-in backbones whose layout is torchvision's (same blocks, same order), so torchvision's weights fit.
TORCHVISION_LAYOUT = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "resnext50_32x4d",
    "mobilenet_v2",
    "shufflenet_v2_x1_0",
)
_MOBILENET_CUTS = (0, 4, 7, 14)  # first `features` index of each mobilenet_v2 stage (sdtool/models/mobile.py)
_FIX = "fix the recipe or the --set value"


def is_file_setting(value: str) -> bool:
    """A path (a weights file) rather than a torchvision weights name such as IMAGENET1K_V1."""
    return value.endswith(FILE_SUFFIXES) or "/" in value or "\\" in value or value.startswith(".")


def torchvision_arch(model_name: str) -> str | None:
    """The torchvision architecture whose weights fit `model_name`, or None."""
    if model_name.startswith("torchvision:"):
        return model_name.split(":", 1)[1]
    return model_name if model_name in TORCHVISION_LAYOUT else None


def check_setting(model_name: str, value: str | None) -> None:
    """Recipe-time checks of model.pretrained (cheap; the torch cache is looked at only when the run starts)."""
    if value is None:
        return
    if not value.strip():
        raise SdtoolError(f"model.pretrained is empty; give a weights name or a file path, or null; {_FIX}")
    if is_file_setting(value):
        p = Path(value)
        if not p.suffix or p.suffix not in FILE_SUFFIXES:
            raise SdtoolError(
                f"model.pretrained: {value} is not a .pth, .pt or .safetensors file; convert the weights to one"
            )
        if not p.is_file():
            raise SdtoolError(
                f"model.pretrained: file {p} not found; put the weights there or point model.pretrained at them"
            )
        return
    weights_enum(model_name, value)


def weights_enum(model_name: str, name: str) -> Any:
    """torchvision's weights entry `name` (IMAGENET1K_V1, DEFAULT or ResNet18_Weights.IMAGENET1K_V1)."""
    import torchvision

    arch = torchvision_arch(model_name)
    if arch is None:
        raise SdtoolError(
            f"model.pretrained: {model_name} has no torchvision weights (only {', '.join(TORCHVISION_LAYOUT)} "
            "and torchvision:ARCH have); give a local .pth or .safetensors file instead"
        )
    try:
        cls = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise SdtoolError(f"model.pretrained: torchvision has no weights for {arch}; give a local file") from None
    short = name.split(".", 1)[1] if name.startswith(cls.__name__ + ".") else name
    try:
        return cls[short]
    except KeyError:
        valid = ", ".join(m.name for m in cls)
        raise SdtoolError(f"model.pretrained: {name} is not a weights name of {arch}; valid: {valid}") from None


def cached_file(model_name: str, name: str) -> tuple[Path, str]:
    """(the cached file of torchvision weights `name`, their full name); refused when not in the cache."""
    w = weights_enum(model_name, name)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / Path(urlparse(w.url).path).name
    if not path.is_file():
        raise SdtoolError(
            f"model.pretrained: {w} needs {path.name} in {folder} (sdtool never downloads); fetch {w.url} "
            "there, or set TORCH_HOME, or point model.pretrained at a local file"
        )
    return path, str(w)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or a .pth/.pt state dict; pickles of anything else are refused."""
    from sdtool.fileio import read_state_dict

    return read_state_dict(path, "model.pretrained: ")


def _torchvision_name(model: MultiExitNet, key: str) -> str | None:
    """torchvision's name for the backbone tensor `key` ("stages.S.rest"), or None where there is none."""
    m = re.fullmatch(r"stages\.(\d+)\.(.+)", key)
    if m is None:
        return None
    s, rest = int(m.group(1)), m.group(2)
    spec = getattr(model, "spec", {}) or {}
    name, args = spec.get("name"), spec.get("args", {})
    if name in ("torchvision_wrapped", "timm_wrapped"):
        return rest  # wrap_model's stage GraphModules keep the original module names
    block, _, tail = rest.partition(".")
    if not block.isdigit() or not tail:
        return None
    i = int(block)
    if name == "mobilenet_v2":
        return f"features.{_MOBILENET_CUTS[s] + i}.{tail}" if s < len(_MOBILENET_CUTS) else None
    if name == "shufflenet_v2_x1_0":
        return _shufflenet_name(s, i, tail, args.get("stem", "cifar") == "imagenet")
    if name in TORCHVISION_LAYOUT:  # the ResNet family
        return _resnet_name(model, s, i, tail, bool(args.get("split_layer1")))
    return None


def _resnet_name(model: MultiExitNet, s: int, i: int, tail: str, split: bool) -> str | None:
    if s == 0 and i == 0:  # the stem: Sequential(conv, bn, relu[, maxpool])
        layer, _, rest = tail.partition(".")
        return {"0": f"conv1.{rest}", "1": f"bn1.{rest}"}.get(layer)
    if s == 0:  # Sequential(stem, layer1 or its first part)
        return f"layer1.{tail}"
    if split:  # stage 2 is the rest of layer1, renumbered from 0
        h = len(model.stages[0][1])  # type: ignore[index]  # blocks of layer1 in stage 1
        return f"layer1.{i + h}.{tail}" if s == 1 else f"layer{s}.{i}.{tail}"
    return f"layer{s + 1}.{i}.{tail}"


def _shufflenet_name(s: int, i: int, tail: str, imagenet: bool) -> str | None:
    if s == 0:  # conv1 (+ maxpool, no tensors) + stage2
        first = 2 if imagenet else 1
        return f"conv1.{tail}" if i == 0 else (f"stage2.{i - first}.{tail}" if i >= first else None)
    if s in (1, 2):  # stage3 cut after its 4th block
        return f"stage3.{i + 4 * (s - 1)}.{tail}"
    return f"stage4.{i}.{tail}" if i < 4 else f"conv5.{tail}"


def _source_head(source: dict[str, torch.Tensor], used: set[str]) -> str | None:
    """The prefix of the source's final classifier: an sdtool checkpoint's deepest `classifiers.N`, else the
    last Linear-shaped weight (2-D) no backbone tensor took (`fc`, `classifier.1`, ...)."""
    exits = [int(m.group(1)) for k in source if (m := re.fullmatch(r"classifiers\.(\d+)\.weight", k))]
    if exits:
        return f"classifiers.{max(exits)}"
    linear = [k[: -len(".weight")] for k, v in source.items() if k.endswith(".weight") and v.dim() == 2]
    linear = [p for p in linear if p + ".weight" not in used]
    return linear[-1] if linear else None


def _stem_keys(model: MultiExitNet) -> set[str]:
    """The first convolution of the backbone and its batch norm: the stem, which differs between a CIFAR
    (3x3) and an ImageNet (7x7/2) layout and may therefore be skipped."""
    out: set[str] = set()
    kinds: list[type[nn.Module]] = [nn.Conv2d, nn.BatchNorm2d]
    for name, mod in model.stages.named_modules():
        if kinds and isinstance(mod, kinds[0]):
            kinds.pop(0)
            out |= {f"stages.{name}.{k}" for k, _ in mod.named_parameters(recurse=False)}
            out |= {f"stages.{name}.{k}" for k, _ in mod.named_buffers(recurse=False)}
    return out


@dataclass
class Match:
    """The outcome of matching a weights file onto a model (target names throughout)."""

    loaded: list[str]
    skipped: list[str]  # a source tensor of that name exists, with another shape
    missing: list[str]  # no source tensor of that name
    allowed: set[str]  # stem and final classifier: may be skipped or missing under pretrained_strict
    unused: int  # source tensors nothing took (e.g. an sdtool checkpoint's exits)
    values: dict[str, torch.Tensor]

    def to_json(self) -> dict[str, Any]:
        return {"loaded": len(self.loaded), "skipped": self.skipped, "missing": self.missing, "unused": self.unused}


def match(model: MultiExitNet, source: dict[str, torch.Tensor]) -> Match:
    """Match `source` by name and shape onto the backbone (stages) and the final classifier of `model`."""
    target = model.state_dict()
    deepest = f"classifiers.{model.num_exits - 1}."
    backbone = [k for k in target if k.startswith("stages.")]
    found: dict[str, str] = {}
    for k in backbone:
        name = k if k in source else _torchvision_name(model, k)
        if name is not None and name in source:
            found[k] = name
    head = _source_head(source, set(found.values()))
    for k in (k for k in target if k.startswith(deepest)):
        name = f"{head}.{k[len(deepest) :]}" if head else k
        if name in source:
            found[k] = name
    wanted = backbone + [k for k in target if k.startswith(deepest)]
    ok = [k for k in found if source[found[k]].shape == target[k].shape]
    return Match(
        loaded=ok,
        skipped=[k for k in found if k not in set(ok)],
        missing=[k for k in wanted if k not in found],
        allowed=_stem_keys(model) | {k for k in target if k.startswith(deepest)},
        unused=len(set(source) - set(found.values())),
        values={k: source[found[k]] for k in ok},
    )


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_pretrained(model: MultiExitNet, cfg: ModelConfig, log: Callable[..., None]) -> dict[str, Any]:
    """Load `cfg.pretrained` into `model` (in place, before it moves to its device); the lineage record:
    source, file, sha256 and the loaded / skipped / missing tensors."""
    value = cfg.pretrained
    if value is None:
        return {}
    if is_file_setting(value):
        check_setting(cfg.name, value)
        path, label = Path(value), value
    else:
        path, label = cached_file(cfg.name, value)
    m = match(model, read_weights(path))
    if not any(v.is_floating_point() for v in m.values.values()):  # batch-norm step counters alone fit anything
        raise SdtoolError(
            f"model.pretrained: no tensor of {path} fits {cfg.name} by name and shape; "
            "use weights of the same architecture"
        )
    bad = [k for k in m.skipped + m.missing if k not in m.allowed]
    if bad and cfg.pretrained_strict is not False:  # null (the default) is strict
        raise SdtoolError(
            f"model.pretrained: {len(bad)} backbone tensors of {cfg.name} do not fit {path.name} beyond the stem "
            f"and the classifier ({_few(bad)}); use weights of the same architecture and width, or set "
            "model.pretrained_strict: false to load the rest"
        )
    with torch.no_grad():
        state = model.state_dict()
        for k, v in m.values.items():
            state[k].copy_(v)
    log(
        f"model.pretrained {label}: loaded {len(m.loaded)} tensors, skipped {len(m.skipped)} (shape differs"
        f"{': ' + _few(m.skipped) if m.skipped else ''}), missing {len(m.missing)}"
        f"{' (' + _few(m.missing) + ')' if m.missing else ''}; exits, attention and heads start fresh"
    )
    return {"source": label, "file": str(path), "sha256": sha256(path), **m.to_json()}


def recorded(last: Path) -> dict[str, Any]:
    """The pretrained record of a resumed run, from its last checkpoint's lineage (the resume state replaces
    every weight, so the file is not read or hashed again)."""
    from sdtool.checkpoint import load_meta

    try:
        lineage = load_meta(last).lineage
    except SdtoolError:
        return {}
    return dict(lineage[-1].extra.get("pretrained") or {}) if lineage else {}
