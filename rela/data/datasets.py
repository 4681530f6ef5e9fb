"""Datasets by name, held in memory as uint8 tensors.

Every dataset becomes an :class:`ImageDataset`: ``images`` (N x C x H x W,
uint8) and ``labels`` (N, int64). Small image datasets fit in memory, and
keeping them as one tensor lets augmentation run on whole batches on the
training device (see :mod:`rela.data.augment`) instead of per-image in
worker processes.

Names (registered in :data:`rela.registry.DATASETS`): ``fashion-mnist``, ``cifar10``,
``cifar100``, ``imagefolder:PATH``, ``digits`` (scikit-learn's 8x8 digits at 28x28),
``synthetic[:N]``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rela import console
from rela.errors import RelaError
from rela.registry import DATASETS
FASHION_MNIST_SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 64  # imagefolder / shards: side the images are decoded to


@dataclass
class ImageDataset:
    name: str
    split: str
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    _fingerprint: str | None = field(default=None, repr=False)
    skipped: tuple[str, ...] = ()  # files left out because they did not decode (--skip-bad-images)
    # why the set has no labels (num_classes 0, every label -1), e.g. "images directly in the folder"; None: labelled
    unlabelled: str | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape N x C x H x W")
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def fingerprint(self) -> str:
        """Content hash: the bank cache is keyed by what the images are, not by a path."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(f"{self.name}|{self.split}|{tuple(self.images.shape)}".encode())
            h.update(self.images.contiguous().numpy().tobytes())
            h.update(self.labels.numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def subset(self, limit: int | None) -> "ImageDataset":
        """The first ``limit`` images (the files are already shuffled)."""
        if limit is None or limit >= len(self):
            return self
        return ImageDataset(
            self.name, self.split, self.images[:limit].clone(), self.labels[:limit].clone(),
            self.num_classes, self.mean, self.std, self.derived_key(f"first {limit}"), skipped=self.skipped,
            unlabelled=self.unlabelled,
        )

    def take(self, rows: torch.Tensor, part: str) -> "ImageDataset":
        """The images at ``rows`` (an index tensor); ``part`` names the selection in the bank key."""
        return ImageDataset(self.name, self.split, self.images[rows], self.labels[rows], self.num_classes,
                            self.mean, self.std, self.derived_key(part), skipped=self.skipped,
                            unlabelled=self.unlabelled)

    def derived_key(self, part: str) -> str | None:
        """A part's fingerprint from a key set without hashing pixels (files' identity), else None (hash later)."""
        if self._fingerprint is None:
            return None
        return hashlib.sha256(f"{self._fingerprint}|{part}".encode()).hexdigest()


def load_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
    limit: int | None = None,
    image_size: int | None = None,
    holdout: int | None = None,
    skip_bad_images: bool = False,
    verify_data: bool = False,
    labels: str = "auto",
    progress: bool = False,
) -> ImageDataset:
    """Load ``split`` ("train" or "test") of the dataset called ``name``.

    With ``holdout=N`` the last N training images become the "test" split and the
    rest the training split: a validation set for choosing settings without
    touching the real test split. ``skip_bad_images`` leaves out image-folder
    files that do not decode (listed in ``skipped``) instead of failing on the first;
    ``verify_data`` keys file datasets by their content, not their names, sizes and mtimes;
    ``labels`` (auto, folders, none) says how an image folder's labels are read
    (:func:`rela.data.files.unlabelled_reason`); ``progress`` shows a bar while an image folder decodes.
    """
    if split not in ("train", "test"):
        raise RelaError(f"unknown split {split!r}; valid choices: train, test")
    if holdout:
        full = load_dataset(name, "train", root, download, None, image_size, skip_bad_images=skip_bad_images,
                            verify_data=verify_data, labels=labels, progress=progress)
        if not 0 < holdout < len(full):
            raise RelaError(f"holdout must be between 1 and {len(full) - 1} for {name}, got {holdout}")
        keep = slice(None, len(full) - holdout) if split == "train" else slice(len(full) - holdout, None)
        part = ImageDataset(full.name, f"{split}-holdout{holdout}", full.images[keep].clone(),
                            full.labels[keep].clone(), full.num_classes, full.mean, full.std,
                            full.derived_key(f"{split}-holdout{holdout}"), skipped=full.skipped,
                            unlabelled=full.unlabelled)
        return part.subset(limit)
    ds = DATASETS.create(name, split, root=root, download=download, image_size=image_size,
                         skip_bad_images=skip_bad_images, verify_data=verify_data, labels=labels,
                         progress=progress)
    return ds.subset(limit)


