"""ReLA-F: the transfer head, the ReLA loss and the switch (spec steps 4-5).

The training loss is ``lam * L_rela + (1 - lam) * L_method``: while the switch's weight ``lam``
is 1 the learner regresses onto the bank's targets; at 0 it trains with the base method alone;
in between both run (each with its own augmentations). The training step reads
:meth:`Switch.weight` before a step and hands the step's outcome to :meth:`Switch.step`, the one
place a switch's state changes. Both see a :class:`Progress`, so a rule can be written in epochs,
steps or fractions of the run.

Switches (names registered in :data:`rela.registry.SWITCHES`):

- ``adaptive``: the authors' rule, kept exactly: two EMAs of the ReLA loss with time constants of
  ~1000 and ~100 *steps*. It cannot fire before ~2,400 steps, whatever the run's length.
- ``plateau``: the same question ("has the ReLA loss stopped improving?") asked the way
  ``ReduceLROnPlateau(threshold_mode="rel")`` asks it, with every time constant a fraction of the
  run: a bias-corrected EMA of the loss over ``smooth`` of the run; hand over once it has not
  improved on its best by more than ``threshold`` (relative) for ``patience`` of the run.
- ``soft-plateau``: the plateau test, then a linear ramp of lam from 1 to 0 over ``ramp`` of the run.
- ``soft``: a ramp fixed in training progress: lam = 1 until START of the run, 0 after START + LENGTH.
- ``constant``: ReLA for the first FRACTION of the epochs; ``never``: distillation only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def rela_loss_per_sample(pred_1: torch.Tensor, pred_2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The ReLA loss of each image (its mean is :func:`rela_loss`): what the subset rule ``loss`` records."""
    target = target.detach().to(pred_1.dtype)
    return 0.5 * ((1 - F.cosine_similarity(pred_1, target, dim=1)) + (1 - F.cosine_similarity(pred_2, target, dim=1)))


@dataclass(frozen=True)
class Progress:
    """Where a run stands: optimizer step ``step`` (0-based) of ``total_steps``, in epoch ``epoch`` of ``epochs``."""
    step: int
    total_steps: int
    epoch: int = 0
    epochs: int = 1

    @property
    def fraction(self) -> float:
        """The share of the run's steps taken before this step."""
        return self.step / max(self.total_steps, 1)

    def steps(self, fraction: float) -> float:
        """``fraction`` of the run, in steps (at least one)."""
        return max(fraction * self.total_steps, 1.0)


def _ramp_down(position: float, start: float, length: float) -> float:
    """1 before ``start``, 0 from ``start + length``, linear in between (a step at ``start`` when ``length`` is 0)."""
    if length == 0:
        return 1.0 if position < start else 0.0
    return min(1.0, max(0.0, 1 - (position - start) / length))


# Steps between the step whose loss decides a hand-over and the first step the decision changes. The host
# picks lambda (which branches to run) before it launches a step; on a GPU it reads the switch's state
# LAG steps late, from a copy made without waiting for the device (see Switch.host_view). A decision
# at step t therefore carries its effective step (t + 1 + LAG), and lambda at step s depends only on
# decisions effective by s: reading a state 1 or 2 steps old gives the same lambda, on CPU, CUDA and
# every rank, and a resumed run (which reads the current state) decides exactly as an uninterrupted one.
LAG = 1


