"""Data: datasets by name, batched on-device augmentation, the dynamic subset sampler."""

from rela.data.augment import RELA_VIEW, Normalize, ViewAugment, rela_view, resize_center
from rela.data.datasets import DATASETS, ImageDataset, load_dataset
from rela.data.subset import DynamicSubsetSampler

__all__ = [
    "DATASETS", "ImageDataset", "load_dataset", "ViewAugment", "RELA_VIEW", "rela_view", "Normalize",
    "resize_center", "DynamicSubsetSampler",
]
