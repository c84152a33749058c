"""Model registry and the multi-exit network."""

# Importing each backbone module registers its builders: the ResNet family, the CIFAR ResNets, WRN, VGG,
# MobileNetV2 and ShuffleNetV2, `truncated` (one exit standing alone) and `torchvision_wrapped` (exits on
# any model).
from sdtool.models import cifar_resnet, mobile, resnet, truncate, vgg, wrap, wrn  # noqa: F401
from sdtool.models.multi_exit import MultiExitNet
from sdtool.models.registry import create_model, list_models, register_model

__all__ = ["MultiExitNet", "create_model", "list_models", "register_model"]