# --- Fashion-MNIST (standard IDX .gz files) -------------------------------------------

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """--data-root, else $RELA_DATA, else Debian's install location.

    A root may hold the files directly or in a ``fashion-mnist/`` sub-folder.
    """
    candidates = [root, os.environ.get("RELA_DATA")] if root else [os.environ.get("RELA_DATA")]
    candidates = [Path(c) for c in candidates if c] or [FASHION_MNIST_SYSTEM_ROOT]
    if not root:
        candidates.append(FASHION_MNIST_SYSTEM_ROOT)
    for base in candidates:
        for d in (base, base / "fashion-mnist"):
            if (d / _FMNIST_FILES["train"][0]).is_file():
                return d
    tried = ", ".join(str(c) for c in candidates)
    raise RelaError(
        f"Fashion-MNIST files ({_FMNIST_FILES['train'][0]} ...) not found in {tried}; "
        "install Debian's package 'dataset-fashion-mnist' or pass --data-root DIR"
    )


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise RelaError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise RelaError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise RelaError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


@DATASETS.register("fashion-mnist", help="IDX .gz files under --data-root, $RELA_DATA or Debian's path")
def _fashion_mnist(split: str, root=None, **_) -> ImageDataset:
    d = fashion_mnist_root(root)
    img_file, lbl_file = (d / f for f in _FMNIST_FILES[split])
    for f in (img_file, lbl_file):
        if not f.is_file():
            raise RelaError(f"Fashion-MNIST file missing: {f}")
    images = torch.from_numpy(read_idx(img_file).copy()).unsqueeze(1)
    labels = torch.from_numpy(read_idx(lbl_file).astype(np.int64))
    if len(images) != len(labels):
        raise RelaError(f"{img_file} and {lbl_file} disagree on the number of images")
    return ImageDataset("fashion-mnist", split, images, labels, 10, (0.2860,), (0.3530,))


def mnist_root(root: str | os.PathLike | None = None) -> Path:
    """--data-root, else $RELA_DATA, else ./data: the folder (or its ``mnist/``) holding MNIST's IDX files."""
    bases = [Path(b) for b in (root, os.environ.get("RELA_DATA"), "data") if b]
    for base in bases:
        for d in (base, base / "mnist"):
            if (d / _FMNIST_FILES["train"][0]).is_file():
                return d
    raise RelaError(f"MNIST files ({_FMNIST_FILES['train'][0]} ...) not found in "
                    f"{', '.join(str(b) for b in bases)}; run python scripts/install_mnist.py or pass --data-root DIR")


@DATASETS.register("mnist", help="MNIST's 60k training digits (IDX .gz, from scripts/install_mnist.py); train "
                                 "split only: another dataset to train a free prior on")
def _mnist(split: str, root=None, **_) -> ImageDataset:
    d = mnist_root(root)
    img_file, lbl_file = (d / f for f in _FMNIST_FILES[split])
    if not img_file.is_file():
        raise RelaError(f"MNIST {split} split missing: {img_file} (the installed source has the training set only; "
                        "train a prior on it with --probe-every 0)")
    images = torch.from_numpy(read_idx(img_file).copy()).unsqueeze(1)
    labels = torch.from_numpy(read_idx(lbl_file).astype(np.int64))
    if len(images) != len(labels):
        raise RelaError(f"{img_file} and {lbl_file} disagree on the number of images")
    return ImageDataset("mnist", split, images, labels, 10, (0.1307,), (0.3081,))


# --- CIFAR (torchvision) --------------------------------------------------------------

@DATASETS.register("cifar10", help="torchvision; --download to fetch")
def _cifar10(split: str, root=None, download: bool = False, **_) -> ImageDataset:
    return _cifar("cifar10", split, root, download)


@DATASETS.register("cifar100", help="torchvision; --download to fetch")
def _cifar100(split: str, root=None, download: bool = False, **_) -> ImageDataset:
    return _cifar("cifar100", split, root, download)


