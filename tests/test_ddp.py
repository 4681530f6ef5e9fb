"""Two-process data-parallel training on CPU: Lightning's DDP over gloo, started from the CLI.

``rela train --devices 2 --accelerator cpu`` runs in a subprocess, through a small driver that
wraps two ReLAModule hooks to record, on every rank, what each step trained on (sample
indices, the bank targets it indexed, the switch weight) and which checkpoints the rank
wrote. Lightning's launcher starts rank 1 by re-running the same command, driver included.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from test_accelerator import reference_switch_step
from conftest import run_processes

from rela.bank import open_bank
from rela.targets import transport
from rela.data import DynamicSubsetSampler

DRIVER = """
import json, os, sys
from pathlib import Path

from rela.cli import main
from rela.train import ReLAModule

log = {"steps": [], "saves": []}
training_step, on_fit_start = ReLAModule.training_step, ReLAModule.on_fit_start


def recording_step(self, index, batch_idx):
    log["steps"].append({"epoch": self.current_epoch, "index": index.tolist(),
                         "targets": self.rela.targets[index].tolist(),
                         "lambda": self.rela.switch.weight(self.progress())})
    return training_step(self, index, batch_idx)


def recording_fit_start(self):
    io = self.trainer.strategy.checkpoint_io
    save = io.save_checkpoint

    def recording_save(checkpoint, path, storage_options=None):
        log["saves"].append(str(path))
        return save(checkpoint, path, storage_options)

    io.save_checkpoint = recording_save
    log.update(rank=self.global_rank, world_size=self.trainer.world_size)
    return on_fit_start(self)


def dump(self):
    log["switch_step"] = self.switch_step
    Path(os.environ["RELA_TEST_LOG"], f"rank{self.global_rank}.json").write_text(json.dumps(log))


ReLAModule.training_step, ReLAModule.on_fit_start, ReLAModule.on_train_end = recording_step, recording_fit_start, dump
sys.exit(main(sys.argv[1:]))
"""

N, RATIO, BATCH, EPOCHS, SEED = 512, 0.5, 32, 2, 0
STEPS_PER_EPOCH = int(RATIO * N) // 2 // BATCH  # per rank, and so for the whole job
# Adaptive switch with a threshold the EMAs cross after ~4 of the 8 steps (the gap between them
# starts at 1 and closes ~1 % per step: rho = exp(-gap) goes 0.368, 0.372, ..., 0.383 ...), so
# the ranks must agree on a decision taken mid-run from the loss averaged over both of them.
SWITCH = "adaptive:0.3808"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    driver, logs, out = base / "driver.py", base / "logs", base / "run"
    driver.write_text(DRIVER)
    logs.mkdir()
    args = ["train", "--dataset", f"synthetic:{N}", "--backbone", "convnet", "--method", "byol",
            "--prior", "random", "--switch", SWITCH, "--ratio", str(RATIO), "--batch-size", str(BATCH),
            "--epochs", str(EPOCHS), "--seed", str(SEED), "--probe-every", "0", "--no-progress",
            "--devices", "2", "--accelerator", "cpu", "--out", str(out), "--cache-dir", str(base / "cache")]
    run_processes([[str(driver), *args]], [{**os.environ, "RELA_TEST_LOG": str(logs), "OMP_NUM_THREADS": "1"}], base)
    ranks = [json.loads((logs / f"rank{r}.json").read_text()) for r in (0, 1)]
    return out, ranks


def test_both_ranks_trained_the_same_number_of_steps(ddp_run):
    out, ranks = ddp_run
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert [len(r["steps"]) for r in ranks] == [EPOCHS * STEPS_PER_EPOCH] * 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert metrics["images_seen"] == EPOCHS * STEPS_PER_EPOCH * BATCH * 2  # both ranks' images


def test_each_sample_of_the_subset_seen_once_per_epoch_across_ranks(ddp_run):
    _, ranks = ddp_run
    sampler = DynamicSubsetSampler(N, RATIO, SEED)  # one process: the whole subset of each epoch
    for epoch in range(EPOCHS):
        seen = [[i for s in r["steps"] if s["epoch"] == epoch for i in s["index"]] for r in ranks]
        assert len(seen[0]) == len(seen[1]) == round(RATIO * N) // 2
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(sampler.indices(epoch).tolist())
    subsets = [{i for r in ranks for s in r["steps"] if s["epoch"] == e for i in s["index"]} for e in range(EPOCHS)]
    assert subsets[0] != subsets[1]  # a fresh subset each epoch


def test_every_rank_indexes_the_bank_rows_of_its_samples(ddp_run):
    out, ranks = ddp_run
    metrics = json.loads((out / "metrics.json").read_text())
    raw, _ = open_bank(metrics["bank_file"], metrics["bank_key"])
    expected = transport(raw, metrics["target_dim"]).values.numpy()
    for r in ranks:
        for step in r["steps"]:
            np.testing.assert_allclose(np.array(step["targets"]), expected[step["index"]], rtol=0, atol=1e-6)


def test_checkpoints_written_once_by_rank_zero(ddp_run):
    out, ranks = ddp_run
    assert ranks[1]["saves"] == []
    assert ranks[0]["saves"] and {Path(p).name for p in ranks[0]["saves"]} == {"last.ckpt"}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]


# --- the switch decision and the logs, on a run where the ranks see different ReLA losses ---------

OFFSET_DRIVER = """
import json, os, sys
from pathlib import Path

