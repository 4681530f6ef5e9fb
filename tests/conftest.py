"""Shared helpers and the few expensive fixtures (finished tiny runs) the suite reuses.

Everything runs on CPU, offline, on tiny data: the ``synthetic`` dataset (512
images of 3x16x16 by default), 1-2 epochs, batches of 32-64.
"""

from __future__ import annotations

import gzip
import importlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from rela.cli import main
from rela.config import TrainConfig
from rela.data import Normalize
from rela.evaluate import backbone_features
from rela.priors import build_saved_backbone, load_backbone_file
from rela.build import prepare

# ``rela/__init__`` re-exports the function ``train``, which shadows the sub-module attribute.
train_module = importlib.import_module("rela.train")

# Under pytest-xdist (`make test` runs -n 2) each worker trains on one thread, and so do the processes its
# tests start: the workers then share the cores instead of each contending for all of them (tiny models gain
# little from a second intra-op thread; most of the suite's time is single-threaded Python).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# Arguments every tiny CLI run shares; tests add --out, --cache-dir and what they vary (a later --switch wins).
# The authors' adaptive switch cannot fire within these 8 steps, so a ReLA run stays in the ReLA phase unless a
# test names another switch; the default (soft-plateau) can hand over within a few steps of so short a run.
# --accelerator cpu: the thresholds these runs are checked against were measured on CPU in fp32 (on a GPU,
# "auto" trains in bf16, another run).
TINY = ["--dataset", "synthetic", "--backbone", "convnet", "--batch-size", "32", "--ratio", "0.3",
        "--epochs", "2", "--no-progress", "--switch", "adaptive", "--accelerator", "cpu"]
# 2 epochs x floor(round(0.3 * 512) / 32) = 2 x floor(154 / 32) = 2 x 4
TINY_STEPS = 2 * (round(0.3 * 512) // 32)
EVAL = ["--no-progress", "--linear-epochs", "10"]


def fashion_mnist_problem(root: Path) -> str | None:
    """Why the IDX files under ``root`` cannot be used, or None: all four there, readable, IDX headers."""
    for name in FASHION_MNIST_FILES:
        try:
            with gzip.open(root / name) as f:
                header = f.read(4)
        except (OSError, EOFError) as e:
            return f"{root / name}: {e.strerror or e}"
        if len(header) < 4 or header[:3] != b"\x00\x00\x08":
            return f"{root / name} is not an unsigned-byte IDX file"
    return None


_FASHION_MNIST_PROBLEM = fashion_mnist_problem(FASHION_MNIST_ROOT)
needs_fmnist = pytest.mark.skipif(_FASHION_MNIST_PROBLEM is not None,
                                  reason=f"Fashion-MNIST not usable (Debian's dataset-fashion-mnist): "
                                         f"{_FASHION_MNIST_PROBLEM}")


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


# --- the learner as a run started, and its untrained accuracy -------------------------------

def starting_backbone(run: Path, seed: int | None = None) -> torch.nn.Module:
    """The learner of ``run`` before its first step, rebuilt the way ``rela train`` builds it.

    ``prepare`` seeds and builds the learner before it looks at the prior, so the prior is left
    out (no bank to extract). ``seed`` rebuilds it with another seed instead.
    """
    cfg = TrainConfig.from_yaml(Path(run) / "config.yaml")
    cfg.prior, cfg.seed = "none", cfg.seed if seed is None else seed
    return prepare(cfg).method.backbone


# An optimiser step moves a weight by about the learning rate (Adam's step is normalised; lr 2e-3
# by default); weight decay alone moves it by lr * weight_decay * |w| (~1e-8) and an EMA of two
# equal copies by rounding (~1e-9): a weight that moved by more than this took optimiser steps.
MOVED = 1e-5


def parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters, not the buffers: BatchNorm running statistics change on every forward pass."""
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def untrained_twin(run: Path, dest: Path) -> dict:
    """``rela eval`` of ``run``'s learner as it was before training: the floor that training must beat."""
    dest.mkdir(parents=True)
    shutil.copy(Path(run) / "config.yaml", dest / "config.yaml")
    blob = torch.load(Path(run) / "backbone.pt", map_location="cpu", weights_only=True)
    blob["state_dict"] = starting_backbone(run).state_dict()
    torch.save(blob, dest / "backbone.pt")
    run_ok(["eval", str(dest), *EVAL])
    return read_metrics(dest)


def fit(module, max_steps: int = -1, max_epochs: int | None = None, callbacks=(), logger=False):
    """Lightning's fit of a prepared ReLAModule on CPU, without checkpoints (and logs unless ``logger``,
    which then gets every step); returns the trainer."""
    trainer = L.Trainer(max_steps=max_steps, max_epochs=max_epochs or module.cfg.epochs, accelerator="cpu",
                        devices=1, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=list(callbacks))
    trainer.fit(module)
    return trainer


# --- evaluation, recomputed ----------------------------------------------------------------------

def saved_backbone_features(run: Path, *images: torch.Tensor) -> list[torch.Tensor]:
    """Features of each uint8 image tensor under the backbone ``run`` saved, computed as ``rela eval`` does."""
    blob = load_backbone_file(Path(run) / "backbone.pt")
    backbone, normalize = build_saved_backbone(blob), Normalize(blob["mean"], blob["std"], blob["channels"])
    return [backbone_features(backbone, x, normalize) for x in images]


def weighted_knn_top1(train_features, train_labels, test_features, test_labels, k: int,
                      temperature: float = 0.1, classes: int = 10) -> float:
    """Cosine k-NN with exp(similarity / T) votes, written out in numpy (independent of rela.evaluate)."""
    def unit(x):
        x = x.numpy().astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sim = unit(test_features) @ unit(train_features).T
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(sim), classes))
    for row, neighbours in enumerate(nearest):
        np.add.at(votes[row], train_labels.numpy()[neighbours], np.exp(sim[row, neighbours] / temperature))
    return float((votes.argmax(1) == test_labels.numpy()).mean())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(args: list[list[str]], envs: list[dict], cwd: Path, timeout: float = 600) -> None:
    """Run ``python ARGS`` once per entry (with its env), all at once; each must exit 0.

    Each process gets its own session, so on a timeout its whole group goes, ranks that
    Lightning started from it included.
    """
    procs = [subprocess.Popen([sys.executable, *a], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=cwd, start_new_session=True) for a, e in zip(args, envs)]
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
        raise
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]
