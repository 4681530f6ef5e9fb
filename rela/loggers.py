"""Where a run's records go (``--logger``): Lightning's loggers by name, registered in :data:`rela.registry.LOGGERS`.

Every factory takes the run's output folder. ``csv`` needs nothing beyond rela; ``tensorboard``
and ``wandb`` are optional extras, and naming one that is not installed stops with one line
saying which extra to install. W&B runs offline with ``WANDB_MODE=offline`` (``wandb sync``
uploads them later); ``WANDB_PROJECT`` chooses the project (default ``rela``).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from rela.errors import RelaError
from rela.registry import LOGGERS


def _require(logger: str, packages: tuple[str, ...], extra: str) -> None:
    for package in packages:
        try:
            importlib.import_module(package)
            return
        except ImportError:
            continue
    raise RelaError(f"--logger {logger} needs the optional package {packages[0]}, which is not installed: "
                    f"pip install 'rela[{extra}]'")


@LOGGERS.register("csv", help="OUT/logs/metrics.csv, the default")
def _csv(out: Path) -> Logger:
    return CSVLogger(out, name="logs", version="")


@LOGGERS.register("tensorboard", help="event files in OUT/logs/, extra rela[tensorboard]")
def _tensorboard(out: Path) -> Logger:
    _require("tensorboard", ("tensorboard", "tensorboardX"), "tensorboard")
    return TensorBoardLogger(out, name="logs", version="", default_hp_metric=False)


@LOGGERS.register("wandb", help="Weights & Biases in OUT/wandb/, extra rela[wandb]; offline: WANDB_MODE=offline")
def _wandb(out: Path) -> Logger:
    _require("wandb", ("wandb",), "wandb")
    return WandbLogger(name=Path(out).name, save_dir=str(out), project=os.environ.get("WANDB_PROJECT", "rela"))


def build_logger(name: str, out: str | os.PathLike) -> Logger:
    """The logger ``name`` writing for the run in ``out``."""
    return LOGGERS.create(name, Path(out))


def close_logger(logger: Logger) -> None:
    """End the run's W&B run, so its data is written now and the next ``train`` in this process starts its own.

    (Lightning leaves it open until the process exits.) The other loggers need nothing.
    """
    if isinstance(logger, WandbLogger):
        import wandb

        if wandb.run is not None:
            wandb.finish()