import torch.distributed as dist

from rela.accelerator import ReLAAccelerator
from rela.cli import main
from rela.train import ReLAModule

log = {"losses": [], "lambdas": []}
rela_loss, training_step = ReLAAccelerator.loss, ReLAModule.training_step


def offset_loss(self, features_1, features_2, index):
    # rank r's ReLA loss plus r * OFFSET: the same gradients, but a switch that depends on which losses it sees
    value = rela_loss(self, features_1, features_2, index) + dist.get_rank() * OFFSET
    log["losses"].append(value.item())
    return value


def recording_step(self, index, batch_idx):
    log["lambdas"].append(self.rela.switch.weight(self.progress()))
    return training_step(self, index, batch_idx)


def dump(self):
    log["switch_step"] = self.switch_step
    Path(os.environ["RELA_TEST_LOG"], f"rank{self.global_rank}.json").write_text(json.dumps(log))


ReLAAccelerator.loss, ReLAModule.training_step, ReLAModule.on_train_end = offset_loss, recording_step, dump
sys.exit(main(sys.argv[1:]))
"""
# With rank 1's loss 100 above rank 0's, the adaptive rule (threshold 0.45) fed rank 0's losses
# alone never fires in 16 steps, fed rank 1's hands over after its 3rd step and fed their average after
# its 5th (test_accelerator.reference_switch_step): each way of combining the ranks shows.
OFFSET, OFFSET_SWITCH, OFFSET_STEPS_PER_EPOCH = 100.0, "adaptive:0.45", N // 2 // BATCH


def run_two_ranks(driver: str, args: list[str], base: Path) -> list[dict]:
    """``driver`` with ``args`` as two CPU ranks (rank 1 started by Lightning); returns each rank's log."""
    logs = base / "logs"
    logs.mkdir()
    (base / "driver.py").write_text(driver)
    run_processes([[str(base / "driver.py"), *args]],
                  [{**os.environ, "RELA_TEST_LOG": str(logs), "OMP_NUM_THREADS": "1"}], base)
    return [json.loads((logs / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def offset_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp-offset")
    out = base / "run"
    args = ["train", "--dataset", f"synthetic:{N}", "--backbone", "convnet", "--method", "byol",
            "--prior", "random", "--switch", OFFSET_SWITCH, "--ratio", "1", "--batch-size", str(BATCH),
            "--epochs", str(EPOCHS), "--seed", str(SEED), "--probe-every", "1", "--no-progress",
            "--devices", "2", "--accelerator", "cpu", "--out", str(out), "--cache-dir", str(base / "cache")]
    return out, run_two_ranks(f"OFFSET = {OFFSET!r}\n" + OFFSET_DRIVER, args, base)


def test_switch_decision_identical_on_all_ranks(offset_run):
    out, ranks = offset_run
    lambdas = [r["lambdas"] for r in ranks]
    assert lambdas[0] == lambdas[1] and len(lambdas[0]) == EPOCHS * OFFSET_STEPS_PER_EPOCH
    rela_steps = lambdas[0].count(1.0)
    assert lambdas[0] == [1.0] * rela_steps + [0.0] * (len(lambdas[0]) - rela_steps)  # one hand-over
    own = [r["losses"] for r in ranks]
    assert len(own[0]) == len(own[1]) == rela_steps
    # The switch saw each step's loss averaged over the ranks: replaying the rule on the average
    # gives the hand-over; rank 0's or rank 1's losses alone give another one.
    threshold = float(OFFSET_SWITCH.partition(":")[2])
    mean = [(a + b) / 2 for a, b in zip(own[0], own[1])]
    assert reference_switch_step(mean, threshold) == rela_steps  # the first base-method step
    alone = [reference_switch_step(losses, threshold) for losses in own]
    assert rela_steps not in alone, alone
    metrics = json.loads((out / "metrics.json").read_text())
    switch_step = metrics["switch_step"]
    assert ranks[0]["switch_step"] == ranks[1]["switch_step"] == switch_step == metrics["rela_steps"] == rela_steps
    assert 0 < switch_step < EPOCHS * OFFSET_STEPS_PER_EPOCH


def test_metrics_logged_once_under_ddp(offset_run):
    out, _ = offset_run
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["hparams.yaml", "metrics.csv"]  # one log, no metrics.1.csv
    with open(out / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k for row in rows for k, v in row.items() if v != ""}
    assert {"loss", "train/lambda", "train/method_loss", "train/monitor_acc", "probe_knn", "epoch", "step"} <= logged
    # one writer: each step's training row once, one probe row per epoch (two writers double both)
    step_rows = [row["step"] for row in rows if row["loss"] != ""]
    probe_rows = [row["epoch"] for row in rows if row["probe_knn"] != ""]
    assert step_rows and len(step_rows) == len(set(step_rows))
    assert probe_rows == [str(e) for e in range(EPOCHS)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, EPOCHS + 1))
    assert metrics["steps"] == EPOCHS * OFFSET_STEPS_PER_EPOCH
