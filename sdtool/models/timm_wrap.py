"""timm backbones with exits: `model.name: timm:NAME` is `timm_wrapped(arch=NAME, ...)`.

The model is `timm.create_model(NAME, pretrained=False, num_classes=...)`, cut into stages by `wrap_model`
(sdtool/models/wrap.py) exactly as `torchvision:ARCH` is; checkpoints store `timm_wrapped` and its arguments,
so they reload wherever timm is installed. timm is an optional extra (`pip install "sdtool[timm]"`).

Nothing is downloaded: the architecture is built with random weights (`pretrained=False` reads no hub), and
hub names (`hf-hub:...`) are refused. Pretrained weights come from a local file through `model.pretrained`.

Default exit points (model.exits_after) come from timm's own `feature_info`: the modules where the feature
map reaches 1/4, 1/8 and 1/16 of the input size, i.e. after the stride-4, -8 and -16 stages, so each family
gets exits where timm's feature extraction puts its stage outputs. For example (timm 1.0):
  * resnet*, resnext*, seresnext* (timm ResNet): layer1, layer2, layer3 (as torchvision's ResNets);
  * mobilenetv3_small_*: blocks.0, blocks.1, blocks.3; mobilenetv3_large_* and efficientnet_*: blocks.1,
    blocks.2, blocks.4; mobilenetv4_conv_*: blocks.0, blocks.1, blocks.2;
  * regnet*: s1, s2, s3; convnext*: stages.0, stages.1, stages.2.
The last stage ends at the model's last 4-D feature map (for MobileNetV3, after its 1x1 head conv), and
its exit is global pooling and the model's own classifier, so the final exit computes what timm's model does.

timm's no-trace layers (timm.layers.get_notrace_modules(), e.g. BatchNormAct2d) are traced as one call each:
traced through, their training-mode branch would be frozen into the graph. Models that need timm's no-trace
functions (transformer families) are not supported: exits need 4-D convolutional feature maps anyway.
"""

from __future__ import annotations

import difflib
from types import ModuleType

from torch import nn

from sdtool.errors import SdtoolError
from sdtool.models.registry import register_model
from sdtool.models.wrap import wrap_model

_EXIT_REDUCTIONS = (4, 8, 16)  # the default exits: after the stages ending at these strides


def import_timm(arch: str) -> ModuleType:
    """The timm package; its absence fails with one line saying how to install it."""
    try:
        import timm
    except ImportError:
        raise SdtoolError(f'timm:{arch} needs the timm package: pip install "sdtool[timm]"') from None
    return timm


def _check_name(timm: ModuleType, arch: str) -> None:
    if ":" in arch:  # hf-hub:, local-dir: ... would make create_model read a hub or a folder
        raise SdtoolError(
            f"timm:{arch}: give a timm architecture name (timm.list_models()), not a hub or folder name; "
            "load weights from a local file with model.pretrained"
        )
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SdtoolError(f"timm has no model {arch!r}{hint}; see timm.list_models()")


def default_exits(module: nn.Module) -> list[str] | None:
    """The modules timm's feature_info puts at strides 4, 8 and 16; None when the model does not say."""
    info = getattr(module, "feature_info", None)
    try:
        by_reduction = {int(f["reduction"]): str(f["module"]) for f in info or []}
    except (KeyError, TypeError, ValueError):
        return None
    names = [by_reduction[r] for r in _EXIT_REDUCTIONS if r in by_reduction]
    return names if len(names) == len(_EXIT_REDUCTIONS) else None


@register_model(internal=True)
def timm_wrapped(
    arch: str,
    exits_after: list[str] | None = None,
    num_classes: int = 1000,
    head: str = "byot",
    attention: bool = True,
    exits: list[int] | None = None,
    input_size: int = 32,
):
    """timm.create_model(<arch>, pretrained=False, num_classes=...) with exits after `exits_after` (wrap_model)."""
    timm = import_timm(arch)
    _check_name(timm, arch)
    try:
        module = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    except Exception as e:  # noqa: BLE001 - any failure of timm's builder means the same to the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise SdtoolError(f"timm:{arch} cannot be built with num_classes={num_classes} ({first})") from None
    if exits_after is None:
        exits_after = default_exits(module)
        if exits_after is None:
            raise SdtoolError(
                f"timm:{arch} has no default exit points (its feature_info names no stride-4/8/16 stages); set "
                "model.exits_after to the names of the modules after which exits go"
            )
    # timm's Linear (an nn.Linear outside torch.nn, so traced through by default) stays one module: the final
    # exit then finds the model's classifier and reuses it.
    leaves = (*timm.layers.get_notrace_modules(), timm.layers.Linear)
    return wrap_model(module, exits_after, num_classes, head, attention, input_size, exits, leaves)
