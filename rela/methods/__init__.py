"""Base learning methods by name: each a small file composing lightly's heads and losses."""

from __future__ import annotations

from torch import nn

from rela.errors import RelaError, unknown
from rela.methods.barlowtwins import BarlowTwins
from rela.methods.base import Method, MethodOutput, TwoViewMethod
from rela.methods.byol import BYOL
from rela.methods.dino import DINO
from rela.methods.moco import MoCoV2
from rela.methods.simclr import SimCLR
from rela.methods.simsiam import SimSiam
from rela.methods.supervised import Supervised
from rela.methods.vicreg import VICReg

METHODS: dict[str, type[Method]] = {
    "byol": BYOL,
    "simclr": SimCLR,
    "mocov2": MoCoV2,
    "simsiam": SimSiam,
    "barlowtwins": BarlowTwins,
    "vicreg": VICReg,
    "dino": DINO,
    "supervised": Supervised,
}


def build_method(name: str, backbone: nn.Module, feature_dim: int, num_classes: int, **options) -> Method:
    if name not in METHODS:
        raise unknown("method", name, METHODS)
    try:
        return METHODS[name](backbone, feature_dim, num_classes, **options)
    except TypeError as e:  # an option the method does not have
        raise RelaError(f"bad option for method {name!r}: {e}") from None


__all__ = ["METHODS", "Method", "MethodOutput", "TwoViewMethod", "build_method"]
