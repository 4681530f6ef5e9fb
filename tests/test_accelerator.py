"""ReLA-F: the loss, the switch controller (spec steps 4-5) and the BYOL base method."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from rela.accelerator import (
    LAG,
    AdaptiveSwitch,
    ConstantSwitch,
    NeverSwitch,
    PlateauSwitch,
    Progress,
    RampSwitch,
    SoftPlateauSwitch,
    ReLAAccelerator,
    Switch,
    build_switch,
    rela_loss,
)
from rela.backbones import build_backbone
from rela.errors import RelaError
from rela.methods import build_method

# --- the ReLA loss -------------------------------------------------------------------


def test_rela_loss_identical_opposite_orthogonal():
    y = torch.tensor([[1.0, 2.0, -3.0], [0.5, 0.0, 4.0]])
    assert rela_loss(y, y, y).item() == pytest.approx(0.0, abs=1e-6)
    assert rela_loss(3 * y, 0.1 * y, y).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert rela_loss(-y, -2 * y, y).item() == pytest.approx(2.0, abs=1e-6)
    ortho = torch.tensor([[2.0, -1.0, 0.0], [0.0, 1.0, 0.0]])  # each row orthogonal to y's row
    assert (ortho * y).sum(1).abs().max() == 0
    assert rela_loss(ortho, ortho, y).item() == pytest.approx(1.0, abs=1e-6)


def test_rela_loss_mixed_case_by_hand():
    target = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    pred_1 = torch.tensor([[1.0, 1.0], [0.0, 5.0]])  # cos = 1/sqrt(2), 1
    pred_2 = torch.tensor([[-1.0, 0.0], [3.0, 0.0]])  # cos = -1, 0
    # view 1: mean(1 - 1/sqrt2, 0); view 2: mean(2, 1); the loss is the average of the two views
    expected = 0.5 * ((1 - 1 / math.sqrt(2)) / 2 + (2 + 1) / 2)
    assert rela_loss(pred_1, pred_2, target).item() == pytest.approx(expected, abs=1e-6)


def test_rela_loss_gradient_flows_to_predictions_only():
    g = torch.Generator().manual_seed(0)
    pred_1, pred_2, target = (torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
                              for _ in range(3))
    rela_loss(pred_1, pred_2, target).backward()
    assert target.grad is None  # the targets are fixed: the loss must not pull them toward the predictions
    # each view's gradient is that of its own cosine term, 1/2 mean(1 - cos(pred, y)), and nothing else
    for pred in (pred_1, pred_2):
        leaf = pred.detach().clone().requires_grad_(True)
        (0.5 * (1 - torch.nn.functional.cosine_similarity(leaf, target.detach(), dim=1)).mean()).backward()
        assert pred.grad.abs().sum() > 0
        torch.testing.assert_close(pred.grad, leaf.grad, rtol=1e-12, atol=1e-12)
    # and the analytic gradient matches finite differences
    assert torch.autograd.gradcheck(lambda a, b: rela_loss(a, b, target), (pred_1.detach().requires_grad_(),
                                                                           pred_2.detach().requires_grad_()))


def test_accelerator_regresses_indexed_targets():
    targets = torch.eye(4)
    acc = ReLAAccelerator(feature_dim=3, targets=targets, switch=NeverSwitch())
    assert acc.transfer.in_features == 3 and acc.transfer.out_features == 4
    feats = torch.randn(2, 3)
    index = torch.tensor([2, 0])
    expected = rela_loss(acc.transfer(feats), acc.transfer(feats), targets[index])
    assert acc.loss(feats, feats, index).item() == pytest.approx(expected.item())
    # targets are rebuilt from the bank, never checkpointed; the switch state is
    assert "targets" not in acc.state_dict()
    assert "switch.switched" in acc.state_dict()


# --- the adaptive switch -------------------------------------------------------------


def reference_switch_step(losses, threshold=0.995):
    """The spec's rule, written out independently of rela: rho crossing the threshold at step t makes
    t + 1 the first base-method step in the authors' code; rela's host learns of it LAG steps late (it
    never waits for the device), so t + 1 + LAG is its first base-method step, the hand-over recorded."""
    fast, slow = 1.0, 2.0
    for step, loss in enumerate(losses):
        rho = math.exp(-max(slow - fast, 0.0))
        fast = 0.999 * fast + 0.001 * loss
        slow = 0.99 * slow + 0.01 * fast
        if rho >= threshold:
            return step + 1 + LAG
    return None


def at(step: int, total: int = 20_000, epoch: int = 0, epochs: int = 1) -> Progress:
    return Progress(step, total, epoch, epochs)


def drive(switch: Switch, losses, start: int = 0) -> int | None:
    for step, loss in enumerate(losses[start:], start):
        switch.update(float(loss), at(step, len(losses)))
        if bool(switch.switched):
            return int(switch.switch_step)
    return None


def exp_decay_then_flat(n=20_000, plateau=4000, tau=1500.0, noise=0.0):
    t = np.minimum(np.arange(n), plateau)
    curve = 0.2 + 0.8 * np.exp(-t / tau)
    if noise:
        curve = curve + noise * np.random.default_rng(0).standard_normal(n)
    return curve


def linear_then_flat(n=20_000, plateau=4000):
    return 1.0 - 0.8 * np.minimum(np.arange(n), plateau) / plateau


CURVES = {
    "exponential": (exp_decay_then_flat(), 4000),
    "exponential+noise": (exp_decay_then_flat(noise=0.02), 4000),
    "linear": (linear_then_flat(), 4000),
}


@pytest.mark.parametrize("name", CURVES)
def test_adaptive_switch_waits_for_the_plateau(name):
    losses, plateau = CURVES[name]
    expected = reference_switch_step(losses)
    assert expected is not None and plateau < expected < plateau + 3000
    switch = AdaptiveSwitch()
    assert switch.weight(at(0)) == 1.0
    assert drive(switch, losses) == expected
    # lambda is 0 from the hand-over on; a step before it still ran ReLA (the decision had not reached the host)
    assert switch.weight(at(expected - 1)) == 1.0
    assert switch.weight(at(expected)) == 0.0 and switch.weight(at(expected + 5, epoch=5, epochs=6)) == 0.0
    assert float(switch.rho) >= 0.995


def test_adaptive_switch_not_during_steady_decrease():
    # a loss that keeps falling for the whole run never triggers the hand-over
    losses = 1.0 - 0.8 * np.arange(6000) / 6000
    assert reference_switch_step(losses) is None
    switch = AdaptiveSwitch()
    assert drive(switch, losses) is None
    assert switch.weight(at(0)) == 1.0 and int(switch.switch_step) == -1
    assert float(switch.rho) < 0.995


def test_adaptive_switch_on_flat_loss_and_custom_threshold():
    losses = np.full(20_000, 0.5)
    assert drive(AdaptiveSwitch(), losses) == reference_switch_step(losses)
    strict, loose = build_switch("adaptive:0.9999"), build_switch("adaptive:0.9")
    assert isinstance(strict, AdaptiveSwitch) and strict.threshold == 0.9999
    s_strict, s_loose = drive(strict, losses), drive(loose, losses)
    assert s_strict == reference_switch_step(losses, 0.9999)
    assert s_loose == reference_switch_step(losses, 0.9)
    assert s_loose is not None and s_strict is not None and s_loose < s_strict


def test_adaptive_switch_is_final():
    losses = np.full(3000, 0.5)
    switch = AdaptiveSwitch()
    step = drive(switch, losses)
    switch.update(5.0, at(step + 1))  # a later spike does not switch back or move the step
    switch.record_switch(step + 2)
    assert bool(switch.switched) and int(switch.switch_step) == step and switch.weight(at(step + 1)) == 0.0


def test_adaptive_switch_state_survives_state_dict():
    losses, _ = CURVES["exponential"]
    expected = reference_switch_step(losses)
    first = AdaptiveSwitch()
    assert drive(first, losses[:3000]) is None
    state = copy.deepcopy(first.state_dict())
    assert {"loss_fast", "loss_slow", "rho", "switched", "switch_step"} <= set(state)
    resumed = AdaptiveSwitch()
    resumed.load_state_dict(state)
    assert float(resumed.loss_fast) == float(first.loss_fast)
    assert drive(resumed, losses, start=3000) == expected
    # and a switched controller stays switched after a round trip
    again = AdaptiveSwitch()
    again.load_state_dict(resumed.state_dict())
    assert bool(again.switched) and int(again.switch_step) == expected and again.weight(at(expected)) == 0.0


# --- constant / never / build_switch --------------------------------------------------


@pytest.mark.parametrize("fraction,epochs,rela_epochs", [(0.5, 2, 1), (0.5, 4, 2), (0.3, 10, 3), (0.0, 5, 0),
                                                         (1.0, 3, 3)])
def test_constant_switch_weight_by_epoch(fraction, epochs, rela_epochs):
    switch = build_switch(f"constant:{fraction}")
    assert isinstance(switch, ConstantSwitch)
    weights = [switch.weight(at(10 * e, 10 * epochs, e, epochs)) for e in range(epochs)]
    assert weights == [1.0] * rela_epochs + [0.0] * (epochs - rela_epochs)
    switch.update(0.1, at(0))  # the loss does not matter to a constant schedule
    assert [switch.weight(at(10 * e, 10 * epochs, e, epochs)) for e in range(epochs)] == weights


def test_never_switch():
    switch = build_switch("never")
    assert isinstance(switch, NeverSwitch)
    for step in range(2000):
        switch.update(0.5, at(step, 2000))
    assert all(switch.weight(at(s, 2000, s // 700, 3)) == 1.0 for s in range(0, 2000, 100))
    assert not bool(switch.switched)


def test_build_switch_defaults():
    switch = build_switch("adaptive")
    assert isinstance(switch, AdaptiveSwitch)
    assert (switch.threshold, switch.fast_decay, switch.slow_decay) == (0.995, 0.999, 0.99)
    assert float(switch.loss_fast) == 1.0 and float(switch.loss_slow) == 2.0


@pytest.mark.parametrize("spec", ["sometimes", "constant", "constant:abc", "constant:1.5", "constant:-0.1",
                                  "adaptive:high", "never:3", "", "plateau:x", "plateau:0.1:0.2:0.3",
                                  "plateau:2", "soft-plateau:-1", "soft", "soft:0.5", "soft:0.5:x"])
def test_bad_switch_specs_raise(spec):
    with pytest.raises(RelaError, match="switch"):
        build_switch(spec)


# --- BYOL, the base method -------------------------------------------------------------


@pytest.fixture
def byol():
    torch.manual_seed(0)
    backbone, dim = build_backbone("convnet", 3, 16)
    return build_method("byol", backbone, dim, 10, hidden_dim=64, out_dim=32)


def test_unknown_method():
    backbone, dim = build_backbone("convnet", 3, 16)
    with pytest.raises(RelaError, match="'no-such-method'"):
        build_method("no-such-method", backbone, dim, 10)


def test_byol_loss_is_symmetrised_negative_cosine(byol):
    torch.manual_seed(1)
    x0, x1 = torch.rand(6, 3, 16, 16), torch.rand(6, 3, 16, 16)
    byol.train()
    out = byol([x0, x1], torch.zeros(6, dtype=torch.long))
    assert torch.isfinite(out.loss) and -1.0 <= out.loss.item() <= 1.0
    assert out.features.shape == (6, 128)

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a, b, dim=1).mean()

    # recompute with the same modules (BatchNorm in train mode sees the same batches in the same order)
    byol_copy = copy.deepcopy(byol)
    torch.manual_seed(1)
    h0, h1 = byol_copy.backbone(x0).flatten(1), byol_copy.backbone(x1).flatten(1)
    p0 = byol_copy.prediction_head(byol_copy.projection_head(h0))
    p1 = byol_copy.prediction_head(byol_copy.projection_head(h1))
    with torch.no_grad():
        z1 = byol_copy.projection_head_momentum(byol_copy.backbone_momentum(x1).flatten(1))
        z0 = byol_copy.projection_head_momentum(byol_copy.backbone_momentum(x0).flatten(1))
    expected = -0.5 * (cos(p0, z1) + cos(p1, z0))
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_byol_gradients_reach_online_networks_only(byol):
    x0, x1 = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    byol([x0, x1], torch.zeros(4, dtype=torch.long)).loss.backward()
    assert all(p.grad is not None for p in byol.backbone.parameters())
    assert all(p.grad is not None for p in byol.prediction_head.parameters())
    assert all(not p.requires_grad and p.grad is None for p in byol.backbone_momentum.parameters())
    assert all(not p.requires_grad for p in byol.projection_head_momentum.parameters())


def _online_momentum_pairs(byol):
    return (list(zip(byol.backbone.parameters(), byol.backbone_momentum.parameters()))
            + list(zip(byol.projection_head.parameters(), byol.projection_head_momentum.parameters())))


def _distance(byol):
    return sum((o - m).pow(2).sum().item() for o, m in _online_momentum_pairs(byol))


def expected_momentum(step, max_steps, start=0.99, end=1.0):
    """Cosine schedule from start to end over max_steps (lightly's convention: end reached at max_steps - 1)."""
    return end - (end - start) * (math.cos(math.pi * step / (max_steps - 1)) + 1) / 2


@pytest.mark.parametrize("step,max_steps", [(0, 100), (30, 100), (80, 100)])
def test_byol_momentum_moves_toward_online_with_cosine_schedule(byol, step, max_steps):
    with torch.no_grad():  # the online networks take an optimiser step away from the momentum copy
        for p in list(byol.backbone.parameters()) + list(byol.projection_head.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    before = [m.detach().clone() for _, m in _online_momentum_pairs(byol)]
    dist_before = _distance(byol)
    byol.update_momentum(step, max_steps)
    m = expected_momentum(step, max_steps)
    assert 0.99 <= m < 1.0
    for (online, momentum), old in zip(_online_momentum_pairs(byol), before):
        torch.testing.assert_close(momentum, m * old + (1 - m) * online, atol=1e-6, rtol=1e-5)
    assert _distance(byol) < dist_before
    assert _distance(byol) == pytest.approx(m ** 2 * dist_before, rel=1e-3)


def test_byol_momentum_frozen_at_the_end_of_the_schedule(byol):
    with torch.no_grad():
        for p in byol.backbone.parameters():
            p.add_(0.1)
    before = [m.detach().clone() for _, m in _online_momentum_pairs(byol)]
    byol.update_momentum(99, 100)  # m = 1 at the last step
    for (_, momentum), old in zip(_online_momentum_pairs(byol), before):
        assert torch.equal(momentum, old)


def test_switch_step_is_the_one_place_state_changes():
    switch = build_switch("adaptive:0.9999")
    switch.step(1.0, 0.5, at(7, 100))  # a ReLA step: its loss enters the EMAs
    assert float(switch.loss_fast) != 1.0 and not bool(switch.switched)
    ema = float(switch.loss_fast)
    switch.step(1.0, None, at(8, 100))  # no ReLA loss computed: nothing to learn from
    assert float(switch.loss_fast) == ema
    constant = build_switch("constant:0.5")
    constant.step(0.0, None, at(11, 20, 2, 4))  # the first step at weight 0 is the hand-over
    constant.step(0.0, None, at(12, 20, 2, 4))
    assert bool(constant.switched) and int(constant.switch_step) == 11


# --- switches whose time constants are fractions of the run (issue 13) --------------------


def stretched(total: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """One loss curve, as a function of the run's fraction u = step / total: fast fall, slow tail, flat from u = 0.4."""
    u = np.minimum(np.arange(total) / total, 0.4)
    curve = 0.3 + 0.6 * np.exp(-u / 0.05) + 0.1 * (0.4 - u)
    if noise:
        curve = curve * (1 + noise * np.random.default_rng(seed).standard_normal(total))
    return curve


def run_switch(switch: Switch, losses, start: int = 0, total: int | None = None) -> list[float]:
    """Drive a switch the way the training step does over ``losses[start:]``; return lambda per step."""
    total, lams = total or len(losses), []
    for step, loss in enumerate(losses[start:], start):
        progress = at(step, total)
        lam = switch.weight(progress)
        switch.step(lam, float(loss) if lam > 0 else None, progress)
        lams.append(lam)
    return lams


SCALE_FREE = {"plateau": PlateauSwitch, "soft-plateau": SoftPlateauSwitch, "soft:0.3:0.2": lambda: RampSwitch(0.3, 0.2)}


@pytest.mark.parametrize("noise", [0.0, 0.02])
@pytest.mark.parametrize("name", SCALE_FREE)
def test_switch_fires_at_the_same_fraction_of_500_or_50000_steps(name, noise):
    fractions = {}
    for total in (500, 50_000):
        switch = build_switch(name)
        lams = run_switch(switch, stretched(total, noise))
        assert bool(switch.switched), f"{name} never handed over in {total} steps"
        hand_over = int(switch.switch_step)
        assert lams[hand_over] == 0.0 and all(lam > 0 for lam in lams[:hand_over])  # the first step at lambda 0
        fractions[total] = hand_over / total
    # Without noise the decision is the same to a step's resolution; with 2 % per-step noise a 500-step run
    # averages 100x fewer losses per window, so its decision moves by a few % of the run (measured: <= 0.06).
    assert fractions[500] == pytest.approx(fractions[50_000], abs=0.01 if noise == 0 else 0.07)
    # the plateau (u >= 0.4) or the schedule decides, not the run's length
    assert 0.4 <= fractions[50_000] <= 0.75 if name != "soft:0.3:0.2" else fractions[50_000] == pytest.approx(0.5, abs=1e-3)


def test_the_authors_rule_depends_on_the_step_count():
    """The reason for the variants above: the same curve hands over at very different fractions (or never)."""
    short, long = AdaptiveSwitch(), AdaptiveSwitch()
    run_switch(short, stretched(500))
    run_switch(long, stretched(50_000))
    assert not bool(short.switched)  # rho cannot reach 0.995 within 500 steps
    assert bool(long.switched) and int(long.switch_step) / 50_000 < 0.4  # and fires before the plateau


def test_plateau_waits_while_the_loss_keeps_improving():
    total = 2000
    losses = 1.0 - 0.5 * np.arange(total) / total  # a steady 50 % fall: every patience window improves > 1 %
    switch = PlateauSwitch()
    assert 1.0 not in set(run_switch(switch, losses)) or not bool(switch.switched)
    assert not bool(switch.switched)


def test_plateau_threshold_and_patience_are_relative_to_the_loss_and_the_run():
    total = 4000
    slow = 1.0 - 0.1 * np.arange(total) / total  # falls by 0.5 % per 5 % of the run
    loose = build_switch("plateau:0.01")  # asks for 1 % per 5 % of the run: a plateau
    strict = build_switch("plateau:0.001")  # asks for 0.1 %: still improving
    run_switch(loose, slow)
    run_switch(strict, slow)
    assert bool(loose.switched) and not bool(strict.switched)
    assert int(loose.switch_step) == pytest.approx(0.05 * total, abs=0.02 * total)
    scaled = build_switch("plateau:0.01")  # the same curve times 10: the same decision (relative threshold)
    run_switch(scaled, 10 * slow)
    assert int(scaled.switch_step) == int(loose.switch_step)
    patient = build_switch("plateau:0.03:0.2")  # 3 % takes 30 % of this run: no improvement within 20 %
    run_switch(patient, slow)
    assert int(patient.switch_step) == pytest.approx(0.2 * total, abs=0.02 * total)


def test_soft_plateau_ramps_lambda_linearly_after_the_plateau():
    total = 10_000
    switch = build_switch("soft-plateau:0.2")
    lams = np.array(run_switch(switch, stretched(total)))
    start = int(switch.plateau_step)
    ramp = lams[start + 1:int(switch.switch_step) + 1]
    assert lams[:start + 1].min() == 1.0
    expected = 1 - np.arange(1, len(ramp) + 1) / (0.2 * total)
    np.testing.assert_allclose(ramp, np.clip(expected, 0, 1), atol=1e-9)
    assert int(switch.switch_step) - start == pytest.approx(0.2 * total, abs=1)
    assert (lams[int(switch.switch_step):] == 0).all()


def test_plateau_state_survives_state_dict_mid_run():
    total = 20_000
    losses = stretched(total, noise=0.02)
    whole = SoftPlateauSwitch()
    expected = run_switch(whole, losses)
    first = SoftPlateauSwitch()
    lams = run_switch(first, losses[:9000], total=total)
    resumed = SoftPlateauSwitch()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    lams += run_switch(resumed, losses, start=9000)
    assert lams == expected and int(resumed.switch_step) == int(whole.switch_step)


def test_ramp_switch_follows_training_progress():
    switch = build_switch("soft:0.25:0.5")
    assert [switch.weight(at(s, 100)) for s in (0, 24, 25, 50, 75, 99)] == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    hard = build_switch("soft:0.3:0")
    assert [hard.weight(at(s, 10)) for s in (2, 3)] == [1.0, 0.0]


# --- the host's view of the switch, read late (issue 26) ---------------------------------------


@pytest.mark.parametrize("name", ["adaptive:0.6", "plateau", "soft-plateau"])
def test_lambda_is_the_same_read_late_or_now(name):
    """On a GPU the host reads the switch's state through copies LAG steps old (Switch.publish), on CPU the
    state itself: a decision carries the step it takes effect, so both give the same lambda at every step."""
    losses = stretched(400, noise=0.02)
    now, late = build_switch(name), build_switch(name)
    late.lagged = True  # the GPU's code path: ring of host copies, on CPU tensors
    assert run_switch(now, losses) == run_switch(late, losses)
    assert bool(now.switched) and int(now.switch_step) == int(late.switch_step)
    # and the host never saw a state newer than LAG steps: the view after the last step is one step old
    assert late.host_view()["switch_step"] == int(late.switch_step)


def test_a_decision_takes_effect_lag_steps_later():
    """adaptive:0 decides at its first ReLA step (rho = e^-1 >= 0); the host, LAG steps behind, runs
    steps 0..LAG with ReLA, and step LAG + 1 is the first base-method step (the authors': step 1)."""
    switch = build_switch("adaptive:0")
    switch.lagged = True
    lams = run_switch(switch, [0.5] * 6, total=6)
    assert lams == [1.0] * (LAG + 1) + [0.0] * (5 - LAG) and int(switch.switch_step) == LAG + 1
