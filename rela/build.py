"""From a checked config to the parts of a run, in one place.

:func:`prepare` is the pipeline's build step, in order: data -> learner + base method ->
prior -> bank -> targets -> accelerator. ``rela train`` fits what it returns,
``rela eval`` and ``rela diagnose`` load their data through :func:`load_data` and build
their priors through :func:`prior_for`, and the benchmarks call the same functions.
Every name goes through :mod:`rela.registry`, so a bad one fails here, before any output exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch

from rela.accelerator import ReLAAccelerator, build_switch
from rela.backbones import build_backbone
from rela.bank import load_or_extract
from rela.config import TrainConfig
from rela.data import ImageDataset, load_dataset
from rela.flops import prior_flops_per_image
from rela.methods import Method, build_method
from rela.priors import Prior, build_prior
from rela.schedules import momentum_schedule
from rela.targets import transport


def device_for(accelerator: str) -> str:
    """Where bank extraction and evaluation run: CUDA when there is one and the config allows it."""
    return "cuda" if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda") else "cpu"


def load_data(cfg: TrainConfig, split: str) -> ImageDataset:
    """This run's training or evaluation split (the holdout split when ``holdout`` is set)."""
    limit = cfg.train_limit if split == "train" else cfg.test_limit
    return load_dataset(cfg.dataset, split, cfg.data_root, cfg.download, limit, cfg.image_size,
                        holdout=cfg.holdout, skip_bad_images=cfg.skip_bad_images)


def prior_for(spec: str, data: ImageDataset, *, learner_arch: str, seed: int,
              weights: str | None = None, learner: torch.nn.Module | None = None) -> Prior | None:
    """The prior ``spec`` names, seeing ``data`` as the learner does (a random prior gets its size and normalisation).

    ``learner``: the learner's backbone before training, which ``learner-init`` copies.
    """
    return build_prior(spec, learner_arch=learner_arch, channels=data.channels, image_size=data.image_size,
                       mean=data.mean, std=data.std, seed=seed, weights=weights, learner=learner)


def method_options(cfg: TrainConfig) -> dict:
    """The base method's keyword options: ``extra``, plus ``hidden_dim`` when the field is set."""
    return {**cfg.extra, **({"hidden_dim": cfg.hidden_dim} if cfg.hidden_dim is not None else {})}


@dataclass
class Prepared:
    """Everything a run needs, resolved and checked, before any output is written."""

    train_set: ImageDataset
    test_set: ImageDataset | None  # the probe's queries; None when probing is off
    method: Method  # owns the learner backbone
    rela: ReLAAccelerator | None  # None: the plain base method
    feature_dim: int
    bank_info: dict
    device: str


def prepare(cfg: TrainConfig) -> Prepared:
    cfg.validate()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    device = device_for(cfg.accelerator)
    # 1. data
    train_set = load_data(cfg, "train")
    test_set = load_data(cfg, "test") if cfg.probe_every else None
    # 2. learner + base method
    backbone, feature_dim = build_backbone(cfg.backbone, train_set.channels, train_set.image_size)
    method = build_method(cfg.method, backbone, feature_dim, train_set.num_classes, **method_options(cfg))
    method.momentum_schedule = momentum_schedule(cfg.momentum_schedule)
    # 3. prior -> bank -> targets -> accelerator
    prior = prior_for(cfg.prior, train_set, learner_arch=cfg.backbone, weights=cfg.prior_weights,
                      seed=cfg.seed + 1 if cfg.prior_seed is None else cfg.prior_seed, learner=backbone)
    rela, info = None, {"bank_seconds": 0.0, "target_dim": None, "target_explained_variance": None}
    if prior is not None:
        raw, info = load_or_extract(prior, train_set, cache_dir=cfg.cache_dir, path=cfg.bank, device=device,
                                    progress=cfg.progress, dtype=cfg.bank_dtype)
        targets = transport(raw, min(feature_dim, raw.shape[1]), variance=cfg.target_variance)
        info.update(prior_name=prior.name, target_dim=targets.values.shape[1],
                    bank_flops=len(train_set) * prior_flops_per_image(
                        prior.model, (prior.channels, prior.input_size, prior.input_size)),
                    target_explained_variance=targets.explained_variance)
        rela = ReLAAccelerator(feature_dim, targets.values, build_switch(cfg.switch),
                               train_transfer=cfg.transfer_head == "trained")
    return Prepared(train_set, test_set, method, rela, feature_dim, info, device)
