"""Two-process data-parallel training on CPU: Lightning's DDP over gloo, started from the CLI.

``rela train --devices 2 --accelerator cpu`` runs in a subprocess, through a small driver that
wraps two ReLAModule hooks to record, on every rank, what each step trained on (sample
indices, the bank targets it indexed, the switch weight) and which checkpoints the rank
wrote. Lightning's launcher starts rank 1 by re-running the same command, driver included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
                         "lambda": self.rela.switch.weight(self.current_epoch)})
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
    env = {**os.environ, "RELA_TEST_LOG": str(logs), "OMP_NUM_THREADS": "1"}
    # its own session: on a timeout the whole group goes, rank 1 (started by Lightning) included
    proc = subprocess.Popen([sys.executable, str(driver), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=base, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
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


def test_switch_decision_identical_on_all_ranks(ddp_run):
    out, ranks = ddp_run
    lambdas = [[s["lambda"] for s in r["steps"]] for r in ranks]
    assert lambdas[0] == lambdas[1]
    assert 1.0 in lambdas[0] and 0.0 in lambdas[0]  # switched mid-run, at the same step on both ranks
    switch_step = json.loads((out / "metrics.json").read_text())["switch_step"]
    assert ranks[0]["switch_step"] == ranks[1]["switch_step"] == switch_step
    assert 0 < switch_step < EPOCHS * STEPS_PER_EPOCH


def test_checkpoints_written_once_by_rank_zero(ddp_run):
    out, ranks = ddp_run
    assert ranks[1]["saves"] == []
    assert ranks[0]["saves"] and {Path(p).name for p in ranks[0]["saves"]} == {"last.ckpt"}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]
