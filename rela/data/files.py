"""Image files on disk, read one at a time: an image folder or WebDataset tar shards.

A :class:`FileSource` is an index of encoded images (a path per image, or a shard and
byte range per image) with their labels; it reads one image's bytes on demand and never
holds the decoded set. Both data modes decode through :func:`decode`, so an image is the
same uint8 tensor whether the whole set is decoded up front (memory mode) or per sample
in DataLoader workers (stream mode, :mod:`rela.data.stream`).

**Identity without reading every byte.** :meth:`FileSource.fingerprint` keys a bank by
the sorted file list (paths relative to the folder), the labels, each file's size and
modification time (for shards: the shard files' sizes and mtimes plus the index), the
split and the decode size. Listing and ``stat`` cost seconds for ImageNet; hashing its
140 GB would cost minutes to hours on every run. ``verify=True`` (``--verify-data``) hashes
every file's content instead.

**Shards** (``rela shard``, the ``shards:PATH`` dataset) are WebDataset tar files --
``KEY.jpg`` (the original encoded bytes) + ``KEY.cls`` (the label) per sample -- plus
``index.json`` (classes, shard names, sizes, sample counts) and ``index.npy`` (shard,
byte offset, byte size, label per sample), written by ``rela shard``. The index gives
random access by sample number (``os.pread`` at an offset), which the per-epoch random
subset needs; the tars stay plain WebDataset shards any WebDataset pipeline reads.

**Unlabelled folders** (``labels``: :func:`unlabelled_reason`): images directly in the folder, or
``labels="none"``, index every image under it, recursively, with no classes and every label -1
(:data:`NO_LABEL`); their shards hold ``KEY.<ext>`` alone (no ``.cls``) and index.json says why.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from rela.console import bar, console_scope
from rela.errors import RelaError

SHARD_FORMAT = "rela-shards-v1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# What PIL raises for files that are not images, truncated or corrupt (its UnidentifiedImageError is an
# OSError; zlib's error comes through from broken PNG streams).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error)


class BadImage(Exception):
    """One image that cannot be read or decoded: ``path`` names it, ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def decode(data: bytes, image_size: int, path: str = "?") -> torch.Tensor:
    """Encoded image bytes -> uint8 3 x image_size x image_size (shorter side resized, centre crop)."""
    from PIL import Image
    from torchvision.transforms import v2

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")  # decodes the whole file: truncation shows here
    except DECODE_ERRORS as e:
        raise BadImage(path, f"{type(e).__name__}: {e}") from None
    return v2.functional.pil_to_tensor(v2.functional.center_crop(v2.functional.resize(rgb, image_size), image_size))


LABELS = ("auto", "folders", "none")  # how an image folder's labels are read (TrainConfig.labels)
NO_LABEL = -1  # the label of every image of an unlabelled set


def split_dir(base: Path, split: str) -> Path:
    """The folder of ``split``: base/train, base/test or base/val, or base itself for a flat training folder."""
    if not base.is_dir():
        raise RelaError(f"image folder {base} does not exist")
    names = ("train",) if split == "train" else ("test", "val")
    found = next((base / n for n in names if (base / n).is_dir()), None)
    if found is None:
        if split == "test":
            raise RelaError(f"image folder {base} has no test/ or val/ sub-folder to evaluate on")
        found = base  # the authors' layout: the folder itself holds one sub-folder per class
    return found


def has_test_split(spec: str) -> bool | None:
    """Whether ``imagefolder:PATH`` / ``shards:PATH`` has a test (or val) split; None for other datasets."""
    kind, _, path = spec.partition(":")
    base = Path(path).expanduser()
    if kind == "imagefolder":
        return any((base / n).is_dir() for n in ("test", "val"))
    if kind == "shards":
        return any((base / n / "index.json").is_file() for n in ("test", "val"))
    return None


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def all_images(folder: Path) -> list[str]:
    """Every image file under ``folder``, recursively, as sorted paths relative to it (hidden entries left out)."""
    found = []
    for top, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(top, n), folder) for n in names if _is_image(n)]
    return sorted(found)


def unlabelled_reason(folder: Path, labels: str) -> str | None:
    """Why ``folder`` is read without labels under the rule ``labels``, or None: it is read as class folders.

    ``auto``: images directly in the folder mean an unlabelled set (the common case of a photo dump);
    a folder holding only sub-folders is read as one sub-folder per class, as torchvision does.
    """
    if labels == "none":
        return "--labels none"
    direct = any(e.is_file() and _is_image(e.name) for e in os.scandir(folder))
    if not direct:
        return None
    if labels == "folders":
        raise RelaError(f"image folder {folder} holds images directly, not one sub-folder per class as --labels "
                        "folders requires; pass --labels auto (or none) to train on it unlabelled")
    return "images directly in the folder"


