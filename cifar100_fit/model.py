"""timm's ResNet18 adapted to 32x32 images, registered in timm's model registry.

After `import cifar100_fit`, `timm.create_model("resnet18_cifar")` builds it.
"""

from __future__ import annotations

import timm
from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from .config import ARCHS
from .data import CIFAR100_MEAN, CIFAR100_STD


@register_model
def resnet18_cifar(pretrained: bool = False, num_classes: int = 100, **kwargs) -> ResNet:
    """ResNet18 with a 3x3 stride-1 stem and no max-pool, for 32x32 input.

    The ImageNet stem (7x7 stride 2, then max-pool) shrinks a 32x32 image to 8x8 before the first
    block; this stem keeps 32x32, so the last stage still sees 4x4 feature maps.
    """
    if pretrained:
        raise NotImplementedError("resnet18_cifar has no pretrained weights; use pretrained=False")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # create_model's own
        kwargs.pop(key, None)
    model = ResNet(block=BasicBlock, layers=(2, 2, 2, 2), num_classes=num_classes, **kwargs)
    model.conv1 = nn.Conv2d(
        model.conv1.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False
    )
    model.maxpool = nn.Identity()
    for info in model.feature_info:  # the stem no longer downsamples: every stage is 4x finer
        info["reduction"] //= 4
    model.pretrained_cfg = dict(
        architecture="resnet18_cifar",
        num_classes=num_classes,
        input_size=(3, 32, 32),
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        first_conv="conv1",
        classifier="fc",
    )
    return model


def create_model(arch: str = "resnet18_cifar", num_classes: int = 100) -> nn.Module:
    """Build `arch` (resnet18_cifar or timm's ImageNet-stem resnet18) with random weights."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not accepted; choose one of: {', '.join(ARCHS)}")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (or the model itself)."""
    while hasattr(model, "module"):
        model = model.module
    return model
