"""Stream mode: datasets larger than memory, decoded and augmented per sample in DataLoader workers.

Memory mode (:mod:`rela.data.datasets`) decodes the whole set into one uint8 tensor that rides
to the training device, and augments whole batches there (:mod:`rela.data.augment`). Stream
mode keeps only an index of the files (:class:`rela.data.files.FileSource`) and, in worker
processes, reads, decodes and augments each sample with torchvision's v2 transforms
(:func:`v2_view`, the same parameters as the batched :class:`ViewAugment`). Both modes share
the rest: the :class:`DynamicSubsetSampler` runs in the main process and draws the same
subsets for the same seed; a batch carries the dataset indices of its images, so bank rows
stay aligned.

**Reproducible with workers.** A sample's random augmentation is drawn from a generator
seeded with (run seed, epoch, index, view slot), never from a worker's running RNG state, so
which worker decodes which sample, and in which order, changes nothing: a run with
``num_workers > 0`` repeats exactly. Seeding per slot also keeps the method's views
independent of whether the ReLA views were drawn.

**Bad files** never raise inside a worker (a worker's exception would reach the console as
a traceback): a sample that cannot be read or decoded comes back as :class:`Bad`, the batch
drops it and lists it, and the main process either stops with a one-line
:class:`RelaError` naming the file or, with ``--skip-bad-images``, counts it.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from rela.data.augment import ViewAugment, blur_kernel
from rela.data.datasets import ImageDataset
from rela.data.files import BadImage, FileSource
from rela import console
from rela.errors import RelaError


def default_workers() -> int:
    """DataLoader workers when the config leaves it open: one core for the training process, up to 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class StreamSet:
    """A training or test split read from files on demand; stands in for :class:`ImageDataset`.

    It has everything the run is built from (size, labels, classes, normalisation, the
    fingerprint its bank is keyed by) except ``images``: those are decoded in workers.
    """

    images = None
    channels = 3

    def __init__(self, files: FileSource, image_size: int, mean, std, *, skip_bad_images: bool = False,
                 verify_data: bool = False):
        self.files, self.image_size = files, image_size
        self.name, self.split = files.name, files.split
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_classes = len(files.classes)
        self.unlabelled = files.unlabelled  # why there are no labels (num_classes 0), or None
        self.labels = torch.from_numpy(np.ascontiguousarray(files.labels, dtype=np.int64))
        self.skip_bad_images, self.verify_data = skip_bad_images, verify_data
        self.skipped: set[str] = set(files.skipped)  # files found bad so far and left out (--skip-bad-images)
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.files.fingerprint(self.image_size, self.verify_data)
        return self._fingerprint

    def take(self, rows) -> "StreamSet":
        part = StreamSet(self.files.take(rows), self.image_size, self.mean, self.std,
                         skip_bad_images=self.skip_bad_images, verify_data=self.verify_data)
        return part

    def subset(self, limit: int | None) -> "StreamSet":
        return self if limit is None or limit >= len(self) else self.take(slice(None, limit))

    def bad(self, items: list[tuple[str, str]]) -> None:
        """Files a batch could not read: a one-line error, or counted when skipping is on."""
        if not items:
            return
        if not self.skip_bad_images:
            path, reason = items[0]
            raise RelaError(f"cannot decode image {path}: {reason}; fix or remove it, or pass "
                            "--skip-bad-images to leave such files out")
        new = {path for path, _ in items} - self.skipped
        if new:
            console.warn(f"skipped {len(new)} image(s) that do not decode, e.g. {sorted(new)[0]}")
            self.skipped |= new

    def decoded(self, limit: int | None = None, workers: int = 0) -> ImageDataset:
        """The first ``limit`` images decoded into memory (the probe's slices); bad files as ``bad`` says."""
        part = self.subset(limit)
        images = torch.empty(len(part), 3, self.image_size, self.image_size, dtype=torch.uint8)
        keep = torch.ones(len(part), dtype=torch.bool)
        batches = [list(range(a, min(a + 256, len(part)))) for a in range(0, len(part), 256)]
        for batch in decode_loader(part, batches, workers):
            self.bad(batch["bad"])
            if len(batch["index"]):
                images[batch["index"]] = batch["image"]
            keep[batch["bad_index"]] = False
        data = ImageDataset(self.name, self.split, images[keep], part.labels[keep], self.num_classes,
                            self.mean, self.std, unlabelled=self.unlabelled)
        data._fingerprint = part.fingerprint()
        return data


def in_memory(data, limit: int | None = None) -> ImageDataset:
    """``data``'s first ``limit`` images as an :class:`ImageDataset` (decoded when ``data`` streams)."""
    return data.decoded(limit) if isinstance(data, StreamSet) else data.subset(limit)


# --- per-sample augmentation with torchvision v2 ---------------------------------------

def v2_view(view: ViewAugment, size: int):
    """The torchvision v2 pipeline of one :class:`ViewAugment`: uint8 3 x H x W in, uint8 3 x size x size out."""
    from torchvision.transforms import v2

    ops = [v2.RandomResizedCrop(size, scale=view.crop_scale, ratio=view.crop_ratio, antialias=True)]
    if view.flip_p > 0:
        ops.append(v2.RandomHorizontalFlip(view.flip_p))
    if view.jitter_p > 0 and any(view.jitter):
        ops.append(v2.RandomApply([v2.ColorJitter(*view.jitter)], p=view.jitter_p))
    if view.gray_p > 0:
        ops.append(v2.RandomGrayscale(view.gray_p))
    if view.blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(blur_kernel(size), view.blur_sigma)], p=view.blur_p))
    if view.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=view.solarize_p))  # x >= 128, as x >= 0.5 in [0, 1]
    return v2.Compose(ops)


