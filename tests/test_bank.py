"""The representation bank: PCA transport (spec step 2) and the on-disk cache (step 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rela.bank import BANK_FORMAT, bank_key, load_bank, load_or_extract, save_bank, transport
from rela.data import load_dataset
from rela.errors import RelaError
from rela.priors import build_prior

# --- transport: PCA + standardisation, checked against numpy ------------------------


def _features(n=300, k=12, seed=0) -> np.ndarray:
    """Correlated features with clearly separated variances (no ties between components)."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, k)) * np.linspace(5.0, 0.5, k)
    mixing = np.linalg.qr(rng.standard_normal((k, k)))[0]
    return latent @ mixing + rng.standard_normal(k) * 3  # rotated, shifted


def _numpy_pca(y: np.ndarray, m: int):
    yc = y - y.mean(0)
    _, s, vt = np.linalg.svd(yc, full_matrices=False)  # singular values descending
    proj = yc @ vt[:m].T
    z = (proj - proj.mean(0)) / proj.std(0)  # population std: unit variance over the dataset
    return z, float((s[:m] ** 2).sum() / (s ** 2).sum())


@pytest.mark.parametrize("m", [1, 5, 12])
def test_transport_matches_numpy_pca_up_to_sign(m):
    y = _features()
    targets = transport(torch.from_numpy(y).float(), m)
    z = targets.values.numpy().astype(np.float64)
    ref, explained = _numpy_pca(y, m)
    assert z.shape == (len(y), m)
    for j in range(m):
        sign = np.sign(z[:, j] @ ref[:, j])
        assert sign != 0
        np.testing.assert_allclose(z[:, j], sign * ref[:, j], atol=2e-3, err_msg=f"component {j}")
    assert targets.explained_variance == pytest.approx(explained, rel=1e-4)
    assert targets.raw_dim == y.shape[1]


def test_transport_components_match_eigh_of_covariance():
    y = _features(n=200, k=8, seed=1)
    m = 3
    z = transport(torch.from_numpy(y).float(), m).values.numpy().astype(np.float64)
    yc = y - y.mean(0)
    _, eigvecs = np.linalg.eigh(np.cov(y, rowvar=False))
    top = eigvecs[:, ::-1][:, :m]  # descending variance
    # Same subspace: the targets are a per-column rescaling of the projections, so regressing the
    # numpy projections on the targets leaves (almost) no residual.
    proj = yc @ top
    coef, *_ = np.linalg.lstsq(z, proj, rcond=None)
    np.testing.assert_allclose(z @ coef, proj, atol=1e-3 * np.abs(proj).max())
    # ... and each column's scale is the component's standard deviation.
    np.testing.assert_allclose(np.abs(np.diag(coef)), proj.std(0), rtol=1e-3)


def test_transport_zero_mean_unit_variance_uncorrelated():
    z = transport(torch.from_numpy(_features()).float(), 6).values.double()
    torch.testing.assert_close(z.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.pow(2).mean(0), torch.ones(6, dtype=torch.float64), atol=1e-4, rtol=0)
    cov = z.T @ z / len(z)
    torch.testing.assert_close(cov, torch.eye(6, dtype=torch.float64), atol=1e-3, rtol=0)


@pytest.mark.parametrize("d,k", [(4, 10), (10, 4), (7, 7)])
def test_transport_keeps_min_of_learner_and_prior_dims(d, k):
    feats = torch.from_numpy(_features(n=100, k=k)).float()
    # the trainer passes min(d, k); asking for more than k components cannot give more than k
    assert transport(feats, min(d, k)).values.shape == (100, min(d, k))
    assert transport(feats, d).values.shape == (100, min(d, k))


def test_transport_all_components_explain_everything():
    feats = torch.from_numpy(_features(k=6)).float()
    assert transport(feats, 6).explained_variance == pytest.approx(1.0, abs=1e-6)
    assert transport(feats, 2).explained_variance < 1.0


def test_transport_zero_variance_column_gives_zero_component_not_nan():
    y = _features(n=150, k=5)
    y = np.concatenate([y, np.full((150, 1), 7.25)], axis=1)  # a constant (dead) feature
    targets = transport(torch.from_numpy(y).float(), 6)
    z = targets.values
    assert torch.isfinite(z).all()
    assert torch.count_nonzero(z[:, -1]) == 0  # the last (least variance) component is the dead one
    torch.testing.assert_close(z[:, :5].pow(2).mean(0), torch.ones(5), atol=1e-4, rtol=0)
    assert targets.explained_variance == pytest.approx(1.0, abs=1e-6)


def test_transport_more_components_than_samples():
    # 5 samples span at most a 4-dimensional centred subspace: the rest are zero, not noise.
    feats = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    z = transport(feats, 10).values
    assert z.shape == (5, 10)
    assert torch.isfinite(z).all()
    alive = (z.abs().sum(0) > 0).sum().item()
    assert alive == 4


def test_transport_all_constant_features():
    targets = transport(torch.ones(20, 4) * 3.0, 4)
    assert torch.count_nonzero(targets.values) == 0
    assert targets.explained_variance == 0.0


# --- the cache -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic:64")


def _prior(data, seed=0, spec="random:convnet"):
    return build_prior(spec, learner_arch="convnet", channels=data.channels, image_size=data.image_size,
                       mean=data.mean, std=data.std, seed=seed)