class Switch(nn.Module):
    """When to hand over from ReLA to the base method. State lives in buffers so it checkpoints.

    The state changes on the device only (torch ops, no reads in the step): the host decides from
    :meth:`host_view`, the buffers named in ``HOST_STATE`` as of at most LAG + 1 steps ago.
    """

    HOST_STATE: tuple[str, ...] = ("switched", "switch_step")

    def __init__(self):
        super().__init__()
        self.register_buffer("switched", torch.tensor(False))
        self.register_buffer("switch_step", torch.tensor(-1, dtype=torch.long))
        # the first step taken with lam < 1, where the base method's loss begins (a soft hand-over's ramp start)
        self.register_buffer("method_start", torch.tensor(-1, dtype=torch.long))
        self.lagged: bool | None = None  # read the state through late copies; None: where it lives on a GPU
        self._reset_host()

    def _reset_host(self) -> None:
        self._view: dict[str, int] | None = None
        self._copies: list = []  # ring of (pinned host tensor, event) per slot
        self._posted = 0
        self._method_start: int | None = None  # the host's own record: it sets method_start

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._reset_host()  # a loaded state replaces whatever the host had read

    def _is_lagged(self) -> bool:
        return self.switched.device.type != "cpu" if self.lagged is None else self.lagged

    def _read_now(self) -> dict[str, int]:
        # .tolist() of a CPU tensor reads memory, no aten op; on a GPU it waits (first step, after a resume)
        return {n: int(getattr(self, n).cpu().tolist()) for n in self.HOST_STATE}

    def host_view(self) -> dict[str, int]:
        """``HOST_STATE`` as the host sees it: on CPU the state itself (reading it costs nothing), through
        the late copies otherwise (see :meth:`publish`); the first read of a run reads it now."""
        if not self._is_lagged():
            return self._read_now()
        if self._view is None:
            self._view = self._read_now()
        return self._view

    def publish(self) -> None:
        """After a step's update: copy ``HOST_STATE`` to the host without waiting (a non-blocking copy into
        pinned memory, an event after it), and take as the host's view the copy posted LAG steps ago, whose
        event has passed by now unless the device runs more than LAG steps behind the host (then the host
        waits for that step's forward pass only: the steps queued after it keep the device busy)."""
        if not self.HOST_STATE or not self._is_lagged():
            return
        cuda = self.switched.device.type == "cuda"
        if not self._copies:
            self._copies = [(torch.empty(len(self.HOST_STATE), dtype=torch.long, pin_memory=cuda),
                             torch.cuda.Event() if cuda else None) for _ in range(LAG + 1)]
        if self._posted >= LAG:  # the copy posted LAG steps ago
            host, event = self._copies[(self._posted - LAG) % (LAG + 1)]
            if event is not None and not event.query():
                event.synchronize()
            self._view = dict(zip(self.HOST_STATE, host.tolist()))
        host, event = self._copies[self._posted % (LAG + 1)]
        host.copy_(torch.stack([getattr(self, n).long() for n in self.HOST_STATE]), non_blocking=cuda)
        if event is not None:
            event.record()
        self._posted += 1

    @property
    def method_start_step(self) -> int:
        """``method_start`` as the host knows it (it sets it: no read of the device after the first)."""
        if self._method_start is None:
            self._method_start = int(self.method_start.cpu().tolist())
        return self._method_start

    def weight(self, progress: Progress) -> float:
        """lambda, the weight of the ReLA loss for the coming step (reads the state, never changes it)."""
        view = self.host_view()
        return 0.0 if view["switched"] and progress.step >= view["switch_step"] else 1.0

    def step(self, lam: float, loss: torch.Tensor | float | None, progress: Progress) -> None:
        """The step taken with weight ``lam`` is done: ``loss`` is its ReLA loss (None when not computed).

        At weight 0 the hand-over is recorded (once); otherwise the loss goes to :meth:`update`.
        Then the state is published to the host (:meth:`publish`).
        """
        if lam < 1 and self.method_start_step < 0:
            self._method_start = progress.step
            self.method_start.fill_(progress.step)
        if lam == 0:
            self.record_switch(progress.step)
        elif loss is not None:
            self.update(torch.as_tensor(loss, dtype=torch.float64, device=self.switched.device), progress)
        self.publish()

    def update(self, loss: torch.Tensor, progress: Progress) -> None:
        """React to the ReLA loss of a step (a float64 tensor on the device); subclasses that watch it override this."""

    def record_switch(self, step: int | torch.Tensor, when: torch.Tensor | None = None) -> None:
        """Mark the hand-over at ``step`` (the first step taken with weight 0), if ``when`` (default: now) and
        not marked before; torch ops, so the device decides without the host reading anything."""
        mark = ~self.switched if when is None else when & ~self.switched
        self.switch_step.copy_(torch.where(mark, step, self.switch_step))
        self.switched.logical_or_(mark)

    def metrics(self) -> dict[str, float]:
        """What the switch watches, for the logs (it reads the device: the training step asks on the steps that log only)."""
        return {}


