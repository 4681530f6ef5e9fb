"""A training step never waits for the device (issue 26): no host-device sync in a steady-state step.

On CPU, torch.profiler counts the operators that read a tensor's value on the host (``aten::item`` and
``aten::_local_scalar_dense``: each a sync on a GPU) over 20 steps of each phase, run through
:func:`rela.train.train` as users run it, leaving out the steps that log (``--log-every``), where the
logged values are read on purpose. On CUDA the same steps run under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_overhead  # noqa: E402  (the benchmark's tiny network, run configuration and counting)

from rela.train import train  # noqa: E402

# 8 steps of warm-up, then 26 profiled of which 20 do not log (steps 9, 10, 19, 20, 29, 30 log by either rule)
ARGS = argparse.Namespace(warmup=8, steps=0, profile_steps=26, batch_size=16, log_every=10)
STEPS = ARGS.warmup + ARGS.profile_steps
# adaptive:0.45 decides at about step 20 whatever the loss (rho starts at e^-1 and rises as the slow EMA meets
# the fast one), so the profiled steps hold ReLA steps, the hand-over and base-method steps with the switch on
RUNS = {"rela-phase": ("rela", {}), "method-phase": ("byol", {}),
        "hand-over": ("rela", {"switch": "adaptive:0.45", "progress": True})}


def config(name: str, folder: Path):
    phase, changes = RUNS[name]
    return dataclasses.replace(step_overhead.run_config(phase, ARGS, folder), **changes)


@pytest.mark.parametrize("name", RUNS)
def test_steady_state_step_reads_nothing_back_from_the_device(name, tmp_path):
    probe = step_overhead.StepProbe(ARGS.warmup, ARGS.steps, ARGS.log_every)
    metrics = train(config(name, tmp_path), callbacks=[probe])
    assert metrics["steps"] == STEPS and len(probe.counts) == 20
    syncs = [c[0] for c in probe.counts]
    assert syncs == [0] * 20, f"host syncs per step: {syncs}"
    assert all(ops > 100 for _, ops in probe.counts)  # the profiler did see the steps
    if name == "hand-over":
        assert ARGS.warmup + 2 < metrics["switch_step"] < STEPS - 2, metrics["switch_step"]


def test_log_steps_do_read_back(tmp_path):
    """The counter works: the steps that log read their values (a fixed handful, not per parameter)."""
    probe = step_overhead.StepProbe(ARGS.warmup, ARGS.steps, ARGS.log_every)
    probe.log_every = 10 ** 6  # count every profiled step, log steps included
    train(config("rela-phase", tmp_path), callbacks=[probe])
    syncs = [c[0] for c in probe.counts]
    # steps 9, 19, 29 (Lightning's log rows) read the dozen logged values, each an item + _local_scalar_dense
    assert sum(s > 0 for s in syncs) == 3 and max(syncs) <= 2 * 16, syncs


class SyncDebug(Callback):
    """Turns CUDA's sync debug mode to "error" for the steady-state steps that do not log."""

    def __init__(self, warmup: int, log_every: int):
        self.warmup, self.log_every, self.checked = warmup, log_every, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        step = trainer.global_step
        quiet = step >= self.warmup and step % self.log_every and (step + 1) % self.log_every
        torch.cuda.set_sync_debug_mode("error" if quiet else "default")
        self.checked += bool(quiet)

    def on_train_end(self, trainer, module) -> None:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", RUNS)
def test_cuda_step_runs_under_sync_debug_error(name, tmp_path):
    check = SyncDebug(ARGS.warmup, ARGS.log_every)
    try:
        cfg = dataclasses.replace(config(name, tmp_path), accelerator="gpu", precision="auto")
        metrics = train(cfg, callbacks=[check])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert metrics["steps"] == STEPS and check.checked == 20


class Lambdas(Callback):
    def __init__(self):
        self.lams: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.lams.append(module._batch_lam)


# 128 steps (synthetic 512, convnet, batch 32, 8 epochs, random prior, seed 0): (first step at lambda < 1, the
# hand-over). Before issue 26 the host read the switch's state at once: 69 / 8 / 8 -> 20 (measured on main at
# 56240ab); reading it LAG = 1 step late, every hand-over came one step later: 70 / 9 / 9 -> 21. Since a step's
# views are made in one call (augment_views) the random draws differ and the losses with them: with
# rela.accelerator.LAG patched to 0 the same run hands over at 69 / 14 / 14 -> 26, with LAG = 1 (below) one
# step later again, the ramp as long.
HANDOVERS = {"adaptive:0.6": (70, 70), "plateau": (15, 15), "soft-plateau": (15, 27)}


@pytest.mark.parametrize("spec", HANDOVERS)
def test_hand_over_steps_of_a_128_step_run(spec, tmp_path):
    from rela.config import TrainConfig

    lams = Lambdas()
    cfg = TrainConfig(dataset="synthetic", backbone="convnet", batch_size=32, ratio=1.0, epochs=8, prior="random",
                      switch=spec, progress=False, probe_every=0, accelerator="cpu", seed=0,
                      out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))
    metrics = train(cfg, callbacks=[lams])
    first_below, hand_over = HANDOVERS[spec]
    assert len(lams.lams) == 128 and metrics["switch_step"] == hand_over
    assert lams.lams.index(next(lam for lam in lams.lams if lam < 1)) == first_below
    assert lams.lams.index(0.0) == hand_over and set(lams.lams[hand_over:]) == {0.0}