def sample_seed(seed: int, epoch: int, index: int, slot: int) -> int:
    """The seed of one view of one sample: a function of these four numbers only (ints hash stably)."""
    return hash((seed, epoch, index, slot)) & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class Bad:
    """A sample that could not be read or decoded."""

    index: int
    path: str
    reason: str


class ViewSet(Dataset):
    """Key ``(epoch, index)`` -> ``(views, label, index)``: the ReLA views then the method's, as uint8;
    with no views (``--augment-on device``) -> ``(image, index)``, the decoded image."""

    def __init__(self, data: StreamSet, views: list[ViewAugment], seed: int):
        self.files, self.image_size, self.seed = data.files, data.image_size, seed
        self.views = [v2_view(v, data.image_size) for v in views]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        try:
            image = self.files.image(index, self.image_size)
        except BadImage as e:
            return Bad(index, e.path, e.reason)
        if not self.views:
            return image, index
        views = []
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stays as it was (num_workers=0)
            for slot, view in enumerate(self.views):
                torch.manual_seed(sample_seed(self.seed, epoch, index, slot))
                views.append(view(image))
        return views, int(self.files.labels[index]), index


class DecodeSet(Dataset):
    """Index -> ``(image, index)``: decoded, not augmented (bank extraction, the probe's slices)."""

    def __init__(self, data: StreamSet):
        self.files, self.image_size = data.files, data.image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            return self.files.image(index, self.image_size), index
        except BadImage as e:
            return Bad(index, e.path, e.reason)


def collate(items: list) -> dict:
    """Stack the good samples; list the bad ones (``bad``: (path, reason); ``bad_index``)."""
    bad = [it for it in items if isinstance(it, Bad)]
    good = [it for it in items if not isinstance(it, Bad)]
    batch = {"bad": [(b.path, b.reason) for b in bad], "bad_index": torch.tensor([b.index for b in bad],
                                                                                    dtype=torch.long)}
    if good and isinstance(good[0][0], list):  # ViewSet
        batch["views"] = [torch.stack([g[0][k] for g in good]) for k in range(len(good[0][0]))]
        batch["label"] = torch.tensor([g[1] for g in good], dtype=torch.long)
    elif good:  # DecodeSet
        batch["image"] = torch.stack([g[0] for g in good])
    batch["index"] = torch.tensor([g[-1] for g in good], dtype=torch.long)
    return batch


def make_loader(dataset: Dataset, batch_sampler, workers: int, prefetch: int = 2, persistent: bool = True,
                pin_memory: bool = False, generator: torch.Generator | None = None) -> DataLoader:
    """A DataLoader with the worker options (pinned memory only when there is CUDA to copy to)."""
    options = {"num_workers": workers, "collate_fn": collate, "generator": generator,
               "pin_memory": pin_memory and torch.cuda.is_available()}
    if workers > 0:
        options.update(prefetch_factor=prefetch, persistent_workers=persistent)
    return DataLoader(dataset, batch_sampler=batch_sampler, **options)


def decode_loader(data: StreamSet, batches: list[list[int]], workers: int, pin_memory: bool = False) -> DataLoader:
    """Decoded images (not augmented), one batch per list of indices, in that order."""
    return make_loader(DecodeSet(data), batches, workers, persistent=False, pin_memory=pin_memory)


class KeyedBatches(BatchSampler):
    """Batches of ``(epoch, index)`` keys from the subset sampler (``.sampler``, where Lightning sets the epoch).

    ``positions`` queues the sampler's position after each batch handed out: workers run ahead of
    training, and a checkpoint must record the position of the last batch trained, not prepared.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.positions: deque[int] = deque()

    def __iter__(self):
        self.positions.clear()
        for batch in super().__iter__():
            self.positions.append(self.sampler.consumed)
            yield [(self.sampler.epoch, i) for i in batch]


class StreamBatches:
    """What a stream-mode training step needs: the loader, and the views of a batch it made."""

    def __init__(self, data: StreamSet, rela_view: ViewAugment | None, method_views, *, seed: int,
                 workers: int, prefetch: int, pin_memory: bool, augment_on: str = "workers"):
        self.data, self.augment_on = data, augment_on
        self.rela_slots = 2 if rela_view is not None and augment_on == "workers" else 0
        views = [rela_view] * self.rela_slots + list(method_views) if augment_on == "workers" else []
        self.dataset = ViewSet(data, views, seed)
        self.workers, self.prefetch, self.pin_memory = workers, prefetch, pin_memory
        self.batches: KeyedBatches | None = None
        self.position = 0  # sampler position after the last batch split (= trained)

    def loader(self, sampler, batch_size: int) -> DataLoader:
        self.batches = KeyedBatches(sampler, batch_size, drop_last=True)
        # the workers' base seed comes from an own generator, not the global RNG (as in memory mode)
        return make_loader(self.dataset, self.batches, self.workers, self.prefetch, persistent=True,
                           pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(self.dataset.seed))

    def split(self, batch: dict):
        """(index, labels, ReLA views, method views) of a batch, or None when every sample was bad;
        ``augment_on="device"``: (index, labels, decoded images), augmented by the caller."""
        if self.batches is not None and self.batches.positions:
            self.position = self.batches.positions.popleft()
        self.data.bad(batch["bad"])
        if self.augment_on == "device":
            if "image" not in batch:
                return None
            index = batch["index"]
            return index, self.data.labels[index.cpu()].to(index.device), batch["image"]
        if "views" not in batch:
            return None
        views = [v.float().div_(255) for v in batch["views"]]
        return batch["index"], batch["label"], views[: self.rela_slots], views[self.rela_slots:]