def test_cache_miss_then_hit_returns_identical_features(tmp_path, data):
    prior = _prior(data)
    feats1, info1 = load_or_extract(prior, data, cache_dir=tmp_path, progress=False)
    assert info1["bank_cache_hit"] is False
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"bank-{info1['bank_key'][:24]}.pt"]
    assert info1["bank_file"] == str(files[0])
    assert feats1.shape == (len(data), 128) and info1["bank_shape"] == [len(data), 128]
    # what was extracted is what the prior computes
    torch.testing.assert_close(feats1, prior(data.images))

    mtime = files[0].stat().st_mtime_ns
    feats2, info2 = load_or_extract(_prior(data), data, cache_dir=tmp_path, progress=False)
    assert info2["bank_cache_hit"] is True
    assert info2["bank_key"] == info1["bank_key"]
    assert torch.equal(feats1, feats2)
    assert files[0].stat().st_mtime_ns == mtime  # not rewritten


def test_changed_prior_or_dataset_misses(tmp_path, data):
    _, info1 = load_or_extract(_prior(data, seed=0), data, cache_dir=tmp_path, progress=False)
    _, info2 = load_or_extract(_prior(data, seed=1), data, cache_dir=tmp_path, progress=False)
    assert info2["bank_cache_hit"] is False
    assert info2["bank_key"] != info1["bank_key"] and info2["bank_file"] != info1["bank_file"]
    assert len(list(tmp_path.iterdir())) == 2
    other = load_dataset("synthetic:80")
    assert bank_key(_prior(data), other) != bank_key(_prior(data), data)
    assert bank_key(_prior(data), data) == bank_key(_prior(data), data)
    # a prior differing only in preprocessing (another normalisation) is another prior as well
    changed = _prior(data)
    changed.std = (0.5, 0.5, 0.5)
    assert bank_key(changed, data) != bank_key(_prior(data), data)


def test_bank_of_another_dataset_via_explicit_path_is_rejected(tmp_path, data):
    path = tmp_path / "my-bank.pt"
    other = load_dataset("synthetic:80")
    load_or_extract(_prior(other), other, path=path, progress=False)
    assert path.is_file()
    with pytest.raises(RelaError, match="my-bank.pt") as e:
        load_or_extract(_prior(data), data, path=path, progress=False)
    assert "synthetic:80:train" in str(e.value) and "synthetic:64:train" in str(e.value)


def test_truncated_bank_file_is_rejected(tmp_path, data):
    prior = _prior(data)
    _, info = load_or_extract(prior, data, cache_dir=tmp_path, progress=False)
    path = tmp_path / info["bank_file"].rsplit("/", 1)[1]
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RelaError, match=path.name):
        load_or_extract(prior, data, cache_dir=tmp_path, progress=False)
    path.write_bytes(b"")
    with pytest.raises(RelaError, match="unreadable"):
        load_bank(path, info["bank_key"], data)


def test_bank_with_wrong_contents_is_rejected(tmp_path, data):
    prior = _prior(data)
    key = bank_key(prior, data)
    path = tmp_path / "bank.pt"
    torch.save({"something": "else"}, path)
    with pytest.raises(RelaError, match="not a ReLA bank"):
        load_bank(path, key, data)
    torch.save({"format": BANK_FORMAT, "key": key, "features": torch.zeros(len(data) - 1, 4)}, path)
    with pytest.raises(RelaError, match="rows"):
        load_bank(path, key, data)
    bad = torch.zeros(len(data), 4)
    bad[3, 1] = float("nan")
    torch.save({"format": BANK_FORMAT, "key": key, "features": bad}, path)
    with pytest.raises(RelaError, match="NaN"):
        load_bank(path, key, data)


def _crashing_save(obj, f, *args, **kwargs):
    f.write(b"half a bank")
    raise OSError("disk full (simulated)")


def test_crash_during_save_leaves_no_file_and_no_temp_files(tmp_path, data, monkeypatch):
    prior = _prior(data)
    feats = prior(data.images)
    key = bank_key(prior, data)
    target = tmp_path / "bank.pt"
    monkeypatch.setattr("rela.io.torch.save", _crashing_save)
    with pytest.raises(OSError, match="simulated"):
        save_bank(target, feats, key, prior, data)
    assert list(tmp_path.iterdir()) == []


def test_crash_during_save_keeps_the_old_file(tmp_path, data, monkeypatch):
    prior = _prior(data)
    feats = prior(data.images)
    key = bank_key(prior, data)
    target = tmp_path / "bank.pt"
    save_bank(target, feats, key, prior, data)
    before = target.read_bytes()
    monkeypatch.setattr("rela.io.torch.save", _crashing_save)
    with pytest.raises(OSError):
        save_bank(target, feats * 2, key, prior, data)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["bank.pt"]
    assert target.read_bytes() == before
    assert torch.equal(load_bank(target, key, data), feats)


def test_crash_during_extraction_save_then_rebuild(tmp_path, data, monkeypatch):
    """After a crashed first run the next one extracts again instead of reading half a file."""
    prior = _prior(data)
    monkeypatch.setattr("rela.io.torch.save", _crashing_save)
    with pytest.raises(OSError):
        load_or_extract(prior, data, cache_dir=tmp_path, progress=False)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    feats, info = load_or_extract(prior, data, cache_dir=tmp_path, progress=False)
    assert info["bank_cache_hit"] is False
    torch.testing.assert_close(feats, prior(data.images))
