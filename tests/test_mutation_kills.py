"""Tests written to kill the mutants that `make mutation` found surviving (benchmarks/results/mutation.md).

The training step's tests fit the shipped ReLAModule for a few real steps on ``synthetic:128``
(batches of 32: 4 steps an epoch) and read what it logged, counted and trained.
"""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import fit, parameters
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from rela.build import prepare
from rela.config import TrainConfig
from rela.train import ReLAModule

# --- the training step (rela/train.py; scripts/mutation_train.py mutates it) ---------------------------


def _module(tmp_path, switch: str, prior: str = "random", epochs: int = 1) -> ReLAModule:
    cfg = TrainConfig(dataset="synthetic:128", prior=prior, switch=switch, batch_size=32, epochs=epochs,
                      probe_every=0, progress=False, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"))
    run = prepare(cfg)
    return ReLAModule(cfg, run.method, run.rela, run.train_set)


class Snapshots(Callback):
    """The module's parameters after every optimizer step."""

    def __init__(self):
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(parameters(pl_module))


def _logged_steps(module: ReLAModule, tmp_path, callbacks=()) -> list[dict[str, float]]:
    """Fit ``module`` and return each step's logged values (the CSV log's training rows).

    A value not logged at a step repeats the last one logged (Lightning keeps it): read a loss only
    at the steps that computed it.
    """
    fit(module, logger=CSVLogger(tmp_path, name="logs", version=""), callbacks=callbacks)
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return [row for row in rows if "loss" in row]


def _unchanged(before: dict, after: dict, prefix: str) -> bool:
    names = [k for k in before if k.startswith(prefix)]
    return bool(names) and all(torch.equal(before[k], after[k]) for k in names)


def test_step_loss_mixes_both_losses_by_lambda_and_the_budget_counts_each_phase(tmp_path):
    # soft:0:0.5 over the run's 4 steps: lambda = 1 - (step / 4) / 0.5 = 1, 0.5, 0, 0
    module, snapshots = _module(tmp_path, "soft:0:0.5"), Snapshots()
    start = parameters(module)
    steps = _logged_steps(module, tmp_path, [snapshots])
    lams = [s["train/lambda"] for s in steps]
    assert lams == [1.0, 0.5, 0.0, 0.0]
    for lam, s in zip(lams, steps):
        parts = ([lam * s["train/rela_loss"]] if lam > 0 else []) + ([(1 - lam) * s["train/method_loss"]] if lam < 1 else [])
        assert s["loss"] == pytest.approx(sum(parts), rel=1e-6, abs=1e-7)
    assert module.switch_step == 2  # the first step taken at lambda 0
    # A loss at weight 0 is not computed: its head gets no gradient, so AdamW leaves it alone (no decay,
    # no momentum): the method's heads before the blend, the transfer head after the hand-over.
    after = snapshots.after
    assert _unchanged(start, after[0], "method.projection_head.") and not _unchanged(start, after[1], "method.projection_head.")
    assert _unchanged(after[1], after[3], "rela.transfer.") and not _unchanged(start, after[1], "rela.transfer.")
    # two batches ran the ReLA loss, three the method's (the middle one both); 32 images each
    assert {k: v for k, v in module.budget.items() if k != "train_seconds"} == {
        "steps": 4, "images_seen": 128, "rela_phase_images": 64, "method_phase_images": 96}


def test_switch_watches_the_loss_of_every_rela_step(tmp_path):
    # The adaptive rule cannot fire in 4 steps; its EMAs must hold exactly the 4 logged ReLA losses.
    module = _module(tmp_path, "adaptive")
    losses = [s["train/rela_loss"] for s in _logged_steps(module, tmp_path)]
    assert len(losses) == 4
    fast, slow = 1.0, 2.0
    for loss in losses:
        fast = 0.999 * fast + 0.001 * loss
        slow = 0.99 * slow + 0.01 * fast
    switch = module.rela.switch
    assert float(switch.loss_fast) == pytest.approx(fast, rel=1e-12)
    assert float(switch.loss_slow) == pytest.approx(slow, rel=1e-12)
    assert module.switch_step is None


@pytest.mark.parametrize("prior", ["random", "none"])
def test_labels_train_the_monitor_only(tmp_path, prior):
    """The same run with the labels shuffled: the backbone ends bit-identical, the monitor does not."""
    trained = []
    for shuffled in (False, True):
        module = _module(tmp_path / str(shuffled), "never", prior=prior)
        if shuffled:
            module.labels = module.labels[torch.randperm(len(module.labels), generator=torch.Generator().manual_seed(1))]
        start = parameters(module.monitor)
        torch.manual_seed(0)  # the augmentations draw from the global RNG: both runs draw the same
        fit(module, max_steps=2)
        moved = max((p - start[k]).abs().max().item() for k, p in parameters(module.monitor).items())
        assert moved > 0, "the monitor did not train"
        trained.append((parameters(module.method.backbone), parameters(module.monitor)))
    (backbone, monitor), (backbone_shuffled, monitor_shuffled) = trained
    assert all(torch.equal(backbone[k], backbone_shuffled[k]) for k in backbone)
    assert any(not torch.equal(monitor[k], monitor_shuffled[k]) for k in monitor)
