"""The representation bank (spec steps 1-2).

``extract`` runs the prior once over the training set; ``load_or_extract``
caches the result on disk under a key derived from the prior's weights and
preprocessing and the dataset's content, writes it atomically and verifies it
on load; ``transport`` turns raw prior features into ReLA's targets: PCA to
m = min(d, k) components, each standardised over the dataset.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rela.data.datasets import ImageDataset
from rela.errors import RelaError
from rela.features import embed
from rela.io import save_torch
from rela.priors import Prior

BANK_FORMAT = "rela-bank-v1"


@dataclass
class Targets:
    """Transported targets plus what the transport kept."""

    values: torch.Tensor  # N x m, zero mean and unit variance per column
    explained_variance: float  # fraction of the prior's variance in the kept components
    raw_dim: int


def bank_key(prior: Prior, dataset: ImageDataset) -> str:
    return hashlib.sha256(f"{BANK_FORMAT}|{prior.identity()}|{dataset.fingerprint()}".encode()).hexdigest()


def extract(prior: Prior, dataset: ImageDataset, *, batch_size: int = 512, device="cpu",
            progress: bool = True) -> torch.Tensor:
    prior.model.to(device)
    try:
        return embed(prior, dataset.images, batch_size=batch_size, device=device,
                     desc=f"bank: {prior.name}" if progress else None)
    finally:
        prior.model.cpu()


def save_bank(path: Path, features: torch.Tensor, key: str, prior: Prior, dataset: ImageDataset,
              extract_seconds: float = float("nan")) -> None:
    save_torch({"format": BANK_FORMAT, "key": key, "prior": prior.name, "dataset": f"{dataset.name}:{dataset.split}",
                "num_samples": len(dataset), "features": features, "extract_seconds": extract_seconds}, path)


def load_bank(path: Path, key: str, dataset: ImageDataset, *, with_meta: bool = False):
    """Load a bank and check that it belongs to this prior and this dataset."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, ...
        raise RelaError(f"bank file {path} is unreadable ({type(e).__name__}); delete it to rebuild") from None
    if not isinstance(blob, dict) or blob.get("format") != BANK_FORMAT:
        raise RelaError(f"bank file {path} is not a ReLA bank ({BANK_FORMAT})")
    if blob.get("key") != key:
        raise RelaError(
            f"bank file {path} was made for prior {blob.get('prior')!r} on {blob.get('dataset')!r}, "
            f"not for this prior and dataset {dataset.name}:{dataset.split} (key mismatch); "
            "delete it or use another --bank path")
    feats = blob.get("features")
    if not isinstance(feats, torch.Tensor) or feats.ndim != 2 or feats.shape[0] != len(dataset):
        raise RelaError(f"bank file {path} has shape {getattr(feats, 'shape', None)}, "
                        f"expected {len(dataset)} rows (one per training image)")
    if not torch.isfinite(feats).all():
        raise RelaError(f"bank file {path} contains NaN or Inf values")
    return (feats.float(), blob) if with_meta else feats.float()


def load_or_extract(prior: Prior, dataset: ImageDataset, *, cache_dir: str | Path = ".cache/rela",
                    path: str | Path | None = None, device="cpu", progress: bool = True,
                    batch_size: int = 512) -> tuple[torch.Tensor, dict]:
    """Raw prior features for every training image, from the cache when the key matches.

    Returns the features and a small report. ``bank_seconds`` is what extracting
    the bank cost, also when this call found it cached (a cache hit is not free
    compute, only compute paid earlier); ``bank_load_seconds`` is this call's time.
    """
    key = bank_key(prior, dataset)
    path = Path(path) if path else Path(cache_dir) / f"bank-{key[:24]}.pt"
    start = time.perf_counter()
    if path.is_file():
        feats, meta = load_bank(path, key, dataset, with_meta=True)
        hit, extract_seconds = True, float(meta.get("extract_seconds", float("nan")))
    else:
        feats = extract(prior, dataset, device=device, progress=progress, batch_size=batch_size)
        hit, extract_seconds = False, time.perf_counter() - start
        save_bank(path, feats, key, prior, dataset, extract_seconds)
    return feats, {"bank_file": str(path), "bank_key": key, "bank_cache_hit": hit, "bank_seconds": extract_seconds,
                   "bank_load_seconds": time.perf_counter() - start, "bank_shape": list(feats.shape)}


def transport(features: torch.Tensor, m: int) -> Targets:
    """Center, project on the top-m principal components, standardise each component."""
    y = features.double()
    y = y - y.mean(0)
    cov = y.T @ y / max(len(y) - 1, 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    m = min(m, y.shape[1])
    top = eigvecs[:, -m:].flip(1)  # descending variance
    z = y @ top
    z = z - z.mean(0)
    std = z.pow(2).mean(0).sqrt()
    # A component with (numerically) no variance carries no information; scaling it to unit
    # variance would turn rounding noise into a target, so it is set to zero instead.
    dead = std <= 1e-6 * std.max().clamp_min(1e-30)
    z = torch.where(dead, torch.zeros_like(z), z / std.clamp_min(1e-30))
    total = eigvals.clamp_min(0).sum()
    explained = float(eigvals.flip(0)[:m].clamp_min(0).sum() / total) if total > 0 else 0.0
    return Targets(z.float(), explained, features.shape[1])
