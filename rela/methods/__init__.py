"""Base learning methods by name."""

from __future__ import annotations

from torch import nn

from rela.errors import unknown
from rela.methods.base import Method, MethodOutput
from rela.methods.byol import BYOL

METHODS: dict[str, type[Method]] = {
    "byol": BYOL,
}


def build_method(name: str, backbone: nn.Module, feature_dim: int, num_classes: int, **options) -> Method:
    if name not in METHODS:
        raise unknown("method", name, METHODS)
    return METHODS[name](backbone, feature_dim, num_classes, **options)


__all__ = ["METHODS", "Method", "MethodOutput", "build_method"]
