import pytest
import timm
import torch
from torch import nn

import cifar100_fit.model  # noqa: F401  (registers resnet18_cifar with timm)
from cifar100_fit.model import create_model


def test_resnet18_cifar_maps_32px_images_to_100_logits():
    model = create_model("resnet18_cifar").eval()
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 100)
    assert torch.isfinite(logits).all()


def test_stem_is_3x3_stride_1_without_max_pool():
    model = create_model("resnet18_cifar")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    features = model.forward_features(torch.randn(1, 3, 32, 32))
    assert features.shape == (1, 512, 4, 4)  # three stride-2 stages after a full-size stem


def test_registry_name_builds_the_model():
    assert "resnet18_cifar" in timm.list_models("resnet18_cifar")
    model = timm.create_model("resnet18_cifar", num_classes=10)
    assert model.fc.out_features == 10
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)


def test_imagenet_resnet18_baseline_keeps_its_stem():
    model = create_model("resnet18")
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_unknown_arch_and_pretrained_weights_are_refused():
    with pytest.raises(ValueError, match="arch 'vgg11' is not accepted; choose one of"):
        create_model("vgg11")
    with pytest.raises(NotImplementedError, match="no pretrained weights"):
        timm.create_model("resnet18_cifar", pretrained=True)
