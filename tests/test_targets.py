"""Transport (spec step 2): PCA + standardisation of a prior's features, checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rela.errors import RelaError
from rela.targets import transport

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


def test_transport_reads_in_blocks_like_in_one_piece(monkeypatch):
    y = _features(n=500, k=12, seed=2)
    whole = transport(torch.from_numpy(y), 5)
    # ~40 rows per block: the float64 statistics are merged over 13 blocks
    monkeypatch.setattr("rela.bank.BLOCK_BYTES", 40 * 12 * 8)
    blocked = transport(y, 5)  # a numpy array (what a memory map is) as well as a tensor
    torch.testing.assert_close(blocked.values, whole.values, atol=1e-5, rtol=0)
    assert blocked.explained_variance == pytest.approx(whole.explained_variance, rel=1e-9)


def test_transport_rejects_non_finite_features():
    y = torch.from_numpy(_features(n=50, k=4))
    y[7, 2] = float("inf")
    with pytest.raises(RelaError, match="NaN or Inf"):
        transport(y, 2)
