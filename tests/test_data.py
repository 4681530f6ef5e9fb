"""Data: the dynamic subset sampler (spec step 3), batched augmentation, datasets and their readers."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from conftest import FASHION_MNIST_ROOT, fashion_mnist_problem, make_fashion_root, needs_fmnist, write_idx
from PIL import Image

from rela.data import DynamicSubsetSampler, Normalize, ViewAugment, load_dataset, resize_center
from rela.data.augment import RELA_VIEW, grayscale, random_grayscale
from rela.data.datasets import IMAGENET_MEAN, IMAGENET_STD, read_idx
from rela.errors import RelaError

# --- the dynamic subset sampler ------------------------------------------------------


@pytest.mark.parametrize("n,ratio", [(1000, 0.2), (1000, 1.0), (101, 0.35), (7, 0.5)])
def test_subset_size_and_no_duplicates(n, ratio):
    sampler = DynamicSubsetSampler(n, ratio, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        idx = list(sampler)
        assert len(idx) == len(sampler) == round(ratio * n)
        assert len(set(idx)) == len(idx)
        assert all(0 <= i < n for i in idx)


def test_full_ratio_is_a_permutation_reshuffled_every_epoch():
    sampler = DynamicSubsetSampler(200, 1.0, seed=0)
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(200))
    assert orders[0] != orders[1]


def test_subsets_change_across_epochs():
    sampler = DynamicSubsetSampler(1000, 0.1, seed=0)
    subsets = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        subsets.append(frozenset(sampler))
    assert len(set(subsets)) == 5
    # independent uniform draws: two 10% subsets share about 10% of their elements, far from all of them
    assert all(len(a & b) < 50 for a in subsets for b in subsets if a is not b)
    # over many epochs the draws cover most of the dataset
    covered = set()
    for epoch in range(30):
        sampler.set_epoch(epoch)
        covered |= set(sampler)
    assert len(covered) > 900


def test_subset_is_a_function_of_seed_and_epoch():
    a, b, c = (DynamicSubsetSampler(500, 0.3, seed=s) for s in (7, 7, 8))
    for s in (a, b, c):
        s.set_epoch(4)
    assert list(a) == list(b)
    assert list(a) != list(c) and set(a) != set(c)
    # indices(epoch) does not depend on the sampler's current epoch
    b.set_epoch(0)
    assert torch.equal(b.indices(4), a.indices())
    assert list(b) != list(a)


@pytest.mark.parametrize("n,ratio", [(1000, 0.3), (101, 0.5), (64, 1.0)])
def test_two_ranks_are_disjoint_and_cover_the_subset(n, ratio):
    full = DynamicSubsetSampler(n, ratio, seed=1)
    r0 = DynamicSubsetSampler(n, ratio, seed=1, rank=0, world_size=2)
    r1 = DynamicSubsetSampler(n, ratio, seed=1, rank=1, world_size=2)
    for epoch in (0, 3):
        for s in (full, r0, r1):
            s.set_epoch(epoch)
        subset, i0, i1 = list(full), list(r0), list(r1)
        assert len(i0) == len(i1) == len(r0) == len(subset) // 2
        assert not set(i0) & set(i1)
        union = set(i0) | set(i1)
        assert union <= set(subset)
        tail = set(subset) - union
        assert len(tail) == len(subset) % 2  # only the uneven tail is dropped


def test_sampler_rejects_bad_ratio():
    for ratio in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            DynamicSubsetSampler(10, ratio)


# --- augmentation ---------------------------------------------------------------------


def _images(n=8, c=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("view", [RELA_VIEW, ViewAugment(), ViewAugment(solarize_p=1.0)])
@pytest.mark.parametrize("channels", [1, 3])
def test_augment_shapes_dtype_range(view, channels):
    x = _images(c=channels)
    out = view(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    resized = view(x, size=24)
    assert resized.shape == (8, channels, 24, 24)
    # float input in [0, 1] is accepted as well
    assert view(x.float() / 255).shape == x.shape


def test_augment_randomness_is_per_sample():
    torch.manual_seed(0)
    same = _images(n=1).expand(2, -1, -1, -1).contiguous()  # one batch, the same image twice
    crop_only = ViewAugment(crop_scale=(0.1, 0.9), flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    out = crop_only(same)
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    jitter_only = ViewAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=1.0, gray_p=0.0)
    out = jitter_only(same)
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    # and two calls on the same batch differ too
    assert not torch.allclose(crop_only(same), crop_only(same))


@pytest.mark.parametrize("channels", [1, 3])
def test_full_crop_with_flip_is_a_mirror(channels):
    x = _images(c=channels)
    flip = ViewAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=1.0, jitter_p=0.0, gray_p=0.0)
    expected = torch.flip(x.float() / 255, dims=[-1])
    torch.testing.assert_close(flip(x), expected, atol=1e-5, rtol=0)
    identity = ViewAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    torch.testing.assert_close(identity(x), x.float() / 255, atol=1e-5, rtol=0)


def test_grayscale_on_one_channel_is_a_no_op():
    x = _images(c=1).float() / 255
    assert torch.equal(grayscale(x), x)
    assert torch.equal(random_grayscale(x, 1.0), x)
    gray = ViewAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=1.0)
    torch.testing.assert_close(gray(_images(c=1)), x, atol=1e-5, rtol=0)


def test_grayscale_on_rgb_uses_luma_weights():
    x = _images(c=3).float() / 255
    out = random_grayscale(x, 1.0)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        torch.testing.assert_close(out[:, c], luma)


def test_normalize_adapts_channels():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    gray = torch.rand(2, 1, 5, 5)
    out = Normalize(mean, std, channels=3)(gray)
    assert out.shape == (2, 3, 5, 5)
    for c in range(3):
        torch.testing.assert_close(out[:, c], (gray[:, 0] - mean[c]) / std[c])
    rgb = torch.rand(2, 3, 5, 5)
    out = Normalize((0.5,), (0.25,), channels=1)(rgb)
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    torch.testing.assert_close(out[:, 0], (luma - 0.5) / 0.25)
    same = Normalize(mean, std)(rgb)
    torch.testing.assert_close(same, (rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))


def test_resize_center():
    x = _images(n=2, size=16)
    assert torch.equal(resize_center(x, 16), x.float() / 255)
    assert resize_center(x, 32).shape == (2, 3, 32, 32)
    wide = torch.zeros(1, 1, 10, 20, dtype=torch.uint8)
    wide[..., 5:15] = 255  # the central 10 columns are white: center-cropping keeps exactly them
    out = resize_center(wide, 10)
    assert out.shape == (1, 1, 10, 10)
    torch.testing.assert_close(out, torch.ones(1, 1, 10, 10))


# --- the IDX reader --------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 5, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"img{suffix}", images, compress)
    write_idx(tmp_path / f"lbl{suffix}", labels, compress)
    np.testing.assert_array_equal(read_idx(tmp_path / f"img{suffix}"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / f"lbl{suffix}"), labels)


def test_read_idx_rejects_bad_files(tmp_path):
    images = np.zeros((4, 3, 3), dtype=np.uint8)
    write_idx(tmp_path / "ok.gz", images)
    raw = gzip.decompress((tmp_path / "ok.gz").read_bytes())
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(raw[:-5])
    with pytest.raises(RelaError, match="short.gz.*truncated"):
        read_idx(tmp_path / "short.gz")
    with gzip.open(tmp_path / "float.gz", "wb") as f:
        f.write(bytes([0, 0, 0x0D, 1]) + (1).to_bytes(4, "big") + b"\0\0\0\0")
    with pytest.raises(RelaError, match="float.gz"):
        read_idx(tmp_path / "float.gz")
    (tmp_path / "notgz.gz").write_bytes(b"this is not gzip")
    with pytest.raises(RelaError, match="notgz.gz"):
        read_idx(tmp_path / "notgz.gz")


# --- Fashion-MNIST -----------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_fashion_mnist_from_data_root(tmp_path, monkeypatch, nested):
    monkeypatch.delenv("RELA_DATA", raising=False)
    arrays = make_fashion_root(tmp_path / "fashion-mnist" if nested else tmp_path, n_train=30, n_test=12)
    train = load_dataset("fashion-mnist", "train", root=tmp_path)
    test = load_dataset("fashion-mnist", "test", root=tmp_path)
    assert train.images.shape == (30, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte.gz"]))
    assert torch.equal(train.labels, torch.from_numpy(arrays["train-labels-idx1-ubyte.gz"]).long())
    assert torch.equal(test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte.gz"]))
    assert train.labels.dtype == torch.int64 and train.num_classes == 10
    assert train.channels == 1 and train.image_size == 28
    limited = load_dataset("fashion-mnist", "train", root=tmp_path, limit=7)
    assert torch.equal(limited.images, train.images[:7])


def test_fashion_mnist_data_root_from_environment(tmp_path, monkeypatch):
    make_fashion_root(tmp_path, n_train=10, n_test=10)
    monkeypatch.setenv("RELA_DATA", str(tmp_path))
    assert len(load_dataset("fashion-mnist", "train")) == 10


def test_fashion_mnist_missing_root_names_the_path(tmp_path, monkeypatch):
    monkeypatch.delenv("RELA_DATA", raising=False)
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(RelaError, match="empty-dir"):
        load_dataset("fashion-mnist", root=empty)
    with pytest.raises(RelaError, match="nowhere"):
        load_dataset("fashion-mnist", root=tmp_path / "nowhere")


def test_fashion_mnist_missing_test_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RELA_DATA", raising=False)
    make_fashion_root(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    assert len(load_dataset("fashion-mnist", "train", root=tmp_path)) == 40
    with pytest.raises(RelaError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("fashion-mnist", "test", root=tmp_path)


def test_fashion_mnist_label_image_count_mismatch(tmp_path, monkeypatch):
    monkeypatch.delenv("RELA_DATA", raising=False)
    make_fashion_root(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(39, dtype=np.uint8))
    with pytest.raises(RelaError, match="disagree"):
        load_dataset("fashion-mnist", "train", root=tmp_path)


def test_needs_fmnist_looks_at_the_files(tmp_path):
    """The tests that need the real data skip unless all four IDX files are there and readable."""
    assert "train-images-idx3-ubyte.gz" in fashion_mnist_problem(tmp_path)  # an empty folder
    make_fashion_root(tmp_path)
    assert fashion_mnist_problem(tmp_path) is None
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    assert "t10k-labels-idx1-ubyte.gz" in fashion_mnist_problem(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    assert "train-labels-idx1-ubyte.gz" in fashion_mnist_problem(tmp_path)


@needs_fmnist
def test_real_fashion_mnist_files(monkeypatch):
    monkeypatch.delenv("RELA_DATA", raising=False)
    test = load_dataset("fashion-mnist", "test")
    assert test.images.shape == (10_000, 1, 28, 28)
    counts = torch.bincount(test.labels, minlength=10)
    assert torch.equal(counts, torch.full((10,), 1000))  # the test split is balanced
    # the documented normalisation constants are the training set's statistics
    train = load_dataset("fashion-mnist", "train", root=FASHION_MNIST_ROOT)
    assert len(train) == 60_000
    pixels = train.images.float() / 255
    assert pixels.mean().item() == pytest.approx(train.mean[0], abs=1e-3)
    assert pixels.std().item() == pytest.approx(train.std[0], abs=1e-3)


# --- imagefolder, synthetic, cifar, errors ------------------------------------------------

COLOURS = {"blue": (0, 0, 255), "red": (255, 0, 0)}


def make_image_folder(root, splits=("train", "test"), per_class=3, size=(20, 12)):
    for split in splits:
        for cls, colour in COLOURS.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", size, colour).save(folder / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    root = make_image_folder(tmp_path / "pics", per_class=3)
    train = load_dataset(f"imagefolder:{root}", "train", image_size=8)
    test = load_dataset(f"imagefolder:{root}", "test", image_size=8)
    assert train.images.shape == (6, 3, 8, 8) and len(test) == 6
    assert train.num_classes == 2
    # ImageFolder sorts class folders: blue = 0, red = 1
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    for image, label in zip(train.images, train.labels):
        colour = torch.tensor(list(COLOURS.values())[label], dtype=torch.uint8).view(3, 1, 1)
        assert torch.equal(image, colour.expand(3, 8, 8))
    assert (train.mean, train.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_image_folder_val_split_and_flat_layout(tmp_path):
    val = make_image_folder(tmp_path / "a", splits=("train", "val"), per_class=2)
    assert len(load_dataset(f"imagefolder:{val}", "test", image_size=8)) == 4
    flat = tmp_path / "flat"
    for cls, colour in COLOURS.items():
        (flat / cls).mkdir(parents=True)
        Image.new("RGB", (9, 9), colour).save(flat / cls / "x.png")
    assert len(load_dataset(f"imagefolder:{flat}", "train", image_size=8)) == 2
    with pytest.raises(RelaError, match="no test/ or val/"):
        load_dataset(f"imagefolder:{flat}", "test", image_size=8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(RelaError, match="no-such-folder"):
        load_dataset(f"imagefolder:{tmp_path / 'no-such-folder'}")
    root = make_image_folder(tmp_path / "pics", per_class=1)
    (root / "train" / "red" / "0.png").write_bytes(b"not a png at all")
    with pytest.raises(RelaError, match="0.png"):
        load_dataset(f"imagefolder:{root}", image_size=8)


def test_synthetic_dataset():
    train, test = load_dataset("synthetic"), load_dataset("synthetic", "test")
    assert train.images.shape == (512, 3, 16, 16) and len(test) == 256
    assert train.num_classes == 10
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 512 // 10 + 0).index_fill(
        0, torch.arange(512 % 10), 512 // 10 + 1))
    assert len(load_dataset("synthetic:100")) == 100
    assert torch.equal(load_dataset("synthetic").images, train.images)  # deterministic
    assert not torch.equal(test.images, train.images[:256])
    assert train.fingerprint() != test.fingerprint()
    assert train.fingerprint() == load_dataset("synthetic").fingerprint()


def test_cifar_missing_root_does_not_download(tmp_path):
    with pytest.raises(RelaError, match="cifar10.*not found under.*--download"):
        load_dataset("cifar10", root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_dataset_and_split():
    with pytest.raises(RelaError, match="'mnist-ish'"):
        load_dataset("mnist-ish")
    with pytest.raises(RelaError, match="'validation'"):
        load_dataset("synthetic", "validation")


@pytest.mark.parametrize("name", ["synthetic:abc", "synthetic:0"])
def test_bad_synthetic_size_is_a_user_error(name):
    with pytest.raises(RelaError, match=name.split(":")[1]):
        load_dataset(name)
