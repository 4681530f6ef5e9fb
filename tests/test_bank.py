"""The representation bank (spec step 1): the on-disk cache of a prior's features."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch

from rela.bank import BANK_FORMAT, BankWriter, bank_key, extract_chunks, load_or_extract, open_bank
from rela.data import load_dataset
from rela.errors import RelaError
from rela.features import embed as embed_images
from rela.priors import build_prior

# --- the cache: memory-mapped, chunked, resumable, shareable -----------------------------


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic:64")


def _prior(data, seed=0, spec="random:convnet"):
    return build_prior(spec, learner_arch="convnet", channels=data.channels, image_size=data.image_size,
                       mean=data.mean, std=data.std, seed=seed)


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_cache_miss_then_hit_memory_maps_the_same_features(tmp_path, data):
    prior = _prior(data)
    feats1, info1 = load_or_extract(prior, data, cache_dir=tmp_path, progress=False, chunk_rows=16)
    assert info1["bank_cache_hit"] is False
    name = f"bank-{info1['bank_key'][:24]}.npy"
    # the array, its metadata and the lock file; the chunks are gone once the bank is assembled
    assert _names(tmp_path) == [name, f"{name}.json", f"{name}.lock"]
    assert info1["bank_file"] == str(tmp_path / name)
    assert feats1.shape == (len(data), 128) and info1["bank_shape"] == [len(data), 128]
    assert feats1.dtype == torch.float16 and info1["bank_dtype"] == "float16"
    # what was extracted is what the prior computes, rounded to float16
    torch.testing.assert_close(feats1, prior(data.images).half())
    meta = json.loads((tmp_path / f"{name}.json").read_text())
    assert meta["format"] == BANK_FORMAT and meta["key"] == info1["bank_key"]
    assert (meta["rows"], meta["dim"], meta["dtype"]) == (len(data), 128, "float16")
    assert meta["dataset"] == "synthetic:64:train" and meta["prior"] == prior.name
    assert meta["sha256"] == hashlib.sha256(np.load(tmp_path / name).tobytes()).hexdigest()
    assert meta["extract_seconds"] > 0 and info1["bank_seconds"] == meta["extract_seconds"]

    mtime = (tmp_path / name).stat().st_mtime_ns
    feats2, info2 = load_or_extract(_prior(data), data, cache_dir=tmp_path, progress=False, verify=True)
    assert info2["bank_cache_hit"] is True and info2["bank_key"] == info1["bank_key"]
    assert info2["bank_seconds"] == info1["bank_seconds"]  # the cost paid earlier, reported again
    assert torch.equal(feats1, feats2)
    assert (tmp_path / name).stat().st_mtime_ns == mtime  # not rewritten
    # a memory map of the file, not a copy of it
    assert isinstance(open_bank(tmp_path / name, info1["bank_key"], data)[0], np.memmap)


def test_float32_bank_on_request(tmp_path, data):
    prior = _prior(data)
    feats, info = load_or_extract(prior, data, cache_dir=tmp_path, progress=False, dtype="float32")
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, prior(data.images))
    _, half = load_or_extract(prior, data, cache_dir=tmp_path, progress=False)
    assert half["bank_key"] != info["bank_key"] and half["bank_file"] != info["bank_file"]
    assert Path(info["bank_file"]).stat().st_size > 1.9 * Path(half["bank_file"]).stat().st_size
    with pytest.raises(RelaError, match="bank dtype"):
        load_or_extract(prior, data, cache_dir=tmp_path, progress=False, dtype="int8")


def test_changed_prior_or_dataset_misses(tmp_path, data):
    _, info1 = load_or_extract(_prior(data, seed=0), data, cache_dir=tmp_path, progress=False)
    _, info2 = load_or_extract(_prior(data, seed=1), data, cache_dir=tmp_path, progress=False)
    assert info2["bank_cache_hit"] is False
    assert info2["bank_key"] != info1["bank_key"] and info2["bank_file"] != info1["bank_file"]
    assert len(list(tmp_path.glob("*.npy"))) == 2
    other = load_dataset("synthetic:80")
    assert bank_key(_prior(data), other) != bank_key(_prior(data), data)
    assert bank_key(_prior(data), data) == bank_key(_prior(data), data)
    # a prior differing only in preprocessing (another normalisation) is another prior as well
    changed = _prior(data)
    changed.std = (0.5, 0.5, 0.5)
    assert bank_key(changed, data) != bank_key(_prior(data), data)


def test_bank_of_another_dataset_via_explicit_path_is_rejected(tmp_path, data):
    path = tmp_path / "my-bank.npy"
    other = load_dataset("synthetic:80")
    load_or_extract(_prior(other), other, path=path, progress=False)
    assert path.is_file()
    with pytest.raises(RelaError, match="my-bank.npy") as e:
        load_or_extract(_prior(data), data, path=path, progress=False)
    assert "synthetic:80:train" in str(e.value) and "synthetic:64:train" in str(e.value)


@pytest.fixture
def bank(tmp_path, data):
    prior = _prior(data)
    _, info = load_or_extract(prior, data, cache_dir=tmp_path, progress=False)
    return Path(info["bank_file"]), info["bank_key"], prior


def test_truncated_bank_file_is_rejected(bank, data):
    path, key, prior = bank
    raw = path.read_bytes()
    for cut in (len(raw) - 1, len(raw) // 2, 20, 0):  # into the data, the header, nothing left
        path.write_bytes(raw[:cut])
        with pytest.raises(RelaError, match=path.name):
            load_or_extract(prior, data, cache_dir=path.parent, progress=False)
    path.write_bytes(raw + b"\0" * 64)  # a longer file is not this bank either
    with pytest.raises(RelaError, match="bytes, expected"):
        open_bank(path, key, data)
    path.write_bytes(raw)
    open_bank(path, key, data)


def test_bank_with_wrong_contents_is_rejected(bank, data):
    path, key, prior = bank
    meta_file = path.with_name(path.name + ".json")
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(RelaError, match="not a ReLA bank"):
        open_bank(path, key, data)
    meta_file.write_text(json.dumps({**meta, "rows": 63}))
    with pytest.raises(RelaError, match="63 rows, expected 64"):
        open_bank(path, key, data)
    meta_file.write_text(json.dumps({**meta, "dim": 64}))
    with pytest.raises(RelaError, match="metadata says"):
        open_bank(path, key, data)
    meta_file.write_text("{not json")
    with pytest.raises(RelaError, match="unreadable"):
        open_bank(path, key, data)


def test_file_without_metadata_is_not_overwritten(tmp_path, data):
    """A file at an explicit --bank path that is no (finished) bank: an error, and the file stays."""
    path = tmp_path / "old-bank.pt"
    torch.save({"features": torch.zeros(len(data), 4)}, path)
    before = path.read_bytes()
    with pytest.raises(RelaError, match="no metadata file"):
        load_or_extract(_prior(data), data, path=path, progress=False)
    assert path.read_bytes() == before and _names(tmp_path) == ["old-bank.pt"]


def test_full_checksum_on_request(bank, data):
    path, key, _ = bank
    array = np.load(path)
    with open(path, "r+b") as f:  # flip one value in place: same size, valid header
        f.seek(path.stat().st_size - 2)
        f.write(np.array([array[-1, -1] + 1], dtype=np.float16).tobytes())
    open_bank(path, key, data)  # the cheap checks cannot see it ...
    with pytest.raises(RelaError, match="checksum"):
        open_bank(path, key, data, verify=True)  # ... the full one does


def _writer(tmp_path, rows=40, dim=3, chunk_rows=16, dtype="float16"):
    return BankWriter(tmp_path / "bank.npy", "k" * 64, rows, dtype=dtype, chunk_rows=chunk_rows,
                      about={"prior": "test", "dataset": "test"})


def test_writer_refuses_non_finite_and_out_of_range_features(tmp_path):
    writer = _writer(tmp_path)
    bad = np.ones((16, 3), dtype=np.float32)
    bad[2, 1] = np.nan
    with pytest.raises(RelaError, match="NaN or Inf"):
        writer.write_chunk(0, bad)
    with pytest.raises(RelaError, match="float32"):
        writer.write_chunk(0, np.full((16, 3), 1e6, dtype=np.float32))  # beyond float16's 65504
    _writer(tmp_path, dtype="float32").write_chunk(0, np.full((16, 3), 1e6, dtype=np.float32))


def test_corrupt_chunk_is_not_assembled(tmp_path):
    writer = _writer(tmp_path)
    for i in range(writer.num_chunks):
        a, b = writer.rows_of(i)
        writer.write_chunk(i, np.arange(a * 3, b * 3, dtype=np.float32).reshape(-1, 3))
    with np.load(writer.chunk_path(1)) as z:
        parts = dict(z)
    parts["values"][0, 0] += 1
    np.savez(writer.chunk_path(1), **parts)
    with pytest.raises(RelaError, match="chunk-000001.npz fails its checksum"):
        writer.assemble()
    assert not writer.path.exists() and not writer.complete()


class _Interrupted(Exception):
    pass


def _counting_embed(monkeypatch, fail_after=None):
    """Record the first row of every chunk the bank computes; optionally die like a killed run."""
    calls = []
    def embed(model, images, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise _Interrupted
        calls.append(images)
        return embed_images(model, images, **kwargs)

    monkeypatch.setattr("rela.bank.embed", embed)
    return calls


def test_killed_extraction_resumes_at_the_missing_chunks(tmp_path, data, monkeypatch):
    prior = _prior(data)
    calls = _counting_embed(monkeypatch, fail_after=2)
    with pytest.raises(_Interrupted):
        load_or_extract(prior, data, cache_dir=tmp_path, progress=False, chunk_rows=10)
    key = bank_key(prior, data)
    chunk_dir = tmp_path / f"bank-{key[:24]}.npy.chunks-{key[:16]}-10"
    assert _names(chunk_dir) == ["chunk-000000.npz", "chunk-000001.npz"]
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob("*.json"))

    calls = _counting_embed(monkeypatch)
    feats, info = load_or_extract(prior, data, cache_dir=tmp_path, progress=False, chunk_rows=10)
    assert len(calls) == 5  # 7 chunks of 10 rows (the last holds 4), 2 already done
    assert not chunk_dir.exists()
    monkeypatch.undo()
    fresh, _ = load_or_extract(prior, data, cache_dir=tmp_path / "fresh", progress=False)
    assert torch.equal(feats, fresh)
    open_bank(info["bank_file"], key, data, verify=True)


def test_crash_while_writing_leaves_no_partial_files(tmp_path, data, monkeypatch):
    prior = _prior(data)

    def crashing_savez(f, **arrays):
        f.write(b"half a chunk")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("rela.bank.np.savez", crashing_savez)
    with pytest.raises((OSError, RelaError), match="simulated"):
        load_or_extract(prior, data, cache_dir=tmp_path, progress=False)
    monkeypatch.undo()
    assert all(not p.is_file() or p.name.endswith(".lock") for p in tmp_path.rglob("*"))

    # assembly dies half-way: no bank file, no temp file; the chunks survive and the rerun finishes
    real_read = BankWriter._read_chunk

    def dying_read(self, i):
        if i == 3:
            raise OSError("disk full (simulated)")
        return real_read(self, i)

    monkeypatch.setattr(BankWriter, "_read_chunk", dying_read)
    with pytest.raises((OSError, RelaError), match="simulated"):
        load_or_extract(prior, data, cache_dir=tmp_path, progress=False, chunk_rows=10)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [f"bank-{bank_key(prior, data)[:24]}.npy.lock"]
    calls = _counting_embed(monkeypatch)
    _, info = load_or_extract(prior, data, cache_dir=tmp_path, progress=False, chunk_rows=10)
    assert calls == [] and info["bank_cache_hit"] is False  # assembled from the chunks already there


def test_sharded_extraction_computes_only_the_missing_chunks_of_its_share(tmp_path, data, monkeypatch):
    prior = _prior(data)
    writer = BankWriter(tmp_path / "bank.npy", bank_key(prior, data), len(data), chunk_rows=10)
    assert writer.owned(1, 3) == [1, 4] and writer.owned(0, 3) == [0, 3, 6]
    calls = _counting_embed(monkeypatch)
    writer.write_chunk(3, np.zeros((10, 128), dtype=np.float32))  # done by an earlier, killed run
    assert extract_chunks(prior, data, writer, rank=0, world_size=3, progress=False) == [0, 6]
    starts = [int(torch.nonzero((data.images == c[:1]).flatten(1).all(1))[0]) for c in calls]
    assert starts == [0, 60]


def _extract_in_process(cache, rank, barrier, results):
    torch.set_num_threads(1)  # a forked child must not reuse the parent's intra-op thread pool
    data = load_dataset("synthetic:64")
    barrier.wait()  # start together, so the processes really overlap
    feats, info = load_or_extract(_prior(data), data, cache_dir=cache, progress=False, chunk_rows=4)
    results.put((rank, feats.clone().numpy(), info["bank_cache_hit"]))


def test_two_processes_fill_one_bank_at_once(tmp_path, data):
    ctx = mp.get_context("fork")  # spawn would import torch again in each child: seconds per process
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_extract_in_process, args=(tmp_path, r, barrier, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    prior = _prior(data)
    key = bank_key(prior, data)
    expected = prior(data.images).half().numpy()
    for _, feats, _ in out:
        np.testing.assert_array_equal(feats, expected)
    array, meta = open_bank(tmp_path / f"bank-{key[:24]}.npy", key, data, verify=True)
    np.testing.assert_array_equal(array, expected)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith((".npy", ".json", ".lock"))] == []
