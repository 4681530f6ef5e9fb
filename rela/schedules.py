"""Learning-rate and momentum schedules by name (:data:`rela.registry.LR_SCHEDULES`, ``MOMENTUM_SCHEDULES``).

An LR schedule factory takes the run's ``total`` optimizer steps and its ``warmup`` steps and returns
``step -> factor`` of the peak LR (what :class:`torch.optim.lr_scheduler.LambdaLR` wants). Both schedules
start with the linear warm-up of ``warmup`` steps; ``cosine`` (rela's default) then decays to 0 over
the remaining steps, ``constant`` (the authors' code: AdamW without a scheduler) keeps the peak.

A momentum schedule is ``(step, max_steps, start, end) -> m``, the EMA weight of a method's momentum
networks: ``cosine`` rises from ``start`` to ``end`` (lightly's schedule, rela's default), ``constant``
stays at ``start`` (the authors' BYOL: 0.99 throughout).
"""

from __future__ import annotations

import math
from typing import Callable

from lightly.utils.scheduler import cosine_schedule

from rela.registry import LR_SCHEDULES, MOMENTUM_SCHEDULES


def _warmup(step: int, warmup: int) -> float | None:
    """The warm-up factor at ``step``, or None once the warm-up is over."""
    return (step + 1) / warmup if step < warmup else None


@LR_SCHEDULES.register("cosine", help="linear warm-up, then cosine decay to 0 over the run's steps (default)")
def _cosine_lr(*, total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        ramp = _warmup(step, warmup)
        if ramp is not None:
            return ramp
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(total - warmup, 1)))
    return factor


@LR_SCHEDULES.register("constant", help="linear warm-up, then the peak LR throughout (the authors' code)")
def _constant_lr(*, total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        ramp = _warmup(step, warmup)
        return 1.0 if ramp is None else ramp
    return factor


@MOMENTUM_SCHEDULES.register("cosine", help="EMA weight rising from the method's start to its end value (default)")
def _cosine_momentum() -> Callable[[int, int, float, float], float]:
    return cosine_schedule


def constant_schedule(step: int, max_steps: int, start: float, end: float) -> float:
    """The momentum schedule that stays at ``start``."""
    return start


@MOMENTUM_SCHEDULES.register("constant", help="the method's start value throughout (the authors' BYOL: 0.99)")
def _constant_momentum() -> Callable[[int, int, float, float], float]:
    return constant_schedule


def lr_factor(name: str, *, total: int, warmup: int) -> Callable[[int], float]:
    """``step -> factor`` of the LR schedule ``name`` for a run of ``total`` steps, ``warmup`` of them warm-up."""
    return LR_SCHEDULES.create(name, total=total, warmup=warmup)


def momentum_schedule(name: str) -> Callable[[int, int, float, float], float]:
    """``(step, max_steps, start, end) -> m`` of the momentum schedule ``name``."""
    return MOMENTUM_SCHEDULES.create(name)
