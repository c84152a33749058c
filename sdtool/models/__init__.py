"""Model registry and the multi-exit network."""

from sdtool.models import resnet  # noqa: F401  (registers the ResNet family)
from sdtool.models import truncate  # noqa: F401  (registers `truncated`: one exit standing alone)
from sdtool.models import cifar_resnet, mobile, vgg, wrn  # noqa: F401  (CIFAR ResNets, WRN, VGG, MobileNetV2, ShuffleNetV2)
from sdtool.models import wrap  # noqa: F401  (registers `torchvision_wrapped`: exits on any model)
from sdtool.models.multi_exit import MultiExitNet
from sdtool.models.registry import create_model, list_models, register_model

__all__ = ["MultiExitNet", "create_model", "list_models", "register_model"]
