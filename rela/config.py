"""Run configuration: one dataclass, loadable from YAML, checked before anything runs.

Only data: the fields and the checks of their values (types, ranges, names known to
:mod:`rela.registry`). Nothing is built or loaded here; :mod:`rela.build` does that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import get_args, get_type_hints

import torch
import yaml

from rela.errors import RelaError, unknown
from rela.registry import (BACKBONES, BANK_DTYPES, DATASETS, LOGGERS, LR_SCHEDULES, METHODS, MOMENTUM_SCHEDULES,
                           PRESETS, PRIORS, SUBSETS, SWITCHES)

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "bf16-mixed")
TRANSFER_HEADS = ("trained", "frozen")  # frozen: a fixed random linear map, as in the authors' code
SWITCH_AUG_AT = ("step", "epoch")  # when the base method's augmentations replace ReLA's after the switch
RELA_AUGMENTS = ("rela", "weak", "method")  # the ReLA phase's views (rela.data.augment.rela_view)
MOMENTUM_AFTER_SWITCH = ("continue", "restart")  # the momentum schedule across the hand-over
# Fields that only a run with a prior reads: a baseline (prior "none") is the same run whatever they hold,
# so a benchmark that varies them need not retrain its baselines (tests/test_fidelity_options.py checks it).
PRIOR_ONLY_FIELDS = frozenset({"prior_weights", "prior_seed", "switch", "bank", "bank_dtype", "target_variance",
                               "transfer_head", "switch_aug_at", "rela_augment", "momentum_after_switch"})
# Fields that only the hand-over reads: a run whose switch is "never" (distillation only) ignores them.
HANDOVER_ONLY_FIELDS = frozenset({"switch_aug_at", "momentum_after_switch"})
# Fields that a run over all the data (ratio 1) ignores: every subset rule is then the uniform draw.
FULL_DATA_IGNORED_FIELDS = frozenset({"subset"})
DATA_MODES = ("auto", "memory", "stream")
LABELS = ("auto", "folders", "none")  # how an image folder's labels are read (rela.data.files.unlabelled_reason)
AUGMENT_ON = ("device", "workers")  # stream mode: where the views are made


# Why each default is what it is, one line each: shown in `rela train --help` and the docs' CLI reference.
# A line cites the measurement behind the default (benchmarks/results/...) or says it is a convention.
DEFAULT_WHY = {
    "switch": "soft-plateau had the best k-NN + linear mean of the four rules on the holdout at E = 32 "
              "(table1_e32_switch_val10000.md); the authors' adaptive rule cannot fire before ~2,400 steps",
    "prior": "none trains the plain base method; a ReLA run names its prior (random costs nothing and "
             "helped every SSL method in methods.md)",
    "transfer_head": "training the head measured +2.1 k-NN / +1.5 linear over the authors' frozen map (fidelity.md)",
    "target_variance": "keeping every component: q = 0.9 lost ~6-8 k-NN points, 0.99 and 0.999 were within "
                       "0.5 of 1.0 (conditioning_val10000.md)",
    "bank_dtype": "float16 halves the bank and scored as float32 within 0.1 point (conditioning_val10000.md)",
    "lr_schedule": "cosine kept: constant raised ReLA's k-NN but erased the hand-over's linear margin on the "
                   "holdout (table1_e32_val10000_set-lr_schedule*.md)",
    "rela_augment": "the spec's views kept ReLA highest of rela / weak / method on the holdout "
                    "(table1_e32_val10000_set-rela_augment*.md)",
    "momentum_after_switch": "restart added ~0.2 k-NN and nothing on linear over 2 seeds on the holdout: "
                             "not adopted (table1_e32_val10000_set-momentum_after_switchrestart.md)",
    "switch_aug_at": "the method's own views from the next step; waiting for the epoch (the authors') measured "
                     "no difference (fidelity_constant0.75.md)",
    "momentum_schedule": "lightly's BYOL schedule (0.99 -> 1); the authors' constant 0.99 was within noise "
                         "(fidelity_constant0.75.md)",
    "lr": "AdamW 2e-3 with weight decay 1e-4; the authors' 1e-3 / 0.01 measured -0.4 k-NN / -0.3 linear (fidelity.md)",
    "weight_decay": "see lr: the authors' 0.01 (with lr 1e-3) measured -0.4 k-NN / -0.3 linear (fidelity.md)",
    "subset": "random, the paper's rule: on the holdout at 30 % loss, prototype-hard and prototype-cover "
              "came within 0.3 points of it, inside its seed-to-seed spread (table1_e32_val10000_set-subset*.md)",
    "ratio": "1.0 is the full-data baseline; ReLA's gains are largest at small ratios (table1_e32.md: 10%-50%)",
    "backbone": "convnet: the 3-layer CNN every CPU result here was measured with",
    "method": "byol: the base method of the paper's Table 1 and of every Table 1 row here",
    "probe_every": "one k-NN probe per epoch draws the accuracy-vs-cost curve in metrics.json (0 turns it off)",
    "checkpoint_every": "200 steps bounds the work a kill loses (kill_resume.json: resumed runs match exactly)",
    "labels": "both common layouts then train without a flag: class sub-folders, or images directly in the "
              "folder (unlabelled)",
    "augment_on": "device: a stream run then trains bit for bit as the memory-mode run (a test), workers only decode",
}


def _coerce(value, hint, where: str):
    """Check a YAML value against the field's type; numbers written as strings (YAML's 1e-3) become floats."""
    options = get_args(hint) or (hint,)
    if value is None and type(None) in options:
        return None
    for kind in (bool, int, float, str, dict):
        if kind not in options:
            continue
        if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (bool, str, dict) and isinstance(value, kind):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise RelaError(f"{where} must be {names}, got {value!r}")


@dataclass
class TrainConfig:
    # data
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    download: bool = False
    train_limit: int | None = None  # use only the first N training images
    test_limit: int | None = None
    image_size: int | None = None  # imagefolder: side the images are resized to (default 64)
    holdout: int | None = None  # evaluate on the last N training images instead of the test split
    skip_bad_images: bool = False  # imagefolder: skip (and count) files that do not decode instead of failing
    data_mode: str = "auto"  # memory | stream | auto (memory when the decoded set fits 25% of RAM)
    num_workers: int | None = None  # stream mode: DataLoader workers (default: cores - 1, at most 8)
    prefetch_factor: int = 2  # stream mode: batches each worker prepares ahead
    augment_on: str = "device"  # stream mode: workers decode, the training device augments batches (as memory
    #   mode does); "workers": the workers also augment, per sample (torchvision v2)
    verify_data: bool = False  # key image files by their content (hash every byte), not names/sizes/mtimes
    labels: str = "auto"  # imagefolder: class sub-folders, or unlabelled when images sit directly in the folder;
    #   "folders": require class folders; "none": every image under the folder, unlabelled
    # learner and method
    backbone: str = "convnet"
    method: str = "byol"
    # ReLA
    prior: str = "none"
    prior_weights: str | None = None
    prior_seed: int | None = None  # default: seed + 1, so a random prior differs from the learner's init
    switch: str = "soft-plateau"  # chosen on the holdout (DEFAULT_WHY); the authors' rule: "adaptive"
    bank: str | None = None  # explicit bank file; default: a content-keyed file under cache_dir
    cache_dir: str = ".cache/rela"
    bank_dtype: str = "float16"  # float32 doubles the bank's size for features beyond fp16 range/precision
    target_variance: float = 1.0  # keep the top components explaining this share of the prior's variance (1: all m)
    transfer_head: str = "trained"  # trained | frozen (the authors' code leaves it out of the optimiser)
    switch_aug_at: str = "step"  # the method's views after the switch from its next step, or its next epoch
    rela_augment: str = "rela"  # the ReLA phase's views: the spec's (mild crops, strong jitter), weak, or the method's
    momentum_after_switch: str = "continue"  # restart: the momentum schedule starts again where the method's loss does
    # budget and optimisation
    ratio: float = 1.0
    subset: str = "random"  # which ratio * N images each epoch trains on (rela.data.subset; random: the paper's)
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (a budget that is not whole epochs);
    # 0: no training at all, the learner as initialised (the no-training floor of a benchmark)
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: float = 0.02  # fraction of all steps
    lr_schedule: str = "cosine"  # after the warm-up: cosine decay to 0, or constant (see rela.schedules)
    momentum_schedule: str = "cosine"  # EMA weight of momentum networks: cosine from start to end, or constant start
    hidden_dim: int | None = None  # hidden width of the method's heads (None: the method's default, BYOL 1024)
    # run
    seed: int = 0
    out: str = "runs/rela"
    resume: bool = False
    checkpoint_every: int = 200  # optimizer steps between mid-epoch checkpoints (0: epoch ends only)
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1  # machines (multi-node DDP, e.g. one SLURM task per device)
    sync_batchnorm: bool | None = None  # batch-norm statistics over all processes; None: on with > 1 device
    precision: str = "auto"
    probe_every: int = 1  # epochs between k-NN probes for the cost curve; 0 disables
    logger: str = "csv"  # where per-step records go: csv, tensorboard, wandb (rela.loggers)
    log_every: int = 10  # optimizer steps between logged rows
    progress: bool = True
    extra: dict = field(default_factory=dict)  # method options (e.g. hidden_dim)

    def validate(self) -> "TrainConfig":
        if not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise RelaError(f"ratio must be in (0, 1], got {self.ratio!r}")
        for name in ("epochs", "batch_size", "devices", "num_nodes", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RelaError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("train_limit", "test_limit", "image_size", "holdout", "max_steps", "hidden_dim"):
            value, least = getattr(self, name), 0 if name == "max_steps" else 1
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise RelaError(f"{name} must be an integer >= {least}, got {value!r}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.warmup < 1:
            raise RelaError(f"need lr > 0, weight_decay >= 0, 0 <= warmup < 1; got "
                            f"lr={self.lr}, weight_decay={self.weight_decay}, warmup={self.warmup}")
        for name in ("probe_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RelaError(f"{name} must be an integer >= 0, got {value!r}")
        if self.hidden_dim is not None and "hidden_dim" in self.extra:
            raise RelaError("hidden_dim is set twice: as a field and in extra; keep one")
        if not isinstance(self.target_variance, (int, float)) or not 0 < self.target_variance <= 1:
            raise RelaError(f"target_variance must be in (0, 1], got {self.target_variance!r}")
        for registry, value in ((DATASETS, self.dataset), (BACKBONES, self.backbone), (METHODS, self.method),
                                (PRIORS, self.prior), (SWITCHES, self.switch), (SUBSETS, self.subset),
                                (BANK_DTYPES, self.bank_dtype),
                                (LR_SCHEDULES, self.lr_schedule), (MOMENTUM_SCHEDULES, self.momentum_schedule),
                                (LOGGERS, self.logger)):
            registry.check(value)
        for name, choices in (("transfer_head", TRANSFER_HEADS), ("switch_aug_at", SWITCH_AUG_AT),
                              ("rela_augment", RELA_AUGMENTS), ("momentum_after_switch", MOMENTUM_AFTER_SWITCH),
                              ("augment_on", AUGMENT_ON), ("labels", LABELS)):
            if getattr(self, name) not in choices:
                raise unknown(name, getattr(self, name), choices)
        if self.accelerator not in ACCELERATORS:
            raise unknown("accelerator", self.accelerator, ACCELERATORS)
        if self.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise RelaError(f"accelerator {self.accelerator!r} asked for, but no CUDA device is available")
        if self.precision not in PRECISIONS:
            raise unknown("precision", self.precision, PRECISIONS)
        if self.data_mode not in DATA_MODES:
            raise unknown("data mode", self.data_mode, DATA_MODES)
        if self.data_mode == "stream" and self.dataset.partition(":")[0] not in ("imagefolder", "shards"):
            raise RelaError(f"data mode 'stream' reads image files: it needs an imagefolder:PATH or "
                            f"shards:PATH dataset, not {self.dataset!r} (which is held in memory)")
        if self.labels != "auto" and self.dataset.partition(":")[0] != "imagefolder":
            raise RelaError(f"labels {self.labels!r} says how an imagefolder:PATH's labels are read; "
                            f"{self.dataset!r} brings its own (leave labels at auto)")
        if self.num_workers is not None and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            raise RelaError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not isinstance(self.prefetch_factor, int) or self.prefetch_factor < 1:
            raise RelaError(f"prefetch_factor must be an integer >= 1, got {self.prefetch_factor!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        unknown_keys = sorted(set(data) - set(known))
        if unknown_keys:
            raise RelaError(f"{source}: unknown field(s) {', '.join(unknown_keys)}; "
                            f"valid fields: {', '.join(known)}")
        hints = get_type_hints(cls)
        return cls(**{k: _coerce(v, hints[k], f"{source}: field {k!r}") for k, v in data.items()})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(read_yaml(path), source=str(path))

    @classmethod
    def from_preset(cls, name: str, **fields) -> "TrainConfig":
        """The shipped preset ``name`` (:data:`rela.registry.PRESETS`, e.g. ``authors``), then ``fields`` over it."""
        return cls.from_dict({**PRESETS.create(name), **fields}, source=f"preset {name}")


def read_yaml(path: str | Path) -> dict:
    """The mapping of field: value in a YAML config file (empty file: no fields)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RelaError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise RelaError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RelaError(f"config file {path} must hold a mapping of field: value")
    return data
