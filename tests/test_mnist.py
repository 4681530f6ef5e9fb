"""MNIST as another dataset for a free prior: the installer's safe unpickler and the dataset loader."""

import importlib.util
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from rela.data.datasets import load_dataset
from rela.errors import RelaError

_spec = importlib.util.spec_from_file_location(
    "install_mnist", Path(__file__).resolve().parents[1] / "scripts" / "install_mnist.py")
install_mnist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install_mnist)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo planted > /dev/null",))


def test_unpickler_builds_arrays_and_refuses_any_other_global():
    arrays = {"train_X": np.arange(6, dtype=np.float64).reshape(2, 3), "train_Y(num)": np.array([1.0, 2.0])}
    back = install_mnist.ArraysOnly(io.BytesIO(pickle.dumps(arrays))).load()
    assert np.array_equal(back["train_X"], arrays["train_X"])
    with pytest.raises(pickle.UnpicklingError, match="system is not a numpy array part"):
        install_mnist.ArraysOnly(io.BytesIO(pickle.dumps({"x": _Payload()}))).load()


def test_mnist_dataset_reads_the_installed_idx_files(tmp_path, monkeypatch):
    monkeypatch.delenv("RELA_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # ./data is the last place rela looks: this checkout's own copy must not count
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = (np.arange(20) % 10).astype(np.uint8)
    (tmp_path / "mnist").mkdir()
    install_mnist.write_idx(images, tmp_path / "mnist" / "train-images-idx3-ubyte.gz")
    install_mnist.write_idx(labels, tmp_path / "mnist" / "train-labels-idx1-ubyte.gz")
    assert not list((tmp_path / "mnist").glob("*.tmp"))
    ds = load_dataset("mnist", "train", root=tmp_path)
    assert ds.num_classes == 10 and len(ds) == 20
    assert torch.equal(ds.images[3, 0], torch.from_numpy(images[3]))
    with pytest.raises(RelaError, match="test split missing"):
        load_dataset("mnist", "test", root=tmp_path)
    with pytest.raises(RelaError, match="install_mnist.py"):
        load_dataset("mnist", "train", root=tmp_path / "empty")
