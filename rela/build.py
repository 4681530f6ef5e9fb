"""From a checked config to the parts of a run, in one place.

:func:`prepare` is the pipeline's build step, in order: data -> learner + base method ->
prior -> bank -> targets -> accelerator. ``rela train`` fits what it returns,
``rela eval`` and ``rela diagnose`` load their data through :func:`load_data` and build
their priors through :func:`prior_for`, and the benchmarks call the same functions.
Every name goes through :mod:`rela.registry`, so a bad one fails here, before any output exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only

from rela.accelerator import ReLAAccelerator, build_switch
from rela.backbones import build_backbone
from rela.bank import load_or_extract
from rela.config import TrainConfig
from rela.errors import RelaError
from rela.data import ImageDataset, load_dataset, rela_view
from rela.data.datasets import DEFAULT_IMAGE_SIZE
from rela.data.files import has_test_split, open_files
from rela.data.stream import StreamSet
from rela.data.subset import SubsetRule, build_subset, cached_prototypes
from rela.flops import prior_flops_per_image
from rela.methods import Method, build_method
from rela.priors import Prior, build_prior
from rela.schedules import momentum_schedule
from rela.targets import transport


def device_for(accelerator: str) -> str:
    """Where bank extraction and evaluation run: CUDA when there is one and the config allows it."""
    return "cuda" if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda") else "cpu"


RAM_SHARE = 0.25  # data mode auto: memory mode when the decoded training set fits this share of RAM


def load_data(cfg: TrainConfig, split: str, mode: str = "memory") -> ImageDataset | StreamSet:
    """This run's training or evaluation split (the holdout split when ``holdout`` is set).

    ``mode="stream"``: an index of the files (:class:`StreamSet`), decoded later in DataLoader workers.
    """
    limit = cfg.train_limit if split == "train" else cfg.test_limit
    if mode == "stream":
        return load_stream(cfg, split).subset(limit)
    return load_dataset(cfg.dataset, split, cfg.data_root, cfg.download, limit, cfg.image_size,
                        holdout=cfg.holdout, skip_bad_images=cfg.skip_bad_images, verify_data=cfg.verify_data,
                        labels=cfg.labels, progress=cfg.progress)


def load_stream(cfg: TrainConfig, split: str) -> StreamSet:
    from rela.data.datasets import IMAGENET_MEAN, IMAGENET_STD

    files = open_files(cfg.dataset, "train" if cfg.holdout else split, cfg.skip_bad_images, cfg.labels)
    if cfg.holdout:
        if not 0 < cfg.holdout < len(files):
            raise RelaError(f"holdout must be between 1 and {len(files) - 1} for {cfg.dataset}, got {cfg.holdout}")
        cut = len(files) - cfg.holdout
        files = files.take(slice(None, cut) if split == "train" else slice(cut, None))
        files.split = f"{split}-holdout{cfg.holdout}"
    return StreamSet(files, cfg.image_size or DEFAULT_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD,
                     skip_bad_images=cfg.skip_bad_images, verify_data=cfg.verify_data)


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_data_mode(cfg: TrainConfig, ram: int | None = None) -> tuple[str, str]:
    """(memory or stream, why): ``auto`` takes memory when N x C x H x W bytes (per process) fit 25% of RAM."""
    if cfg.data_mode != "auto":
        return cfg.data_mode, "--data-mode " + cfg.data_mode
    files = open_files(cfg.dataset, "train", cfg.skip_bad_images, cfg.labels)
    if files is None:
        return "memory", f"{cfg.dataset} is not a folder of image files"
    n = min(len(files), cfg.train_limit or len(files))
    side = cfg.image_size or DEFAULT_IMAGE_SIZE
    need = n * 3 * side * side * cfg.devices  # every process on this machine holds its own copy
    budget = RAM_SHARE * (ram or ram_bytes())
    copies = f" x {cfg.devices} processes" if cfg.devices > 1 else ""
    why = (f"decoded set {n} x 3 x {side} x {side} bytes{copies} = {need / 2**30:.2f} GiB "
           f"{'<=' if need <= budget else '>'} budget {budget / 2**30:.2f} GiB = {RAM_SHARE:.0%} of RAM")
    return ("memory" if need <= budget else "stream"), why


def no_labels(cfg: TrainConfig) -> str | None:
    """Why ``cfg``'s training data has no labels (e.g. "images directly in the folder"), or None: it has.

    Reads only the file index (no decoding), so what needs labels stops before any work.
    """
    files = open_files(cfg.dataset, "train", cfg.skip_bad_images, cfg.labels)
    return None if files is None else files.unlabelled


def require_labels(cfg: TrainConfig, what: str) -> None:
    """Stop with one line when ``what`` needs labels and ``cfg``'s data has none."""
    why = no_labels(cfg)
    if why is not None:
        folder = cfg.dataset.partition(":")[2]
        raise RelaError(f"{folder} has no labels ({why}): {what} needs labelled data (one sub-folder per class)")


