"""The optimiser a run trains with: AdamW with the configured weight decay, under a linear warm-up
and then a cosine learning-rate schedule over the steps the run actually takes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fit, parameters
from lightning.pytorch.callbacks import Callback

from rela.config import TrainConfig
from rela.build import prepare
from rela.train import ReLAModule

LR = 2e-3


def _module(tmp_path, **overrides):
    # synthetic:128 in batches of 32: 4 steps per epoch, 16 in 4 epochs
    cfg = TrainConfig(accelerator="cpu", dataset="synthetic:128", prior="random", switch="never", batch_size=32, epochs=4, lr=LR,
                      warmup=0.25, probe_every=0, progress=False, cache_dir=str(tmp_path / "cache"),
                      out=str(tmp_path / "run"), **overrides)
    run = prepare(cfg)
    return ReLAModule(cfg, run.method, run.rela, run.train_set)


class RecordLearningRate(Callback):
    """The learning rate each optimiser step is taken with."""

    def __init__(self):
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def warmup_cosine(step: int, total: int, warmup_steps: int) -> float:
    """The schedule as specified: lr (s + 1) / W for the first W steps, then lr (1 + cos(pi t)) / 2
    with t running from 0 at step W to 1 at the last step's end."""
    if step < warmup_steps:
        return LR * (step + 1) / warmup_steps
    return LR * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total - warmup_steps)))


@pytest.mark.parametrize("max_steps, total, warmup_steps", [
    (None, 16, 4),  # 4 epochs of 4 steps; warm-up 0.25 of them
    (10, 10, 2),  # --max-steps 10 ends the run early: the schedule spans those 10 steps
])
def test_learning_rate_warms_up_then_follows_a_cosine(tmp_path, max_steps, total, warmup_steps):
    record = RecordLearningRate()
    trainer = fit(_module(tmp_path, max_steps=max_steps), max_steps=max_steps or -1, callbacks=[record])
    assert trainer.global_step == total
    expected = [warmup_cosine(s, total, warmup_steps) for s in range(total)]
    assert record.rates == pytest.approx(expected, rel=1e-12, abs=0)
    # the shape, in words: rising to the peak, then falling towards zero
    assert record.rates[warmup_steps - 1] == pytest.approx(LR) and record.rates[-1] < 0.05 * LR


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_weight_decay_reaches_adamw(tmp_path, weight_decay):
    module = _module(tmp_path, weight_decay=weight_decay)
    trainer = fit(module, max_steps=1)
    (group,) = trainer.optimizers[0].param_groups
    assert isinstance(trainer.optimizers[0], torch.optim.AdamW)
    assert group["weight_decay"] == weight_decay and group["initial_lr"] == LR
    # Where the gradient is zero, an AdamW step is the decay alone: every trained weight shrinks by
    # the factor 1 - lr * weight_decay, at the scheduled learning rate of the step.
    optimizer = module.configure_optimizers()["optimizer"]  # a fresh one: no Adam moments yet
    trained = [p for p in module.parameters() if p.requires_grad]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in trained}
    before = parameters(module)
    for p in trained:
        p.grad = torch.zeros_like(p)
    lr = optimizer.param_groups[0]["lr"]
    assert lr == LR  # a 1-step run has no warm-up step: its only step takes the full rate
    optimizer.step()
    for name, p in module.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), before[name] * (1 - lr * weight_decay), rtol=1e-6, atol=0)
