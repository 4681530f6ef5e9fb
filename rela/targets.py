"""Transport (spec step 2): a prior's raw features -> ReLA's efficient targets.

The features are centred, projected on their top m principal components and each
component is standardised; :func:`transport` reads the features (a memory-mapped bank,
:mod:`rela.bank`) in blocks with float64 statistics, so the bank itself is never in
memory at once. **Limit:** the targets (N x m float32, e.g. 60k x 128 = 31 MB; 1.28M x
128 = 655 MB) are materialised and ride along to the training device, like the uint8
images of the in-memory datasets (:mod:`rela.data`); beyond that scale both would have to
be indexed from disk per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rela.bank import row_blocks
from rela.errors import RelaError


@dataclass
class Targets:
    """Transported targets plus what the transport kept."""

    values: torch.Tensor  # N x m, zero mean and unit variance per column
    explained_variance: float  # fraction of the prior's variance in the kept components


def _block64(features, a: int, b: int) -> torch.Tensor:
    if isinstance(features, torch.Tensor):
        return features[a:b].double()
    return torch.from_numpy(np.array(features[a:b], dtype=np.float64))


def kept_components(eigvals: torch.Tensor, variance: float) -> int:
    """The fewest top components (eigenvalues in any order) explaining ``variance`` of the total; all at 1."""
    values = eigvals.clamp_min(0).sort(descending=True).values
    if variance >= 1 or values.sum() <= 0:
        return len(values)
    share = values.cumsum(0) / values.sum()
    return min(int((share < variance).sum()) + 1, len(values))


def transport(features, m: int, variance: float = 1.0) -> Targets:
    """Center, project on the top-m principal components, standardise each component.

    ``features`` (N x k tensor or array, e.g. a memory-mapped bank) is read in blocks; the mean
    and covariance are merged over blocks in float64 (Chan et al.'s pairwise update, which
    keeps the precision of a two-pass computation). ``variance`` < 1 keeps fewer than m: the
    fewest top components that explain that share of the features' variance (1: all m).
    """
    n, k = features.shape
    mean = torch.zeros(k, dtype=torch.float64)
    scatter = torch.zeros(k, k, dtype=torch.float64)
    seen = 0
    for a, b in row_blocks(n, k):
        y = _block64(features, a, b)
        if not torch.isfinite(y).all():
            raise RelaError(f"bank features contain NaN or Inf values (rows {a}..{b - 1})")
        block_mean = y.mean(0)
        yc = y - block_mean
        delta = block_mean - mean
        scatter += yc.T @ yc + torch.outer(delta, delta) * (seen * (b - a) / (seen + b - a))
        mean += delta * ((b - a) / (seen + b - a))
        seen += b - a
    cov = scatter / max(n - 1, 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    m = min(m, k, kept_components(eigvals, variance))
    top = eigvecs[:, -m:].flip(1)  # descending variance
    z = torch.empty(n, m, dtype=torch.float32)
    z_sum = torch.zeros(m, dtype=torch.float64)
    z_sq = torch.zeros(m, dtype=torch.float64)
    for a, b in row_blocks(n, k):
        block = (_block64(features, a, b) - mean) @ top
        z_sum += block.sum(0)
        z_sq += block.pow(2).sum(0)
        z[a:b] = block.float()
    z_mean = z_sum / n
    std = (z_sq / n - z_mean.pow(2)).clamp_min(0).sqrt()
    # A component with (numerically) no variance carries no information; scaling it to unit
    # variance would turn rounding noise into a target, so it is set to zero instead.
    dead = std <= 1e-6 * std.max().clamp_min(1e-30)
    scale = torch.where(dead, torch.zeros_like(std), 1 / std.clamp_min(1e-30))
    z.sub_(z_mean.float()).mul_(scale.float())
    total = eigvals.clamp_min(0).sum()
    explained = float(eigvals.flip(0)[:m].clamp_min(0).sum() / total) if total > 0 else 0.0
    return Targets(z, explained)
