"""Model registry and the multi-exit network."""

# Importing each backbone module registers its builders: the ResNet family, the CIFAR ResNets, WRN, VGG,
# MobileNetV2 and ShuffleNetV2, `truncated` (one exit standing alone), `torchvision_wrapped` (exits on
# any model) and `timm_wrapped` (timm's models, an optional extra imported only when used).
from sdtool.models import cifar_resnet, mobile, resnet, timm_wrap, truncate, vgg, wrap, wrn  # noqa: F401
from sdtool.models.multi_exit import MultiExitNet
from sdtool.models.registry import (
    create_model,
    list_models,
    load_plugins,
    model_entries,
    plugin_errors,
    public_models,
    register_model,
)

__all__ = [
    "MultiExitNet",
    "create_model",
    "list_models",
    "load_plugins",
    "model_entries",
    "plugin_errors",
    "public_models",
    "register_model",
]
