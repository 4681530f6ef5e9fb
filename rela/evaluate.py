"""Frozen-backbone evaluation: weighted k-NN (InstDisc style) and a linear probe."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rela.build import choose_data_mode, held_out_slice, load_data, require_labels
from rela.data.files import has_test_split
from rela.config import TrainConfig
from rela.console import bar, console_scope
from rela.data import Normalize
from rela.data.augment import to_float
from rela.errors import RelaError
from rela.data.stream import default_workers
from rela.features import embed, embed_files
from rela.io import load_json, save_json
from rela.priors import build_saved_backbone, load_backbone_file


@torch.no_grad()
def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int,
                 ks=(20, 200), temperature: float = 0.1, chunk: int = 1024) -> dict[int, float]:
    """Top-1 of cosine k-NN with votes weighted by exp(similarity / temperature), for each k."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    effective = {k: min(k, len(train)) for k in ks}  # a k above the training-set size means "all"
    correct = dict.fromkeys(set(effective.values()), 0)
    for start in range(0, len(test), chunk):
        sim = test[start: start + chunk] @ train.T
        top_sim, top_idx = sim.topk(max(correct), dim=1)
        weights = (top_sim / temperature).exp()
        neighbour_labels = train_labels[top_idx]
        truth = test_labels[start: start + chunk]
        for k in correct:
            votes = torch.zeros(len(sim), num_classes).scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            correct[k] += (votes.argmax(1) == truth).sum().item()
    return {k: correct[effective[k]] / len(test) for k in ks}


def linear_probe(train_features, train_labels, test_features, test_labels, num_classes: int, *,
                 epochs: int = 50, batch_size: int = 1024, lr: float = 1e-2, weight_decay: float = 1e-4,
                 seed: int = 0, progress: bool = False) -> float:
    """Top-1 of a linear classifier trained on standardised frozen features."""
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    xtr, xte = (train_features - mean) / std, (test_features - mean) / std
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(xtr) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in bar(range(epochs), desc="eval: linear probe", enabled=progress):
        order = torch.randperm(len(xtr), generator=g)
        for start in range(0, len(xtr), batch_size):
            idx = order[start: start + batch_size]
            loss = F.cross_entropy(head(xtr[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (head(xte).argmax(1) == test_labels).float().mean().item()


@contextmanager
def _inference(backbone: nn.Module, normalize: Normalize, device):
    """uint8 batch -> features with the backbone in eval mode (its mode restored afterwards)."""
    was_training = backbone.training
    backbone.eval()
    normalize = normalize.to(device)
    try:
        yield lambda x: backbone(normalize(to_float(x)))
    finally:
        backbone.train(was_training)


def backbone_features(backbone: nn.Module, images: torch.Tensor, normalize: Normalize, *,
                      device="cpu", batch_size: int = 1024, desc: str | None = None) -> torch.Tensor:
    with _inference(backbone, normalize, device) as model:
        return embed(model, images, batch_size=batch_size, device=device, desc=desc)


def split_features(backbone: nn.Module, data, normalize: Normalize, *, device="cpu", batch_size: int = 1024,
                   workers: int = 0, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of a split: an in-memory :class:`ImageDataset`, or a stream set whose files are
    decoded in ``workers`` DataLoader workers (the images never all in memory; skipped files left out)."""
    if data.images is not None:
        return backbone_features(backbone, data.images, normalize, device=device, batch_size=batch_size,
                                 desc=desc), data.labels
    with _inference(backbone, normalize, device) as model:
        features, index = embed_files(model, data, batch_size=batch_size, device=device, workers=workers, desc=desc)
    return features, data.labels[index]


@console_scope()
def evaluate_run(run: str | Path, *, ks=(20, 200), linear_epochs: int = 50, data_root: str | None = None,
                 device: str | None = None, progress: bool = True) -> dict:
    """k-NN and linear probe of a finished run's backbone; results merged into its metrics.json."""
    run = Path(run)
    config_file, metrics_file = run / "config.yaml", run / "metrics.json"
    if not config_file.is_file():
        raise RelaError(f"{run} is not a finished run of 'rela train' (no config.yaml)")
    cfg = TrainConfig.from_yaml(config_file)
    blob = load_backbone_file(run / "backbone.pt")
    backbone = build_saved_backbone(blob)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone.to(device)
    cfg.data_root, cfg.download, cfg.progress = data_root or cfg.data_root, False, progress
    metrics = load_json(metrics_file) if metrics_file.is_file() else {}
    require_labels(cfg, "rela eval (its k-NN and linear probes score class labels)")
    # the data mode training used: a set too large for memory is evaluated from its files too
    mode = metrics.get("data_mode") or choose_data_mode(cfg)[0]
    train = load_data(cfg, "train", mode)
    if cfg.holdout is None and has_test_split(cfg.dataset) is False:
        # no test split: score a held-out slice, left out of the k-NN memory and the linear probe's training
        train, test, every = held_out_slice(train)
        test.split = f"train, 1 in {every} held out"
        print(f"eval: {cfg.dataset.partition(':')[2]} has no test/ or val/ split: scoring 1 in {every} training "
              f"images ({len(test)}), held out from the k-NN memory and the linear probe's training")
    else:
        test = load_data(cfg, "test", mode)
    normalize = Normalize(blob["mean"], blob["std"], blob["channels"])
    workers = default_workers() if cfg.num_workers is None else cfg.num_workers
    ftr, ytr = split_features(backbone, train, normalize, device=device, workers=workers,
                              desc="eval: train" if progress else None)
    fte, yte = split_features(backbone, test, normalize, device=device, workers=workers,
                              desc="eval: test" if progress else None)
    knn = knn_accuracy(ftr, ytr, fte, yte, train.num_classes, ks=ks)
    results = {f"knn{k}_top1": acc for k, acc in knn.items()}
    results["knn_top1"] = knn[max(knn)]  # the largest k (200 by default), as in lightly's benchmarks
    results["linear_top1"] = linear_probe(ftr, ytr, fte, yte, train.num_classes, epochs=linear_epochs, seed=cfg.seed,
                                          progress=progress)
    results["eval_test_images"] = len(yte)
    results["eval_split"] = test.split
    results["eval_data_mode"] = mode
    metrics.update(results)
    save_json(metrics, metrics_file)
    return metrics
