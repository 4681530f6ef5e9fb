"""Unlabelled image folders (``--labels auto | folders | none``) and labelled folders without a test split.

Real PNG/JPEG files written with PIL; tiny runs (convnet, 16 px, a few steps) through the CLI.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_metrics, run_ok
from PIL import Image

from rela.build import held_out_slice
from rela.cli import main
from rela.data import load_dataset
from rela.data.files import image_folder
from rela.errors import RelaError
from rela.registry import METHODS


def pattern(i: int, size: int = 16) -> np.ndarray:
    """Image ``i``: stripes whose direction and colour follow ``i``, plus a little noise."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:size, 0:size]
    wave = np.sin((xx if i % 2 else yy) * (0.5 + 0.25 * (i % 4)))
    colour = np.array([(i % 3) == 0, (i % 3) == 1, (i % 3) == 2], np.float64) * 0.6 + 0.2
    pixels = 127 + 100 * wave[..., None] * colour + rng.normal(0, 10, (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def flat_folder(root: Path, n: int = 64, suffix: str = "png") -> Path:
    """``n`` images directly in ``root``: no class folders."""
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(pattern(i)).save(root / f"img{i:03d}.{suffix}")
    return root


def nested_folder(root: Path, n: int = 64) -> Path:
    """``n`` images in nested folders that are not classes (a photo archive: year/month/...)."""
    for i in range(n):
        folder = root / f"20{20 + i % 2}" / f"{i % 3:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pattern(i)).save(folder / f"p{i:03d}.jpg", quality=90)
    return root


def class_folder(root: Path, per_class: int = 32) -> Path:
    """Two classes (vertical vs horizontal stripes), one sub-folder each, and no test/ split."""
    for c, name in enumerate(("horizontal", "vertical")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(pattern(2 * i + c)).save(root / name / f"{i:03d}.jpg", quality=90)
    return root


def train_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", f"imagefolder:{dataset}", "--image-size", "16", "--backbone", "convnet",
            "--batch-size", "16", "--ratio", "0.5", "--epochs", "2", "--no-progress", "--out", str(out),
            "--cache-dir", str(out.parent / "cache"), *extra]


def one_error_line(capsys, *parts: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rela: error: "), err
    for part in parts:
        assert part in err, err
    return err


# --- reading the folders -------------------------------------------------------------------


def test_auto_reads_images_directly_in_the_folder_as_unlabelled(tmp_path):
    root = flat_folder(tmp_path / "flat")
    (root / "notes.txt").write_text("not an image")
    files = image_folder(str(root), "train")
    assert len(files) == 64 and files.classes == [] and (files.labels == -1).all()
    assert files.unlabelled == "images directly in the folder"
    data = load_dataset(f"imagefolder:{root}", "train", image_size=16)
    assert data.num_classes == 0 and len(data) == 64 and data.images.shape == (64, 3, 16, 16)
    assert torch.equal(data.images[5], torch.from_numpy(pattern(5)).permute(2, 0, 1))  # PNG: lossless
    with pytest.raises(RelaError, match="holds images directly.*--labels folders"):
        image_folder(str(root), "train", "folders")


def test_nested_folders_that_are_not_classes_need_labels_none(tmp_path):
    root = nested_folder(tmp_path / "archive")
    assert image_folder(str(root), "train").classes == ["2020", "2021"]  # auto: sub-folders read as classes
    files = image_folder(str(root), "train", "none")
    assert len(files) == 64 and files.classes == [] and files.unlabelled == "--labels none"
    assert files.files[0] == str(Path("2020") / "00" / "p000.jpg")  # every image, recursively, sorted


@pytest.mark.parametrize("prior", ["none", "random"])
def test_unlabelled_folder_trains_byol_in_memory_mode(tmp_path, capsys, prior):
    root, out = flat_folder(tmp_path / "flat"), tmp_path / "run"
    run_ok(train_args(root, out, "--prior", prior, "--data-mode", "memory"))
    m = read_metrics(out)
    assert m["steps"] == 4 and m["images_seen"] == 64 and m["data_mode"] == "memory"  # 2 x floor(32 / 16)
    assert m["history"] == []  # no labels: no k-NN probe
    stdout = capsys.readouterr().out
    assert stdout.count("probe: off") == 1 and "has no labels: images directly in the folder" in stdout
    assert (m["rela_steps"] > 0) == (prior == "random")


@pytest.mark.parametrize("method", [m for m in METHODS.names() if m != "supervised"])
def test_every_ssl_method_trains_on_unlabelled_data(tmp_path, method):
    root, out = flat_folder(tmp_path / "flat", n=32), tmp_path / "run"
    # constant:0.5: the first epoch distils the prior, the second runs the method's own loss
    run_ok(train_args(root, out, "--method", method, "--prior", "random", "--switch", "constant:0.5",
                      "--data-mode", "memory"))
    m = read_metrics(out)
    assert m["steps"] == 2 and m["switch_step"] == 1


def test_unlabelled_folder_trains_in_stream_mode_with_a_prior(tmp_path):
    root, out = flat_folder(tmp_path / "flat"), tmp_path / "run"
    run_ok(train_args(root, out, "--prior", "random", "--data-mode", "stream", "--num-workers", "1"))
    m = read_metrics(out)
    assert m["data_mode"] == "stream" and m["steps"] == 4 and m["rela_steps"] > 0


def test_nested_unlabelled_folder_trains_with_labels_none(tmp_path):
    root, out = nested_folder(tmp_path / "archive"), tmp_path / "run"
    run_ok(train_args(root, out, "--labels", "none", "--prior", "random", "--data-mode", "stream",
                      "--num-workers", "0"))
    assert read_metrics(out)["steps"] == 4


def test_unlabelled_shards_train_in_stream_mode(tmp_path, capsys):
    root, shards = flat_folder(tmp_path / "flat"), tmp_path / "shards"
    assert main(["shard", str(root), str(shards), "--samples-per-shard", "20"]) == 0
    assert "unlabelled" in capsys.readouterr().out
    with tarfile.open(shards / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert len(names) == 20 and not any(n.endswith(".cls") for n in names)  # images only: no made-up label
    out = tmp_path / "run"
    run_ok(["train", "--dataset", f"shards:{shards}", "--image-size", "16", "--batch-size", "16", "--ratio", "0.5",
            "--epochs", "1", "--no-progress", "--data-mode", "stream", "--num-workers", "0", "--prior", "random",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert read_metrics(out)["steps"] == 2
    assert load_dataset(f"shards:{shards}", "train", image_size=16).num_classes == 0


def test_what_needs_labels_stops_in_one_line(tmp_path, capsys):
    root, out = flat_folder(tmp_path / "flat"), tmp_path / "sup"
    assert main(train_args(root, out, "--method", "supervised")) == 2
    one_error_line(capsys, f"{root} has no labels (images directly in the folder)", "supervised")
    assert not out.exists()  # stopped before anything was written
    assert main(train_args(root, out, "--labels", "folders")) == 2
    one_error_line(capsys, str(root), "--labels auto")

    run = tmp_path / "run"
    run_ok(train_args(root, run, "--epochs", "1"))
    capsys.readouterr()
    assert main(["eval", str(run), "--no-progress"]) == 2
    one_error_line(capsys, f"{root} has no labels (images directly in the folder)", "eval")
    assert main(["diagnose", "--models", "random", "--dataset", f"imagefolder:{root}", "--no-progress",
                 "--out", str(tmp_path / "diag")]) == 2
    one_error_line(capsys, "has no labels", "rank-priors is label-free")


# --- a labelled folder without a test split -----------------------------------------------------


def test_held_out_slice_is_disjoint_from_the_probe_memory(tmp_path):
    data = load_dataset(f"imagefolder:{class_folder(tmp_path / 'pets')}", "train", image_size=16)
    memory, queries, every = held_out_slice(data)
    assert every == 10 and len(queries) == 7 and len(memory) == 57  # rows 0, 10, ..., 60 held out
    assert torch.equal(queries.images, data.images[::10]) and torch.equal(queries.labels, data.labels[::10])
    rows = [r for r in range(64) if r % 10]
    assert torch.equal(memory.images, data.images[rows])


def test_labelled_folder_without_test_split_trains_with_default_options(tmp_path, capsys):
    root, out = class_folder(tmp_path / "pets"), tmp_path / "run"
    # no --probe-every: the probe is on, as by default
    run_ok(["train", "--dataset", f"imagefolder:{root}", "--image-size", "16", "--batch-size", "16",
            "--epochs", "1", "--no-progress", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    stdout = capsys.readouterr().out
    assert stdout.count("has no test/ or val/ split") == 1 and "1 in 10 training images (7)" in stdout
    m = read_metrics(out)
    assert m["steps"] == 4 and len(m["history"]) == 1
    assert 0 <= m["history"][0]["probe_knn_top1"] <= 1
    assert main(["eval", str(out), "--no-progress", "--linear-epochs", "5"]) == 0
    m = read_metrics(out)
    assert m["eval_test_images"] == 7 and m["eval_split"] == "train, 1 in 10 held out" and 0 <= m["knn_top1"] <= 1
