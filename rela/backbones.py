"""Learner backbones by name: a string -> (module, feature dim).

``resnet18``: torchvision's ResNet-18 with the CIFAR stem the authors use (3x3
stride-1 first conv, no max-pool). ``resnet-narrow``: the same design with one
basic block per stage and widths 32-64-128, for CPU experiments. ``convnet``:
a 3-layer 32-64-128 CNN, the fastest learner here. ``torchvision:<name>`` and
``timm:<name>``: any model of those libraries with its classifier removed.
Every backbone maps N x C x H x W images to N x d features; the names are
registered in :data:`rela.registry.BACKBONES`.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from rela.errors import RelaError, unknown
from rela.registry import BACKBONES


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@BACKBONES.register("convnet", help="3-layer 32-64-128 CNN, the CPU default")
def _convnet(in_chans: int, widths=(32, 64, 128)) -> nn.Module:
    layers, cin = [], in_chans
    for i, w in enumerate(widths):
        layers += _conv_bn_relu(cin, w)
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


@BACKBONES.register("resnet-narrow", help="3 basic blocks, 32-64-128")
def _resnet_narrow(in_chans: int, widths=(32, 64, 128)) -> nn.Module:
    layers, cin = _conv_bn_relu(in_chans, widths[0]), widths[0]
    for i, w in enumerate(widths):
        stride = 1 if i == 0 else 2
        down = None if stride == 1 and cin == w else nn.Sequential(
            nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
        layers.append(BasicBlock(cin, w, stride=stride, downsample=down))
        cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


@BACKBONES.register("resnet18", help="torchvision's ResNet-18 with the CIFAR stem, as in the paper")
def _resnet18_cifar(in_chans: int) -> nn.Module:
    from torchvision.models import resnet18

    net = resnet18(num_classes=1)
    net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


class RepeatChannels(nn.Module):
    """Lets 3-channel library models take grayscale images."""

    def __init__(self, model: nn.Module, channels: int = 3):
        super().__init__()
        self.model, self.channels = model, channels

    def forward(self, x):
        if x.shape[1] == 1 and self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        return self.model(x)


@BACKBONES.register("torchvision", arg="NAME", help="any torchvision model, classifier removed")
def _torchvision(name: str, in_chans: int) -> nn.Module:
    from torchvision import models

    try:
        net = models.get_model(name, weights=None)
    except ValueError:
        raise unknown("torchvision model", name, models.list_models()[:40] + ["..."]) from None
    strip_classifier(net)
    return RepeatChannels(net) if in_chans != 3 else net


def strip_classifier(net: nn.Module) -> nn.Module:
    """Replace a torchvision model's classification layer by the identity."""
    for attr in ("fc", "classifier", "heads", "head"):
        if hasattr(net, attr) and isinstance(getattr(net, attr), nn.Module):
            setattr(net, attr, nn.Identity())
            return net
    raise RelaError(f"do not know how to remove the classifier of {type(net).__name__}")


@BACKBONES.register("timm", arg="NAME", help="any timm model, classifier removed")
def _timm(name: str, in_chans: int) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise RelaError("backbone 'timm:...' needs the optional package timm: pip install 'rela[timm]'") from None
    if not timm.is_model(name):
        raise RelaError(f"unknown timm model {name!r}; see timm.list_models()")
    return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)


def build_backbone(name: str, in_chans: int = 3, image_size: int = 32) -> tuple[nn.Module, int]:
    """Return (backbone, feature_dim) for ``name``; the dim is read off a dummy forward."""
    net = BACKBONES.create(name, in_chans)
    # Channels-last convolutions are 1.5-3x faster on CPU (oneDNN) and suit tensor cores on GPU.
    net = net.to(memory_format=torch.channels_last)
    return net, feature_dim(net, in_chans, image_size)


@torch.no_grad()
def feature_dim(net: nn.Module, in_chans: int, image_size: int) -> int:
    was_training = net.training
    net.eval()
    out = net(torch.zeros(2, in_chans, image_size, image_size))
    net.train(was_training)
    return out.flatten(1).shape[1]
