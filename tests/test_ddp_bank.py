"""Bank extraction under Lightning DDP: every rank extracts a disjoint share of the chunks.

``rela train`` runs in subprocesses through a small driver that makes the bank's chunks small
(64 rows, so the 512-image bank has 8) and records, in every process, which chunks it wrote
and whether the process group existed by then. Two layouts: ``--devices 2`` (Lightning's
launcher starts rank 1) and two "nodes" of one device each, started from outside with the
environment a multi-node launcher sets (NODE_RANK, LOCAL_RANK, MASTER_ADDR/PORT, WORLD_SIZE).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import free_port, run_processes

from rela.bank import BankWriter, load_or_extract
from rela.data import load_dataset
from rela.priors import build_prior

DRIVER = """
import atexit, json, os, sys
from pathlib import Path

import torch.distributed as dist

from rela import bank
from rela.cli import main

log = {"pid": os.getpid(), "chunks": [], "rank": None, "world_size": None}
init, write_chunk = bank.BankWriter.__init__, bank.BankWriter.write_chunk


def small_chunks(self, *args, **kwargs):
    init(self, *args, **{**kwargs, "chunk_rows": 64})


def recording_write(self, i, values, seconds=0.0):
    log.update(rank=dist.get_rank(), world_size=dist.get_world_size())  # fails without a process group
    log["chunks"].append(i)
    return write_chunk(self, i, values, seconds)


bank.BankWriter.__init__, bank.BankWriter.write_chunk = small_chunks, recording_write
atexit.register(lambda: Path(os.environ["RELA_TEST_LOG"], f"{os.getpid()}.json").write_text(json.dumps(log)))
sys.exit(main(sys.argv[1:]))
"""

N, CHUNK_ROWS = 512, 64
ARGS = ["train", "--dataset", f"synthetic:{N}", "--backbone", "convnet", "--method", "byol", "--prior", "random",
        "--batch-size", "16", "--epochs", "1", "--max-steps", "1", "--probe-every", "0", "--no-progress",
        "--accelerator", "cpu"]


def _run(base: Path, layout: str) -> list[dict]:
    driver, logs = base / "driver.py", base / "logs"
    driver.write_text(DRIVER)
    logs.mkdir()
    args = [*ARGS, "--out", str(base / "run"), "--cache-dir", str(base / "cache")]
    env = {**os.environ, "RELA_TEST_LOG": str(logs), "OMP_NUM_THREADS": "1"}
    if layout == "devices":
        envs = [env]
        args += ["--devices", "2"]
    else:  # one process per "node", started from outside as a multi-node launcher would
        port = str(free_port())
        envs = [{**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "NODE_RANK": str(node),
                 "LOCAL_RANK": "0"} for node in (0, 1)]
        args += ["--devices", "1", "--num-nodes", "2"]
    run_processes([[str(driver), *args]] * len(envs), envs, base)
    return sorted((json.loads(f.read_text()) for f in logs.iterdir()), key=lambda r: r["rank"])


@pytest.mark.parametrize("layout", ["devices", "nodes"])
def test_each_rank_extracts_its_share_and_the_bank_equals_one_process(tmp_path, layout):
    ranks = _run(tmp_path, layout)
    writer = BankWriter(tmp_path / "b.npy", "k" * 64, N, chunk_rows=CHUNK_ROWS)
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert [sorted(r["chunks"]) for r in ranks] == [writer.owned(0, 2), writer.owned(1, 2)]  # disjoint, complete
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    bank_file = Path(metrics["bank_file"])
    # the same bank extracted by one process, chunk by chunk like the ranks
    data = load_dataset(f"synthetic:{N}")
    prior = build_prior("random", learner_arch="convnet", channels=data.channels, image_size=data.image_size,
                        mean=data.mean, std=data.std, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran (OMP_NUM_THREADS=1); restored, or later tests' runs change
    try:
        _, single = load_or_extract(prior, data, cache_dir=tmp_path / "single", progress=False, chunk_rows=CHUNK_ROWS)
    finally:
        torch.set_num_threads(threads)
    assert single["bank_key"] == metrics["bank_key"]
    assert bank_file.read_bytes() == Path(single["bank_file"]).read_bytes()
    assert sorted(p.name for p in bank_file.parent.iterdir()) == sorted(
        [bank_file.name, f"{bank_file.name}.json", f"{bank_file.name}.lock"])  # no chunk folder, no temp files
