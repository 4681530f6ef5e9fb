"""Base learning methods by name: each a small file composing lightly's heads and losses.

Each method registers itself in :data:`rela.registry.METHODS`; importing this package
imports them all, in the order ``--help`` lists them.
"""

from __future__ import annotations

from torch import nn

from rela.errors import RelaError
from rela.methods.base import Method, MethodOutput, TwoViewMethod
from rela.methods.byol import BYOL  # noqa: I001 - import order is registration order
from rela.methods.simclr import SimCLR
from rela.methods.moco import MoCoV2
from rela.methods.simsiam import SimSiam
from rela.methods.barlowtwins import BarlowTwins
from rela.methods.vicreg import VICReg
from rela.methods.dino import DINO
from rela.methods.supervised import Supervised
from rela.registry import METHODS


def build_method(name: str, backbone: nn.Module, feature_dim: int, num_classes: int, **options) -> Method:
    try:
        return METHODS.create(name, backbone, feature_dim, num_classes, **options)
    except TypeError as e:  # an option the method does not have
        raise RelaError(f"bad option for method {name!r}: {e}") from None


__all__ = ["BYOL", "DINO", "METHODS", "BarlowTwins", "Method", "MethodOutput", "MoCoV2", "SimCLR", "SimSiam",
           "Supervised", "TwoViewMethod", "VICReg", "build_method"]
