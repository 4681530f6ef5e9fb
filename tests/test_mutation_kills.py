"""Tests written to kill the mutants that `make mutation` found surviving (benchmarks/results/mutation.md).

The transport and the accelerator's tests run the real functions on small tensors; the training step's tests fit the shipped ReLAModule for a few real steps on ``synthetic:128``
(batches of 32: 4 steps an epoch) and read what it logged, counted and trained.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from conftest import fit, parameters
from test_accelerator import at, drive, reference_switch_step, run_switch
from test_targets import _features, _numpy_pca
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from rela.accelerator import LAG, AdaptiveSwitch, NeverSwitch, PlateauSwitch, Progress, ReLAAccelerator, build_switch, rela_loss
from rela.backbones import build_backbone
from rela.build import prepare
from rela.config import TrainConfig
from rela.data import Normalize
from rela.data.augment import RELA_VIEW
from rela.errors import RelaError
from rela.targets import transport
from rela.train import ReLAModule


def _blocks_of(monkeypatch, rows: int, k: int) -> None:
    """transport reads ``rows`` rows (of k float64 features) per block."""
    monkeypatch.setattr("rela.bank.BLOCK_BYTES", rows * k * 8)


def _assert_same_up_to_sign(z: np.ndarray, ref: np.ndarray, atol: float) -> None:
    for j in range(ref.shape[1]):
        sign = np.sign(z[:, j] @ ref[:, j])
        assert sign != 0, f"component {j} is zero or orthogonal to the reference"
        np.testing.assert_allclose(z[:, j], sign * ref[:, j], atol=atol, err_msg=f"component {j}")


# --- transport (rela/targets.py) -------------------------------------------------------------


def test_transport_far_from_the_origin_matches_numpy(monkeypatch):
    # an offset of 1e6 on features of spread ~1: the mean and the projections must be kept in
    # float64 (as float32, 1e6 has a resolution of 0.06), merged over 13 blocks
    y = _features(n=500, k=12, seed=3) + 1e6
    _blocks_of(monkeypatch, 40, 12)
    targets = transport(torch.from_numpy(y), 5)
    ref, explained = _numpy_pca(y, 5)
    _assert_same_up_to_sign(targets.values.numpy().astype(np.float64), ref, atol=1e-4)
    assert targets.explained_variance == pytest.approx(explained, rel=1e-6)


def test_transport_reads_a_float32_array_in_float64(monkeypatch):
    # a float32 bank (numpy, as memory-mapped) gives what the same values give as a tensor: both are read
    # as float64 blocks, so the statistics agree to float64 rounding
    y = (_features(n=300, k=12, seed=4) + 100).astype(np.float32)
    _blocks_of(monkeypatch, 40, 12)
    as_array, as_tensor = transport(y, 6), transport(torch.from_numpy(y), 6)
    assert as_array.explained_variance == pytest.approx(as_tensor.explained_variance, rel=1e-13)
    torch.testing.assert_close(as_array.values, as_tensor.values, rtol=0, atol=1e-6)


def test_transport_row_by_row_equals_one_piece(monkeypatch):
    # 3000 blocks of one row: every running sum (mean, scatter, the targets' mean and square) is merged
    # 3000 times; kept in float64 they end within a float32 rounding of the one-block result
    y = _features(n=3000, k=4, seed=5)
    whole = transport(torch.from_numpy(y), 4)
    _blocks_of(monkeypatch, 1, 4)
    rows = transport(torch.from_numpy(y), 4)
    torch.testing.assert_close(rows.values, whole.values, rtol=0, atol=5e-7)
    assert rows.explained_variance == pytest.approx(whole.explained_variance, rel=1e-12)


@pytest.mark.parametrize("scale", [1e-7, 1e7])
def test_transport_is_scale_free(scale):
    # Targets and explained variance do not depend on the features' units; the dead component's
    # threshold is relative to the largest one, so a constant feature stays dead at any scale.
    y = np.concatenate([_features(n=150, k=5), np.full((150, 1), 7.25)], axis=1)
    unit, scaled = transport(torch.from_numpy(y), 6), transport(torch.from_numpy(scale * y), 6)
    assert torch.count_nonzero(scaled.values[:, -1]) == 0
    _assert_same_up_to_sign(scaled.values[:, :5].numpy().astype(np.float64),
                            unit.values[:, :5].numpy().astype(np.float64), atol=1e-4)
    assert scaled.explained_variance == pytest.approx(unit.explained_variance, rel=1e-9)
    small = transport(torch.from_numpy(scale * y), 2)  # below 1 in total variance too: still a fraction
    assert small.explained_variance == pytest.approx(transport(torch.from_numpy(y), 2).explained_variance, rel=1e-9)


def test_transport_names_the_block_with_a_non_finite_value(monkeypatch):
    y = torch.from_numpy(_features(n=50, k=4))
    y[27, 1] = float("nan")
    _blocks_of(monkeypatch, 10, 4)
    with pytest.raises(RelaError, match=r"NaN or Inf values \(rows 20\.\.29\)"):
        transport(y, 2)


def test_transport_targets_are_float32_whatever_the_default_dtype():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        values = transport(torch.from_numpy(_features(n=60, k=4)), 3).values
    finally:
        torch.set_default_dtype(default)
    assert values.dtype == torch.float32


# --- the ReLA loss, the accelerator's step, switch messages and metrics (rela/accelerator.py) --------


def test_rela_loss_runs_in_the_predictions_dtype():
    # under bf16 autocast the transfer head predicts in bf16: the float32 targets are cast to it
    g = torch.Generator().manual_seed(0)
    pred_1, pred_2, target = (torch.randn(8, 16, generator=g) for _ in range(3))
    pred_1, pred_2 = pred_1.bfloat16(), pred_2.bfloat16()
    loss = rela_loss(pred_1, pred_2, target)
    assert loss.dtype == torch.bfloat16
    assert torch.equal(loss, rela_loss(pred_1, pred_2, target.bfloat16()))


def test_step_loss_regresses_two_rela_views_onto_the_indexed_targets():
    torch.manual_seed(0)
    backbone, dim = build_backbone("convnet", 3, 16)
    targets = torch.randn(10, 6)
    acc = ReLAAccelerator(dim, targets, NeverSwitch())
    normalize = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    index = torch.tensor([7, 2, 2, 9])
    torch.manual_seed(1)
    asked = []

    def view(k):  # the k-th ReLA view, drawn when the step asks for it (memory mode's order)
        asked.append(k)
        return acc.view(images)

    loss, features = acc.step_loss(backbone, view, index, normalize)
    assert asked == [0, 1]
    torch.manual_seed(1)  # the same two random views, drawn by hand
    f1, f2 = (backbone(normalize(RELA_VIEW(images))).flatten(1) for _ in range(2))
    assert not torch.equal(f1, f2)  # two different views
    torch.testing.assert_close(features, f1, rtol=0, atol=0)
    torch.testing.assert_close(loss, rela_loss(acc.transfer(f1), acc.transfer(f2), targets[index]), rtol=0, atol=0)


@pytest.mark.parametrize("spec, message", [
    ("adaptive:high", "THRESHOLD must be a number"),
    ("plateau:x", "THRESHOLD:PATIENCE must be up to 2 number(s) in [0, 1], colon-separated"),
    ("soft:0.5", "START:LENGTH must be 2 number(s) in [0, 1], colon-separated"),
])
def test_bad_switch_argument_says_what_it_must_be(spec, message):
    with pytest.raises(RelaError) as err:
        build_switch(spec)
    assert str(err.value) == f"bad switch {spec!r}: {message}"


def test_switch_metrics_report_what_the_switch_watches():
    adaptive = AdaptiveSwitch()
    assert adaptive.metrics() == {"rho": 0.0}  # nothing seen yet
    losses = [0.9, 0.8, 0.85]
    for step, loss in enumerate(losses):
        adaptive.update(loss, at(step))
    fast, slow = 1.0, 2.0
    for loss in losses:  # rho of the last step: from the EMAs before its loss entered them
        rho = math.exp(-max(slow - fast, 0.0))
        fast = 0.999 * fast + 0.001 * loss
        slow = 0.99 * slow + 0.01 * fast
    assert adaptive.metrics() == {"rho": pytest.approx(rho, rel=1e-12)}
    plateau = PlateauSwitch()
    assert plateau.metrics() == {}  # no loss seen: no best yet
    plateau.update(0.7, at(0, 100))
    assert plateau.metrics() == {"plateau_best": pytest.approx(0.7, rel=1e-12)}  # the first smoothed loss is the loss

# --- the training step (rela/train.py; scripts/mutation_train.py mutates it) ---------------------------


def _module(tmp_path, switch: str, prior: str = "random", epochs: int = 1) -> ReLAModule:
    cfg = TrainConfig(accelerator="cpu", dataset="synthetic:128", prior=prior, switch=switch, batch_size=32, epochs=epochs,
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


def test_progress_steps_is_a_fraction_of_the_run_but_at_least_one_step():
    assert Progress(0, 1000).steps(0.05) == 50.0
    assert Progress(0, 10).steps(0.05) == 1.0  # half a step rounds up to one, not more


def test_adaptive_threshold_one_fires_when_the_emas_meet():
    # a rising loss: the slow EMA falls to the fast one, their gap reaches 0 and rho is exactly 1
    losses = np.full(2000, 3.0)
    expected = reference_switch_step(losses, threshold=1.0)
    assert expected is not None
    assert drive(build_switch("adaptive:1"), losses) == expected


def test_plateau_before_any_loss_and_at_a_loss_of_zero():
    switch = PlateauSwitch()
    assert math.isnan(switch.smoothed(at(0, 1000))) and switch.weight(at(0, 1000)) == 1.0
    # A loss at its minimum, 0, never improves by a relative threshold: the plateau is reached
    # patience (5 % of 1000 = 50 steps) after the first step; the host learns it LAG steps late (its
    # last step at lambda 1 is 50 + LAG, the plateau_step recorded) and the next step runs at lambda 0.
    lams = run_switch(switch, np.zeros(1000))
    assert int(switch.plateau_step) == 50 + LAG and int(switch.switch_step) == 51 + LAG
    assert lams[:51 + LAG] == [1.0] * (51 + LAG) and lams[51 + LAG] == 0.0
