"""Run configuration: one dataclass, loadable from YAML, checked before anything runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import get_args, get_type_hints

import torch
import yaml

from rela.errors import RelaError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


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
    # learner and method
    backbone: str = "convnet"
    method: str = "byol"
    # ReLA
    prior: str = "none"
    prior_weights: str | None = None
    prior_seed: int | None = None  # default: seed + 1, so a random prior differs from the learner's init
    switch: str = "adaptive"
    bank: str | None = None  # explicit bank file; default: a content-keyed file under cache_dir
    cache_dir: str = ".cache/rela"
    bank_dtype: str = "float16"  # float32 doubles the bank's size for features beyond fp16 range/precision
    # budget and optimisation
    ratio: float = 1.0
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (a budget that is not whole epochs)
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: float = 0.02  # fraction of all steps
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
    progress: bool = True
    extra: dict = field(default_factory=dict)  # method options (e.g. hidden_dim)

    def validate(self) -> "TrainConfig":
        from rela.methods import METHODS
        from rela.priors import PRIOR_CHOICES

        if not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise RelaError(f"ratio must be in (0, 1], got {self.ratio!r}")
        for name in ("epochs", "batch_size", "devices", "num_nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RelaError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("train_limit", "test_limit", "image_size", "holdout", "max_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise RelaError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.warmup < 1:
            raise RelaError(f"need lr > 0, weight_decay >= 0, 0 <= warmup < 1; got "
                            f"lr={self.lr}, weight_decay={self.weight_decay}, warmup={self.warmup}")
        if self.method not in METHODS:
            raise RelaError(f"unknown method {self.method!r}; valid choices: {', '.join(sorted(METHODS))}")
        kind = self.prior.partition(":")[0]
        if kind not in {c.partition(":")[0] for c in PRIOR_CHOICES}:
            raise RelaError(f"unknown prior {self.prior!r}; valid choices: {', '.join(PRIOR_CHOICES)}")
        for name in ("probe_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RelaError(f"{name} must be an integer >= 0, got {value!r}")
        from rela.bank import BANK_DTYPES

        if self.bank_dtype not in BANK_DTYPES:
            raise RelaError(f"unknown bank_dtype {self.bank_dtype!r}; valid choices: {', '.join(BANK_DTYPES)}")
        if self.accelerator not in ACCELERATORS:
            raise RelaError(f"unknown accelerator {self.accelerator!r}; valid choices: {', '.join(ACCELERATORS)}")
        if self.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise RelaError(f"accelerator {self.accelerator!r} asked for, but no CUDA device is available")
        from rela.accelerator import build_switch

        build_switch(self.switch, self.epochs)  # raises on a bad spec, before any work is done
        if self.precision not in ("auto", "32-true", "32", "16-mixed", "bf16-mixed"):
            raise RelaError(f"unknown precision {self.precision!r}; valid choices: auto, 32-true, 16-mixed, bf16-mixed")
        return self

    def load_data(self, split: str):
        """This run's training or evaluation split (the holdout split when ``holdout`` is set)."""
        from rela.data import load_dataset

        limit = self.train_limit if split == "train" else self.test_limit
        return load_dataset(self.dataset, split, self.data_root, self.download, limit, self.image_size,
                            holdout=self.holdout, skip_bad_images=self.skip_bad_images)

    @property
    def uses_rela(self) -> bool:
        return self.prior != "none"

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
        return cls.from_dict(data, source=str(path))
