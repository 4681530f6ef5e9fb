"""ReLA-F: the transfer head, the ReLA loss and the switch (spec steps 4-5).

While the switch's weight ``lam`` is 1 the learner regresses onto the bank's
targets; at 0 it trains with the base method alone. The adaptive switch flips
once, when the ReLA loss plateaus; the constant switch flips after a fixed
fraction of the epochs. A soft blend ``lam * L_rela + (1 - lam) * L_method``
only needs another :class:`Switch` subclass whose ``weight`` returns values in
between: the training step already handles it. The training step reads ``weight``
before a step and hands the step's outcome to :meth:`Switch.step`, the one place a
switch's state changes. Switch names are registered in :data:`rela.registry.SWITCHES`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rela.data.augment import RELA_VIEW, ViewAugment
from rela.registry import SWITCHES


def rela_loss(pred_1: torch.Tensor, pred_2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1/2 [(1 - cos(g(f(x1)), y)) + (1 - cos(g(f(x2)), y))], averaged over the batch."""
    target = target.detach().to(pred_1.dtype)  # a fixed regression target: no gradient flows into it
    return 0.5 * ((1 - F.cosine_similarity(pred_1, target, dim=1)).mean()
                  + (1 - F.cosine_similarity(pred_2, target, dim=1)).mean())


class Switch(nn.Module):
    """When to hand over from ReLA to the base method. State lives in buffers so it checkpoints."""

    def __init__(self):
        super().__init__()
        self.register_buffer("switched", torch.tensor(False))
        self.register_buffer("switch_step", torch.tensor(-1, dtype=torch.long))

    def weight(self, epoch: int) -> float:
        """lambda, the weight of the ReLA loss for the coming step (reads the state, never changes it)."""
        return 0.0 if bool(self.switched) else 1.0

    def step(self, lam: float, loss: float | None, step: int, epoch: int) -> None:
        """The step taken with weight ``lam`` is done: ``loss`` is its ReLA loss (None when not computed).

        At weight 0 the hand-over is recorded (once); otherwise the loss goes to :meth:`update`.
        """
        if lam == 0:
            self.record_switch(step)
        elif loss is not None:
            self.update(loss, step, epoch)

    def update(self, loss: float, step: int, epoch: int) -> None:
        """React to the ReLA loss of a step; subclasses that watch the loss override it."""

    def metrics(self) -> dict[str, float]:
        return {}

    def record_switch(self, step: int) -> None:
        """Mark the hand-over at ``step`` (the first step taken with weight 0)."""
        if not self.switched:
            self.switched.fill_(True)
            self.switch_step.fill_(step)


class AdaptiveSwitch(Switch):
    """Switch once the ReLA loss plateaus (the authors' rho >= 0.995 rule).

    Two EMAs of the loss: a fast one (0.999) and a slow one (0.99) of the fast one.
    While the loss falls, the slow EMA lags above the fast one and
    rho = exp(-(slow - fast)) stays below the threshold; when the loss stops
    falling they meet and rho reaches it.
    """

    def __init__(self, threshold: float = 0.995, fast_decay: float = 0.999, slow_decay: float = 0.99,
                 fast_init: float = 1.0, slow_init: float = 2.0):
        super().__init__()
        self.threshold, self.fast_decay, self.slow_decay = threshold, fast_decay, slow_decay
        self.register_buffer("loss_fast", torch.tensor(fast_init, dtype=torch.float64))
        self.register_buffer("loss_slow", torch.tensor(slow_init, dtype=torch.float64))
        self.register_buffer("rho", torch.tensor(0.0, dtype=torch.float64))

    def update(self, loss: float, step: int, epoch: int) -> None:
        if self.switched:
            return
        # rho is computed from the EMAs before this step's loss enters them, as in the reference code.
        self.rho.fill_(math.exp(-max(float(self.loss_slow - self.loss_fast), 0.0)))
        self.loss_fast.mul_(self.fast_decay).add_((1 - self.fast_decay) * loss)
        self.loss_slow.mul_(self.slow_decay).add_((1 - self.slow_decay) * self.loss_fast)
        if self.rho >= self.threshold:
            self.record_switch(step)

    def metrics(self) -> dict[str, float]:
        return {"rho": float(self.rho)}


class ConstantSwitch(Switch):
    """ReLA for the first ``fraction`` of the epochs, then the base method."""

    def __init__(self, fraction: float, epochs: int):
        super().__init__()
        self.until_epoch = int(fraction * epochs)

    def weight(self, epoch: int) -> float:
        return 1.0 if epoch < self.until_epoch else 0.0



class NeverSwitch(Switch):
    """ReLA for the whole run: distillation only (an ablation)."""

    def weight(self, epoch: int) -> float:
        return 1.0


def _threshold(arg: str) -> float:
    try:
        return float(arg)
    except ValueError:
        raise ValueError("THRESHOLD must be a number") from None


def _fraction(arg: str) -> float:
    try:
        fraction = float(arg)
    except ValueError:
        fraction = math.nan
    if not 0 <= fraction <= 1:
        raise ValueError("FRACTION must be a number in [0, 1]")
    return fraction


@SWITCHES.register("adaptive", arg="THRESHOLD", arg_optional=True, parse=_threshold,
                   help="hand over when the ReLA loss plateaus, rho >= THRESHOLD, default 0.995")
def _adaptive(threshold: float | None, *, epochs: int) -> Switch:
    return AdaptiveSwitch() if threshold is None else AdaptiveSwitch(threshold)


@SWITCHES.register("constant", arg="FRACTION", parse=_fraction,
                   help="ReLA for the first FRACTION of the epochs")
def _constant(fraction: float, *, epochs: int) -> Switch:
    return ConstantSwitch(fraction, epochs)


@SWITCHES.register("never", help="ReLA for the whole run: distillation only")
def _never(*, epochs: int) -> Switch:
    return NeverSwitch()


def build_switch(spec: str, epochs: int) -> Switch:
    """The switch ``spec`` names (see :data:`rela.registry.SWITCHES`), for a run of ``epochs`` epochs."""
    return SWITCHES.create(spec, epochs=epochs)


class ReLAAccelerator(nn.Module):
    """Transfer head + targets + switch: everything ReLA adds to a base method."""

    def __init__(self, feature_dim: int, targets: torch.Tensor, switch: Switch,
                 view: ViewAugment = RELA_VIEW):
        super().__init__()
        self.transfer = nn.Linear(feature_dim, targets.shape[1])
        # The targets are rebuilt from the cached bank on resume, so they stay out of checkpoints.
        self.register_buffer("targets", targets, persistent=False)
        self.switch = switch
        self.view = view

    def loss(self, features_1: torch.Tensor, features_2: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return rela_loss(self.transfer(features_1), self.transfer(features_2), self.targets[index])