@dataclass
class FileSource:
    """Encoded images, one per index: files of a folder or byte ranges of tar shards."""

    name: str  # the dataset spec, e.g. imagefolder:/data/pets
    split: str
    root: Path  # the split's folder (image folder) or shard folder
    classes: list[str]
    labels: np.ndarray  # int64, one per image
    files: list[str] = field(default_factory=list)  # image folder: paths relative to root
    shards: list[dict] = field(default_factory=list)  # shards: index.json's shard records
    slots: np.ndarray | None = None  # shards: rows of (shard, offset, size, label)
    skipped: list[str] = field(default_factory=list)  # images left out when opening (a truncated shard's)
    unlabelled: str | None = None  # why the set has no labels (no classes, every label NO_LABEL), or None
    _fds: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def kind(self) -> str:
        return "shards" if self.slots is not None else "folder"

    def describe(self, i: int) -> str:
        """How an error names image ``i``: its path, or its shard and key."""
        if self.slots is None:
            return str(self.root / self.files[i])
        return f"{self.root / self.shards[int(self.slots[i, 0])]['file']} (sample {i})"

    def read(self, i: int) -> bytes:
        """The encoded bytes of image ``i``; :class:`BadImage` when they cannot be read."""
        if self.slots is None:
            try:
                return (self.root / self.files[i]).read_bytes()
            except OSError as e:
                raise BadImage(self.describe(i), e.strerror or str(e)) from None
        shard, offset, size = (int(v) for v in self.slots[i, :3])
        key = (os.getpid(), shard)  # descriptors are per process: DataLoader workers open their own
        try:
            fd = self._fds.get(key)
            if fd is None:
                fd = self._fds[key] = os.open(self.root / self.shards[shard]["file"], os.O_RDONLY)
            data = os.pread(fd, size, offset)
        except OSError as e:
            raise BadImage(self.describe(i), e.strerror or str(e)) from None
        if len(data) != size:
            raise BadImage(self.describe(i), f"shard truncated: {len(data)} of {size} bytes at offset {offset}")
        return data

    def image(self, i: int, image_size: int) -> torch.Tensor:
        return decode(self.read(i), image_size, self.describe(i))

    def take(self, rows) -> "FileSource":
        """The images at ``rows`` (a slice or index array), in that order."""
        rows = np.arange(len(self))[rows]
        return replace(self, labels=self.labels[rows],
                       files=[self.files[r] for r in rows] if self.slots is None else [],
                       slots=None if self.slots is None else self.slots[rows], _fds={})

    def fingerprint(self, image_size: int, verify: bool = False) -> str:
        """What a bank of this data is keyed by (see the module notes); ``verify`` hashes every byte."""
        h = hashlib.sha256(f"{SHARD_FORMAT}|{self.kind}|{self.split}|{image_size}|{len(self)}|"
                           f"{'/'.join(self.classes)}|{'content' if verify else 'stat'}".encode())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        if verify:
            for i in range(len(self)):
                h.update(hashlib.sha256(self.read(i)).digest())
        elif self.slots is None:
            for rel in self.files:
                st = os.stat(self.root / rel)
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            h.update(np.ascontiguousarray(self.slots).tobytes())
            for s in self.shards:
                st = os.stat(self.root / s["file"])
                h.update(f"{s['file']}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def image_folder(path: str, split: str, labels: str = "auto") -> FileSource:
    """Index ``imagefolder:PATH``'s split: one sub-folder per class, or unlabelled (see :func:`unlabelled_reason`).

    An unlabelled set holds every image under the split's folder, recursively, in sorted order.
    """
    from torchvision.datasets.folder import find_classes, make_dataset

    if labels not in LABELS:
        raise RelaError(f"unknown labels {labels!r}; valid choices: {', '.join(LABELS)}")
    base = Path(path).expanduser()
    folder = split_dir(base, split)
    why = unlabelled_reason(folder, labels)
    if why is not None:
        files = all_images(folder)
        if not files:
            raise RelaError(f"image folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return FileSource(f"imagefolder:{base.resolve()}", split, folder, [], np.full(len(files), NO_LABEL),
                          files=files, unlabelled=why)
    try:
        classes, class_to_idx = find_classes(str(folder))
        samples = make_dataset(str(folder), class_to_idx, extensions=IMAGE_SUFFIXES)
    except (FileNotFoundError, RuntimeError) as e:
        raise RelaError(f"image folder {folder}: {e}") from None
    files = [os.path.relpath(p, folder) for p, _ in samples]
    labels = np.array([label for _, label in samples], dtype=np.int64)
    return FileSource(f"imagefolder:{base.resolve()}", split, folder, classes, labels, files=files)


def shard_folder(path: str, split: str, skip_bad_images: bool = False) -> FileSource:
    """Open ``shards:PATH``'s split, written by :func:`write_shards`; checks every shard's size.

    A shard that is missing, empty or of another size than the index says is an error naming it,
    or, with ``skip_bad_images``, left out with all its samples (listed in ``skipped``).
    """
    base = Path(path).expanduser()
    if not base.is_dir():
        raise RelaError(f"shard folder {base} does not exist")
    names = ("train",) if split == "train" else ("test", "val")
    folder = next((base / n for n in names if (base / n / "index.json").is_file()), None)
    if folder is None:
        folder = base if split == "train" and (base / "index.json").is_file() else None
    if folder is None:
        raise RelaError(f"shard folder {base} has no index.json for the {split} split; "
                        "make shards with: rela shard IMAGEFOLDER OUT")
    try:
        index = json.loads((folder / "index.json").read_text())
        slots = np.load(folder / "index.npy")
    except (OSError, ValueError) as e:
        raise RelaError(f"shard index of {folder} is unreadable ({type(e).__name__}: {e}); "
                        "make the shards again with rela shard") from None
    if index.get("format") != SHARD_FORMAT or slots.ndim != 2 or slots.shape[1] != 4:
        raise RelaError(f"{folder / 'index.json'} is not a {SHARD_FORMAT} index")
    keep, skipped = np.ones(len(slots), dtype=bool), []
    for k, s in enumerate(index["shards"]):
        f = folder / s["file"]
        size = f.stat().st_size if f.is_file() else None
        if size != s["bytes"]:
            state = ("missing" if size is None else "empty" if size == 0
                     else f"truncated or changed ({size} bytes, the index says {s['bytes']})")
            if not skip_bad_images:
                raise RelaError(f"shard {f} is {state}; make the shards again with rela shard, or pass "
                                "--skip-bad-images to leave its images out")
            lost = slots[:, 0] == k
            keep &= ~lost
            skipped += [f"{f} (sample {i})" for i in np.flatnonzero(lost)]
    if not keep.any():
        raise RelaError(f"shard folder {folder}: no readable shard left")
    slots = slots[keep]
    unlabelled = None if index["classes"] else f"shards of {index.get('unlabelled', 'an unlabelled folder')}"
    return FileSource(f"shards:{base.resolve()}", split, folder, list(index["classes"]),
                      slots[:, 3].astype(np.int64), shards=list(index["shards"]), slots=slots, skipped=skipped,
                      unlabelled=unlabelled)


def open_files(spec: str, split: str, skip_bad_images: bool = False, labels: str = "auto") -> FileSource | None:
    """The :class:`FileSource` of a dataset spec, or None for datasets that are not files (fashion-mnist, ...)."""
    kind, _, path = spec.partition(":")
    if kind == "imagefolder":
        return image_folder(path, split, labels)
    if kind == "shards":
        return shard_folder(path, split, skip_bad_images)
    return None


@console_scope()
def write_shards(src: FileSource, out: Path, samples_per_shard: int = 10_000, progress: bool = False) -> dict:
    """Copy ``src``'s encoded images, unchanged, into WebDataset tars under ``out`` plus the index."""

    if samples_per_shard < 1:
        raise RelaError(f"samples per shard must be >= 1, got {samples_per_shard}")
    out.mkdir(parents=True, exist_ok=True)
    shards, rows = [], []
    images = bar(total=len(src), desc=f"shard: {src.root.name}", enabled=progress, unit="img")
    for first in range(0, len(src), samples_per_shard):
        name = f"shard-{len(shards):06d}.tar"
        tmp = out / f".{name}.tmp"
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(first, min(first + samples_per_shard, len(src))):
                try:
                    data = src.read(i)
                except BadImage as e:
                    raise RelaError(f"cannot read image {e.path}: {e.reason}") from None
                suffix = Path(src.files[i]).suffix.lower().lstrip(".") if src.slots is None else "img"
                key = f"{i:09d}"
                members = [(f"{key}.{suffix}", data)]
                if src.classes:  # an unlabelled set's samples are the image alone (WebDataset has no "no label")
                    members.append((f"{key}.cls", str(src.labels[i]).encode()))
                for member, payload in members:
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime, info.mode = len(payload), 0, 0o444
                    tar.addfile(info, io.BytesIO(payload))
                images.update()
        shard = len(shards)
        with tarfile.open(tmp) as tar:  # where each image's bytes landed: the random-access index
            for m in tar.getmembers():
                if not m.name.endswith(".cls"):
                    i = int(m.name.split(".", 1)[0])
                    rows.append((shard, m.offset_data, m.size, int(src.labels[i])))
        os.replace(tmp, out / name)
        shards.append({"file": name, "bytes": (out / name).stat().st_size,
                       "samples": min(samples_per_shard, len(src) - first)})
    images.close()
    np.save(out / "index.npy", np.array(rows, dtype=np.int64).reshape(-1, 4))
    index = {"format": SHARD_FORMAT, "classes": src.classes, "samples": len(src), "shards": shards}
    if src.unlabelled:
        index["unlabelled"] = src.unlabelled
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index
