"""A bank cache that concurrent processes share: three processes extract the same bank at once.

Each round starts three processes (forked, so they start within milliseconds of each other)
that call :func:`rela.bank.load_or_extract` on one cache folder for the same prior and data,
the situation of three ``rela train`` runs started together with the same ``--cache-dir``. The
bank has 8 chunks, so without the per-bank lock one process assembles and removes the chunk
folder while the others still write into it. Between rounds the finished bank is deleted, so
every round extracts again.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp

import torch

from rela.bank import load_or_extract
from rela.data import load_dataset
from rela.priors import build_prior

PROCESSES, ROUNDS, ROWS, CHUNK_ROWS = 3, 5, 2048, 256


def _prior(data):
    return build_prior("random", learner_arch="convnet", channels=data.channels, image_size=data.image_size,
                       mean=data.mean, std=data.std, seed=1)


def _extract(cache, barrier, results):
    torch.set_num_threads(1)  # a forked child must not reuse the parent's intra-op thread pool
    try:
        data = load_dataset(f"synthetic:{ROWS}")
        prior = _prior(data)
        barrier.wait()
        feats, info = load_or_extract(prior, data, cache_dir=cache, progress=False, chunk_rows=CHUNK_ROWS)
        results.put(("ok", hashlib.sha256(feats.numpy().tobytes()).hexdigest(), info["bank_file"]))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put(("failed", f"{type(e).__name__}: {e}", None))


def test_three_processes_share_one_cache_for_five_rounds(tmp_path):
    ctx = mp.get_context("fork")  # spawn would import torch again in each child: seconds per process
    outcomes, digests, debris = [], set(), []
    for _ in range(ROUNDS):
        barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
        procs = [ctx.Process(target=_extract, args=(tmp_path, barrier, results)) for _ in range(PROCESSES)]
        for p in procs:
            p.start()
        round_results = [results.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        outcomes += [(status, p.exitcode) for (status, *_), p in zip(round_results, procs)]
        digests |= {digest for status, digest, _ in round_results if status == "ok"}
        failures = [detail for status, detail, _ in round_results if status != "ok"]
        assert not failures, failures
        names = sorted(p.name for p in tmp_path.iterdir())
        bank = round_results[0][2].rsplit("/", 1)[1]
        debris += [n for n in names if n not in (bank, f"{bank}.json", f"{bank}.lock")]
        for suffix in ("", ".json"):  # the next round extracts again
            (tmp_path / f"{bank}{suffix}").unlink()
    assert outcomes == [("ok", 0)] * (PROCESSES * ROUNDS)
    assert debris == []  # no chunk folders, no temp files, after any round
    data = load_dataset(f"synthetic:{ROWS}")
    expected = _prior(data)(data.images).half().numpy()
    assert digests == {hashlib.sha256(expected.tobytes()).hexdigest()}  # every bank of every round identical