def _cifar(name: str, split: str, root, download: bool) -> ImageDataset:
    from torchvision import datasets

    root = Path(root or os.environ.get("RELA_DATA") or "data")
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(str(root), train=split == "train", download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise RelaError(f"{name} not found under {root} ({e}); pass --download to fetch it") from None
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(ds.targets, dtype=torch.int64)
    if name == "cifar10":
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    else:
        mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    return ImageDataset(name, split, images, labels, len(ds.classes), mean, std)


# --- ImageFolder (one sub-folder per class) and WebDataset shards -------------------------

@DATASETS.register("imagefolder", arg="PATH", help="one sub-folder per class, or images directly inside "
                                                   "(unlabelled; see --labels); PATH/train + PATH/test or "
                                                   "PATH/val when present; --image-size, default 64")
def _image_folder(path: str, split: str, labels: str = "auto", **options) -> ImageDataset:
    from rela.data.files import image_folder

    return decode_files(image_folder(path, split, labels), **options)


@DATASETS.register("shards", arg="PATH", help="WebDataset tar shards made by 'rela shard' (PATH/train, "
                                              "PATH/test); --image-size, default 64")
def _shards(path: str, split: str, skip_bad_images: bool = False, **options) -> ImageDataset:
    from rela.data.files import shard_folder

    return decode_files(shard_folder(path, split, skip_bad_images), skip_bad_images=skip_bad_images, **options)


def decode_files(files, image_size: int | None = None, skip_bad_images: bool = False, verify_data: bool = False,
                 progress: bool = False, **_) -> ImageDataset:
    """Decode every image of a :class:`rela.data.files.FileSource` into memory (memory mode).

    The bank key is the files' identity (names, sizes, modification times), not the decoded
    bytes; ``verify_data`` keys it by their content instead (see :mod:`rela.data.files`).
    """
    from rela.data.files import BadImage

    image_size = image_size or DEFAULT_IMAGE_SIZE
    images = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
    good, skipped = [], list(files.skipped)
    for i in console.bar(range(len(files)), desc=f"decoding {files.root.name}", enabled=progress, unit="img"):
        try:
            images[i] = files.image(i, image_size)
            good.append(i)
        except BadImage as e:
            if not skip_bad_images:
                raise RelaError(f"cannot decode image {e.path}: {e.reason}; fix or remove it, or pass "
                                "--skip-bad-images to leave such files out") from None
            skipped.append(e.path)
    labels = torch.from_numpy(files.labels.astype(np.int64))
    if skipped:
        if not good:
            raise RelaError(f"{files.name}: none of its {len(skipped)} images decodes")
        console.warn(f"skipped {len(skipped)} image(s) of {files.root} that do not decode, e.g. {skipped[0]}")
        images, labels = images[good], labels[good]
    key = files.take(good).fingerprint(image_size, verify_data) if skipped else files.fingerprint(image_size,
                                                                                                 verify_data)
    return ImageDataset(files.name, files.split, images, labels, len(files.classes), IMAGENET_MEAN, IMAGENET_STD,
                        _fingerprint=key, skipped=tuple(skipped), unlabelled=files.unlabelled)


# --- scikit-learn's digits: a second, different small dataset -----------------------

@DATASETS.register("digits", help="scikit-learn's 1,797 8x8 digits at 28x28, fixed 80/20 split")
def _digits(split: str, **_) -> ImageDataset:
    """The 1,797 8x8 digits of scikit-learn, upsampled to 28x28 like MNIST; a fixed 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RelaError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    import torch.nn.functional as F

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(order))
    idx = order[:cut] if split == "train" else order[cut:]
    return ImageDataset("digits", split, images[idx], labels[idx], 10, (0.30,), (0.32,))


# --- synthetic (for tests) ------------------------------------------------------------

def _training_size(arg: str) -> str:
    if not arg.isdigit() or int(arg) < 1:
        raise ValueError("synthetic:N needs a whole number N >= 1")
    return arg


@DATASETS.register("synthetic", arg="N", arg_optional=True, parse=_training_size,
                   help="10 classes of noisy gratings, N training images (default 512); for tests")
def _synthetic(size: str | None, split: str, **_) -> ImageDataset:
    return synthetic(f"synthetic:{size}" if size else "synthetic", split)


def synthetic(name: str = "synthetic", split: str = "train", n: int | None = None) -> ImageDataset:
    """Ten classes of noisy coloured gratings; learnable, so k-NN beats chance.

    ``synthetic:N`` sets the training-set size (test is N/2).
    """
    size, classes = 16, 10
    if n is None:
        n_train = int(name.split(":", 1)[1]) if ":" in name else 512  # checked by _training_size
        n = n_train if split == "train" else max(n_train // 2, classes)
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=g)]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    angle = labels.float() * (torch.pi / classes) + 0.15 * torch.randn(n, generator=g)
    freq = 2.0 + (labels % 3).float()
    phase = 2 * torch.pi * torch.rand(n, generator=g)
    wave = torch.sin(freq[:, None, None] * torch.pi * (
        xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]) + phase[:, None, None])
    tint = torch.stack([(labels % 2), (labels // 2) % 2, (labels // 5) % 2], 1).float() * 0.5 + 0.25
    img = 0.5 + 0.35 * wave[:, None] * tint[:, :, None, None] + 0.1 * torch.randn(n, 3, size, size, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageDataset(name, split, images, labels, classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
