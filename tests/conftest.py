"""Shared helpers and the few expensive fixtures (finished tiny runs) the suite reuses.

Everything runs on CPU, offline, on tiny data: the ``synthetic`` dataset (512
images of 3x16x16 by default), 1-2 epochs, batches of 32-64.
"""

from __future__ import annotations

import gzip
import importlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from rela.cli import main

# ``rela/__init__`` re-exports the function ``train``, which shadows the sub-module attribute.
train_module = importlib.import_module("rela.train")

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

# Arguments every tiny CLI run shares; tests add --out, --cache-dir and what they vary.
TINY = ["--dataset", "synthetic", "--backbone", "convnet", "--batch-size", "32", "--ratio", "0.3",
        "--epochs", "2", "--no-progress"]
# 2 epochs x floor(round(0.3 * 512) / 32) = 2 x floor(154 / 32) = 2 x 4
TINY_STEPS = 2 * (round(0.3 * 512) // 32)
EVAL = ["--no-progress", "--linear-epochs", "10"]


def run_ok(args: list[str]) -> None:
    """Run the CLI in-process and insist on success."""
    rc = main(args)
    assert rc == 0, f"rela {' '.join(args)} returned {rc}"


def read_metrics(run: Path) -> dict:
    return json.loads((Path(run) / "metrics.json").read_text())


def backbone_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run) / "backbone.pt", map_location="cpu", weights_only=True)["state_dict"]


# --- IDX files (the MNIST format) ---------------------------------------------------

def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """Write an unsigned-byte IDX file: 0x00 0x00 0x08 ndim, big-endian dims, raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def make_fashion_root(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """A Fashion-MNIST folder with the four standard .gz files holding tiny random data."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(root / name, array)
    return arrays


# --- finished tiny runs, shared by several test files ----------------------------------

def _train_and_eval(out: Path, cache: Path, extra: list[str]) -> Path:
    run_ok(["train", *TINY, "--out", str(out), "--cache-dir", str(cache), *extra])
    run_ok(["eval", str(out), *EVAL])
    return out


@pytest.fixture(scope="session")
def random_run(tmp_path_factory) -> Path:
    """ReLA + BYOL with a random convnet prior, trained and evaluated (probe every epoch)."""
    base = tmp_path_factory.mktemp("random_run")
    return _train_and_eval(base / "run", base / "cache", ["--prior", "random", "--probe-every", "1", "--seed", "0"])


@pytest.fixture(scope="session")
def none_run(tmp_path_factory) -> Path:
    """Plain BYOL (no prior), trained and evaluated (probe every epoch)."""
    base = tmp_path_factory.mktemp("none_run")
    return _train_and_eval(base / "run", base / "cache", ["--prior", "none", "--probe-every", "1", "--seed", "0"])


@pytest.fixture(scope="session")
def constant_run(tmp_path_factory) -> Path:
    """ReLA for the first half of the epochs (constant:0.5), then BYOL; trained and evaluated."""
    base = tmp_path_factory.mktemp("constant_run")
    return _train_and_eval(base / "run", base / "cache",
                           ["--prior", "random", "--switch", "constant:0.5", "--probe-every", "1"])
