"""Shared machinery of the benchmark scripts: resumable result files and mean ± std tables."""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import sys
from pathlib import Path

import torch

from rela.config import TrainConfig
from rela.evaluate import evaluate_run
from rela.io import load_json, save_json
from rela.train import train


class ResultsFile:
    """``{"runs": [...]}`` on disk, rewritten atomically after every run, so a grid resumes."""

    def __init__(self, path: str | Path, meta: dict | None = None, command: str | None = None):
        """``command``: how to rerun what made the file; None keeps the stored one (or takes sys.argv)."""
        self.path = Path(path)
        data = load_json(self.path) if self.path.is_file() else {}
        self.runs: list[dict] = data.get("runs", [])
        stored = data.get("meta", {})
        self.meta = {**stored, **(meta or {}), "command": command or stored.get("command") or " ".join(sys.argv),
                     "torch": torch.__version__, "machine": platform.platform(), "threads": torch.get_num_threads()}

    def find(self, **key) -> dict | None:
        return next((r for r in self.runs if all(r.get(k) == v for k, v in key.items())), None)

    def add(self, run: dict) -> None:
        self.runs.append(run)
        save_json({"meta": self.meta, "runs": self.runs}, self.path)


def train_and_evaluate(cfg: TrainConfig, *, linear_epochs: int = 50) -> dict:
    """One benchmark cell: a fresh run (resumed if interrupted), then k-NN + linear probe."""
    cfg = dataclasses.replace(cfg, resume=True)
    train(cfg)
    return evaluate_run(cfg.out, linear_epochs=linear_epochs, progress=False)


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if len(values) > 1 else f"{m * scale:.{digits}f}"