PROBE_SLICE_EVERY, PROBE_SLICE_MAX = 10, 2000  # the held-out probe slice: every 10th image, at most 2000


def held_out_slice(data):
    """(memory, queries, n) for a probe of a labelled set without a test split: every n-th image (about 10 %,
    at most 2000) is a query and the rest the k-NN memory, so no query is scored against itself. The
    learner trains on all of them (without their labels): the score measures how well its features
    separate the classes, like the probe on a test split, not generalisation to unseen images."""
    n = len(data)
    every = max(PROBE_SLICE_EVERY, -(-n // PROBE_SLICE_MAX))
    queries = torch.arange(0, n, every)
    memory = torch.ones(n, dtype=torch.bool)
    memory[queries] = False
    rows = memory.nonzero().squeeze(1)
    if isinstance(data, StreamSet):
        return data.take(rows.numpy()), data.take(queries.numpy()), every
    return data.take(rows, f"probe memory /{every}"), data.take(queries, f"probe queries /{every}"), every


def probe_sets(cfg: TrainConfig, train_set, mode: str):
    """(memory, queries) of the run's k-NN probe, or None when it is off; says once why it is off or
    where its queries come from."""
    say = rank_zero_only(print)
    if not cfg.probe_every:
        return None
    if train_set.num_classes == 0:
        say(f"probe: off ({cfg.dataset.partition(':')[2]} has no labels: {train_set.unlabelled})")
        return None
    if cfg.holdout is None and has_test_split(cfg.dataset) is False:
        memory, queries, every = held_out_slice(train_set)
        say(f"probe: {cfg.dataset.partition(':')[2]} has no test/ or val/ split: the k-NN probe scores 1 in "
            f"{every} training images ({len(queries)}) against the others")
        return memory, queries
    return train_set, load_data(cfg, "test", mode)


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
    data_mode: str = "memory"
    subset: SubsetRule | None = None  # which images each epoch trains on (None: the uniform draw)
    probe_memory: ImageDataset | None = None  # the probe's k-NN memory (the training set, less any held-out slice)


def prepare(cfg: TrainConfig) -> Prepared:
    cfg.validate()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    device = device_for(cfg.accelerator)
    # 1. data
    if cfg.method == "supervised":  # before any decoding: the only method that reads labels
        require_labels(cfg, "method supervised")
    mode, why = choose_data_mode(cfg)
    rank_zero_only(print)(f"data mode: {mode} ({why})")
    train_set = load_data(cfg, "train", mode)
    probe_memory, test_set = probe_sets(cfg, train_set, mode) or (None, None)
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
                                    progress=cfg.progress, dtype=cfg.bank_dtype, workers=workers(cfg))
        targets = transport(raw, min(feature_dim, raw.shape[1]), variance=cfg.target_variance)
        info.update(prior_name=prior.name, target_dim=targets.values.shape[1],
                    bank_flops=len(train_set) * prior_flops_per_image(
                        prior.model, (prior.channels, prior.input_size, prior.input_size)),
                    target_explained_variance=targets.explained_variance)
        rela = ReLAAccelerator(feature_dim, targets.values, build_switch(cfg.switch),
                               view=rela_view(cfg.rela_augment, method.views),
                               train_transfer=cfg.transfer_head == "trained")
    # 4. the subset rule (prototype rules cluster the targets once, cached beside the bank)
    subset = build_subset(cfg.subset)
    info["selection_flops"] = 0.0
    if subset.needs_prototypes:
        if rela is None:
            raise RelaError(f"subset {cfg.subset!r} clusters the prior's targets: it needs --prior (e.g. random)")
        subset.prototypes = cached_prototypes(rela.targets.to(device), subset.k, cfg.seed, cfg.cache_dir,
                                              info["bank_key"])
        info["selection_flops"] = subset.prototypes.flops
    return Prepared(train_set, test_set, method, rela, feature_dim, info, device, mode, subset, probe_memory)


def workers(cfg: TrainConfig) -> int:
    """DataLoader workers of stream mode (bank extraction and training)."""
    from rela.data.stream import default_workers

    return default_workers() if cfg.num_workers is None else cfg.num_workers