class AdaptiveSwitch(Switch):
    """Switch once the ReLA loss plateaus (the authors' rho >= 0.995 rule, step-based time constants).

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

    def update(self, loss: torch.Tensor, progress: Progress) -> None:
        live = ~self.switched  # a switched controller keeps its state
        # rho is computed from the EMAs before this step's loss enters them, as in the reference code.
        rho = torch.exp(-(self.loss_slow - self.loss_fast).clamp(min=0.0))
        fast = self.loss_fast * self.fast_decay + (1 - self.fast_decay) * loss
        slow = self.loss_slow * self.slow_decay + (1 - self.slow_decay) * fast
        for buf, new in ((self.rho, rho), (self.loss_fast, fast), (self.loss_slow, slow)):
            buf.copy_(torch.where(live, new, buf))
        # decided at step t: the first base-method step (the hand-over) is t + 1 + LAG (the authors': t + 1)
        self.record_switch(progress.step + 1 + LAG, when=live & (rho >= self.threshold))

    def metrics(self) -> dict[str, float]:
        return {"rho": float(self.rho)}


class PlateauSwitch(Switch):
    """Hand over when the smoothed ReLA loss stops improving; every time constant is a fraction of the run.

    ``smoothed`` is an EMA of the loss with a window of ``smooth`` of the run's steps, divided by
    ``1 - decay**n`` (Adam's bias correction), so it is the mean of the recent losses from the
    first step on, not a blend with an arbitrary start value. ``best`` is its lowest value so far;
    an improvement counts when ``smoothed < best * (1 - threshold)``, as in
    ``ReduceLROnPlateau(threshold_mode="rel")``. The plateau is reached when no improvement has
    counted for ``patience`` of the run: decided at step t, ``plateau_step`` is t + LAG, the last
    step at lambda 1 (the hard switch hands over at the next step, the soft one starts its ramp).
    The same loss curve stretched over 500 or 50,000 steps therefore hands over at the same fraction of the run.
    """

    HOST_STATE = ("switched", "switch_step", "plateau_step")

    def __init__(self, threshold: float = 0.01, patience: float = 0.05, smooth: float = 0.05):
        super().__init__()
        self.threshold, self.patience, self.smooth = threshold, patience, smooth
        self.register_buffer("ema", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("seen", torch.tensor(0, dtype=torch.long))
        self.register_buffer("best", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("best_step", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("plateau_step", torch.tensor(-1, dtype=torch.long))

    def decay(self, progress: Progress) -> float:
        """The EMA's per-step decay: a window of ``smooth`` of the run."""
        return 1 - 1 / progress.steps(self.smooth)

    def update(self, loss: torch.Tensor, progress: Progress) -> None:
        live = self.plateau_step < 0  # the decision is final
        decay = self.decay(progress)
        ema, seen = self.ema * decay + (1 - decay) * loss, self.seen + 1
        smoothed = ema / (1 - decay ** seen.double())
        improved = smoothed < self.best * (1 - self.threshold)
        stalled = ~improved & (progress.step - self.best_step >= progress.steps(self.patience))
        for buf, new in ((self.ema, ema), (self.seen, seen),
                         (self.best, torch.where(improved, smoothed, self.best)),
                         (self.best_step, torch.where(improved, progress.step, self.best_step)),
                         (self.plateau_step, torch.where(stalled, progress.step + LAG, self.plateau_step))):
            buf.copy_(torch.where(live, new, buf))
        # Switch.step records the hand-over at the first lam = 0

    def plateau(self, progress: Progress) -> int | None:
        """The last step at lambda 1 before the hand-over, as far as the host knows by ``progress`` (None: not yet)."""
        step = self.host_view()["plateau_step"]
        return step if 0 <= step < progress.step else None

    def weight(self, progress: Progress) -> float:
        return 1.0 if self.plateau(progress) is None else 0.0

    def smoothed(self, progress: Progress) -> float:
        """The bias-corrected EMA of the losses seen (NaN before the first); reads the device (not in the step)."""
        seen = int(self.seen)
        return float(self.ema) / (1 - self.decay(progress) ** seen) if seen else math.nan

    def metrics(self) -> dict[str, float]:
        best = float(self.best)
        return {"plateau_best": best} if math.isfinite(best) else {}


class SoftPlateauSwitch(PlateauSwitch):
    """The plateau test, then lam ramps linearly from 1 to 0 over ``ramp`` of the run.

    The hand-over (``switch_step``) is the first step taken with lam = 0; during the ramp both
    losses run, each with its own augmentations, so neither the objective nor the inputs jump.
    """

    def __init__(self, ramp: float = 0.1, **plateau):
        super().__init__(**plateau)
        self.ramp = ramp

    def weight(self, progress: Progress) -> float:
        start = self.plateau(progress)
        return 1.0 if start is None else _ramp_down(progress.step, start, progress.steps(self.ramp))


class RampSwitch(Switch):
    """lam = 1 until ``start`` of the run, then linearly down to 0 at ``start + length`` (training progress only)."""

    HOST_STATE = ()  # a function of progress alone

    def __init__(self, start: float, length: float):
        super().__init__()
        self.start, self.length = start, length

    def weight(self, progress: Progress) -> float:
        return _ramp_down(progress.fraction, self.start, self.length)


class ConstantSwitch(Switch):
    """ReLA for the first ``fraction`` of the epochs, then the base method."""

    HOST_STATE = ()

    def __init__(self, fraction: float):
        super().__init__()
        self.fraction = fraction

    def weight(self, progress: Progress) -> float:
        return 1.0 if progress.epoch < int(self.fraction * progress.epochs) else 0.0


class NeverSwitch(Switch):
    """ReLA for the whole run: distillation only (an ablation)."""

    HOST_STATE = ()

    def weight(self, progress: Progress) -> float:
        return 1.0


# --- names -------------------------------------------------------------------------------

def _numbers(arg: str, names: tuple[str, ...], exact: bool = False) -> tuple[float, ...]:
    """Colon-separated fractions in [0, 1]: all of ``names`` if ``exact``, else up to as many."""
    parts = arg.split(":")
    try:
        values = tuple(float(v) for v in parts)
    except ValueError:
        values = ()
    count_ok = len(parts) == len(names) if exact else 1 <= len(parts) <= len(names)
    if not count_ok or len(values) != len(parts) or not all(0 <= v <= 1 for v in values):
        raise ValueError(f"{':'.join(names)} must be {'' if exact else 'up to '}{len(names)} number(s) "
                         "in [0, 1], colon-separated")
    return values


def _threshold(arg: str) -> float:
    try:
        return float(arg)
    except ValueError:
        raise ValueError("THRESHOLD must be a number") from None


@SWITCHES.register("adaptive", arg="THRESHOLD", arg_optional=True, parse=_threshold,
                   help="the authors' rule: hand over when rho >= THRESHOLD (default 0.995); "
                        "step-based EMAs, cannot fire before ~2,400 steps")
def _adaptive(threshold: float | None) -> Switch:
    return AdaptiveSwitch() if threshold is None else AdaptiveSwitch(threshold)


@SWITCHES.register("plateau", arg="THRESHOLD[:PATIENCE]", arg_optional=True,
                   parse=lambda a: _numbers(a, ("THRESHOLD", "PATIENCE")),
                   help="hand over when the smoothed ReLA loss has not improved by THRESHOLD (relative, "
                        "default 0.01) for PATIENCE of the run (default 0.05)")
def _plateau(args: tuple[float, ...] | None) -> Switch:
    return PlateauSwitch(**dict(zip(("threshold", "patience"), args or ())))


@SWITCHES.register("soft-plateau", arg="RAMP", arg_optional=True,
                   parse=lambda a: _numbers(a, ("RAMP",))[0],
                   help="the plateau test, then lambda ramps from 1 to 0 over RAMP of the run (default 0.1)")
def _soft_plateau(ramp: float | None) -> Switch:
    return SoftPlateauSwitch() if ramp is None else SoftPlateauSwitch(ramp)


@SWITCHES.register("soft", arg="START:LENGTH", parse=lambda a: _numbers(a, ("START", "LENGTH"), exact=True),
                   help="ReLA alone until START of the run, then a linear blend into the method over LENGTH")
def _soft(args: tuple[float, float]) -> Switch:
    return RampSwitch(*args)


@SWITCHES.register("constant", arg="FRACTION", parse=lambda a: _numbers(a, ("FRACTION",))[0],
                   help="ReLA for the first FRACTION of the epochs")
def _constant(fraction: float) -> Switch:
    return ConstantSwitch(fraction)


@SWITCHES.register("never", help="ReLA for the whole run: distillation only")
def _never() -> Switch:
    return NeverSwitch()


def build_switch(spec: str) -> Switch:
    """The switch ``spec`` names (see :data:`rela.registry.SWITCHES`)."""
    return SWITCHES.create(spec)


class ReLAAccelerator(nn.Module):
    """Transfer head + targets + switch: everything ReLA adds to a base method."""

    def __init__(self, feature_dim: int, targets: torch.Tensor, switch: Switch,
                 view: ViewAugment = RELA_VIEW, train_transfer: bool = True):
        super().__init__()
        self.transfer = nn.Linear(feature_dim, targets.shape[1])
        # False: a fixed random map, left out of the optimiser (which takes only what requires grad),
        # as in the authors' code (--transfer-head frozen)
        self.transfer.requires_grad_(train_transfer)
        # The targets are rebuilt from the cached bank on resume, so they stay out of checkpoints.
        self.register_buffer("targets", targets, persistent=False)
        self.switch = switch
        self.view = view

    def loss(self, features_1: torch.Tensor, features_2: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return rela_loss(self.transfer(features_1), self.transfer(features_2), self.targets[index])

    def step_loss(self, backbone: nn.Module, view, index: torch.Tensor,
                  normalize: nn.Module, per_sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The ReLA part of a training step: two cheap views (``view(0)``, ``view(1)``: made on the device
        from the batch in memory mode, by the loader's workers in stream mode) through the learner,
        regressed onto the targets of ``index`` (no momentum forward). Returns the loss (each image's
        with ``per_sample``) and the first view's features."""
        f1 = backbone(normalize(view(0))).flatten(1)
        f2 = backbone(normalize(view(1))).flatten(1)
        if per_sample:
            return rela_loss_per_sample(self.transfer(f1), self.transfer(f2), self.targets[index]), f1
        return self.loss(f1, f2, index), f1
