"""Data: datasets by name, batched on-device augmentation, the dynamic subset sampler."""

from rela.data.augment import RELA_VIEW, Normalize, ViewAugment, resize_center
from rela.data.datasets import DATASETS, ImageDataset, load_dataset
from rela.data.subset import DynamicSubsetSampler

__all__ = [
    "DATASETS", "ImageDataset", "load_dataset", "ViewAugment", "RELA_VIEW", "Normalize",
    "resize_center", "DynamicSubsetSampler",
]
