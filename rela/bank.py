"""The representation bank (spec steps 1-2): raw prior features for every training image.

On disk a bank is a memory-mappable array plus a small metadata file next to it:

* ``NAME``       -- a ``.npy`` array, rows x dim, float16 by default (float32 on request:
  ``bank_dtype``), opened with a memory map, so loading costs the same for 60k or 1.28M rows
  and a batch only reads the rows it touches;
* ``NAME.json``  -- format, key, prior, dataset, rows, dim, dtype, the sha256 of the array
  bytes and ``extract_seconds`` (what extracting the bank cost; reported again on cache hits,
  because a hit is compute paid earlier, not free compute).

**Extraction is chunked and resumable.** Rows are computed in chunks of ``CHUNK_ROWS``; each
chunk goes atomically (a writer-unique temp file + rename) into ``NAME.chunks-<key>-<rows>/``
with its own checksum, so a killed extraction resumes at the missing chunks. When every chunk
exists, the lock holder assembles ``NAME`` (temp file + rename), re-reads it to verify the
checksum once, writes ``NAME.json`` -- the metadata file is the commit mark: a bank without it
is unfinished -- and removes the chunk folder.

**Concurrent processes share a cache.** Each bank has a lock, ``NAME.lock`` (``filelock``: an
``flock`` on Unix). An extraction runs entirely under it, so of several runs started at once
with the same ``--cache-dir`` one extracts and the others wait, then find the bank finished; no
process ever writes into a chunk folder another is removing. Inside a process group of W > 1
(DDP: ``rela train --devices N``, torchrun, SLURM) the ranks share the work instead: rank 0
takes the lock for the whole group, every rank computes its disjoint share of the chunks
(chunk ``i`` belongs to rank ``i % W``), all meet at a barrier, rank 0 assembles, all meet
again; multi-node runs need ``--cache-dir`` on a file system every node sees.
*A lock left by a killed process:* the lock is the kernel's ``flock`` on the open file, not the
file's existence, so it ends with its process (killed, crashed, out of memory); the file stays
(deleting lock files races with their users) and the next run takes it at once, resumes at the
chunks already there and clears the dead writer's temp files. *Network file systems:* Linux
NFS clients map ``flock`` to NFS byte-range locks, which hold across machines when the mount
has locking (not ``nolock``) and the server's lock manager runs; a file system without ``flock``
makes filelock fall back to a lock whose existence is the lock, which a killed process leaves
behind: delete ``NAME.lock`` by hand once no run is extracting that bank.

**Loading verifies cheaply.** :func:`open_bank` checks the metadata (format, key, rows, dim,
dtype) and that the file's size and ``.npy`` header match it; that catches truncated files,
banks of another prior or dataset and foreign files without reading the data. The full
sha256 is verified once after assembly (its first use) and on request (``verify=True``):
hashing a 5 GB ImageNet-scale bank on every load would take seconds and read every page,
which is what memory-mapping avoids, and since every file is written by rename a partial
file cannot appear under the bank's name; the remaining risk, bit rot on disk, is what
``verify=True`` is for.

What the bank's features become, ReLA's targets, is :mod:`rela.targets`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from rela.data.datasets import ImageDataset
from rela.errors import RelaError
from rela.features import embed
from rela.hardware import HeapGuard, release_freed_memory, to_device
from rela.io import atomic_write, load_json, save_json
from rela.priors import Prior
from rela.registry import BANK_DTYPES

BANK_DTYPES.register("float16", help="the default, half the size")(partial(np.dtype, "float16"))
BANK_DTYPES.register("float32", help="for features beyond float16's range or precision")(partial(np.dtype, "float32"))

BANK_FORMAT = "rela-bank-v2"
CHUNK_ROWS = 16384
BLOCK_BYTES = 64 << 20  # float64 working block of the chunked passes (checksum here, rela.targets.transport)
log = logging.getLogger(__name__)


def bank_key(prior: Prior, dataset: ImageDataset, dtype: str = "float16") -> str:
    return hashlib.sha256(f"{BANK_FORMAT}|{dtype}|{prior.identity()}|{dataset.fingerprint()}".encode()).hexdigest()


def _check_dtype(dtype: str) -> np.dtype:
    return BANK_DTYPES.create(dtype)


def row_blocks(rows: int, dim: int, itemsize: int = 8):
    """(start, stop) row ranges of about BLOCK_BYTES each: how the chunked passes read a bank."""
    step = max(1, BLOCK_BYTES // max(dim * itemsize, 1))
    return ((a, min(a + step, rows)) for a in range(0, rows, step))


def _sha256_rows(array, dim: int) -> str:
    """sha256 of a C-ordered array's bytes, read block by block (a memory map stays unread elsewhere)."""
    h = hashlib.sha256()
    for a, b in row_blocks(len(array), dim, array.dtype.itemsize):
        h.update(np.ascontiguousarray(array[a:b]))
    return h.hexdigest()


class BankWriter:
    """Writes one bank chunk by chunk; any number of writers, in any processes, may share it."""

    def __init__(self, path: str | Path, key: str, rows: int, *, dtype: str = "float16",
                 chunk_rows: int = CHUNK_ROWS, about: dict | None = None):
        self.path, self.key, self.rows = Path(path), key, rows
        self.dtype = _check_dtype(dtype)
        self.chunk_rows = chunk_rows
        self.about = dict(about or {})  # prior and dataset names, for the metadata and messages
        self.num_chunks = math.ceil(rows / chunk_rows)
        self.meta_path = meta_path(self.path)
        # keyed by content and layout: chunks of another bank or another chunk size never mix
        self.chunk_dir = self.path.with_name(f"{self.path.name}.chunks-{key[:16]}-{chunk_rows}")
        self.lock_path = self.path.with_name(f"{self.path.name}.lock")
        self._lock = FileLock(self.lock_path)  # re-entrant within this writer

    @contextmanager
    def locked(self):
        """Hold the bank's lock (see the module notes); says so when another process holds it."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            log.warning("waiting for %s: another process is extracting this bank", self.lock_path)
            self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    def remove_stale_temp_files(self) -> None:
        """Delete what killed writers left half-written; only the lock holder may call this."""
        for folder, pattern in ((self.chunk_dir, ".*.tmp"), (self.path.parent, f".{self.path.name}.*.tmp")):
            for stale in folder.glob(pattern) if folder.is_dir() else ():
                stale.unlink(missing_ok=True)

    # --- chunks -----------------------------------------------------------------------
    def rows_of(self, i: int) -> tuple[int, int]:
        return i * self.chunk_rows, min((i + 1) * self.chunk_rows, self.rows)

    def chunk_path(self, i: int) -> Path:
        return self.chunk_dir / f"chunk-{i:06d}.npz"

    def owned(self, rank: int = 0, world_size: int = 1) -> list[int]:
        return list(range(rank % world_size, self.num_chunks, world_size))

    def missing(self) -> list[int]:
        return [i for i in range(self.num_chunks) if not self.chunk_path(i).is_file()]

    def complete(self) -> bool:
        return self.meta_path.is_file()

    def write_chunk(self, i: int, values, seconds: float = 0.0) -> None:
        """Store rows ``rows_of(i)`` (atomically, with their checksum and the seconds they cost)."""
        a, b = self.rows_of(i)
        values = np.asarray(values, dtype=np.float32)
        if values.shape[0] != b - a or values.ndim != 2:
            raise ValueError(f"chunk {i} must hold rows {a}..{b - 1}, got shape {values.shape}")
        if not np.isfinite(values).all():
            raise RelaError(f"the prior produced NaN or Inf features for images {a}..{b - 1}; "
                            f"bank {self.path} not written")
        with np.errstate(over="ignore"):  # overflow is checked right below, with a better message
            stored = np.ascontiguousarray(values.astype(self.dtype))
        if not np.isfinite(stored).all():
            raise RelaError(f"features of images {a}..{b - 1} exceed the {self.dtype} range "
                            f"(max |x| = {np.abs(values).max():.3g}); use bank_dtype float32")
        digest = hashlib.sha256(stored).hexdigest()
        atomic_write(self.chunk_path(i), lambda f: np.savez(f, values=stored, sha256=np.array(digest),
                                                             seconds=np.array(seconds)))

    def _read_chunk(self, i: int) -> tuple[np.ndarray, float]:
        path = self.chunk_path(i)
        try:
            with np.load(path) as z:
                values, digest, seconds = z["values"], str(z["sha256"]), float(z["seconds"])
        except Exception as e:  # noqa: BLE001 - truncated or foreign file
            raise RelaError(f"bank chunk {path} is unreadable ({type(e).__name__}); delete it to recompute") from None
        a, b = self.rows_of(i)
        if values.dtype != self.dtype or values.ndim != 2 or len(values) != b - a:
            raise RelaError(f"bank chunk {path} holds {values.dtype} {values.shape}, expected {b - a} rows "
                            f"of {self.dtype}; delete it to recompute")
        if hashlib.sha256(np.ascontiguousarray(values)).hexdigest() != digest:
            raise RelaError(f"bank chunk {path} fails its checksum; delete it to recompute")
        return values, seconds

    # --- the finished bank ------------------------------------------------------------
    def assemble(self) -> dict:
        """Join the chunks into the bank file and commit it; returns its metadata.

        Runs under the bank's lock; if another process committed the bank first, its
        metadata is returned and nothing is written.
        """
        with self.locked():
            if self.complete():
                return load_json(self.meta_path)
            missing = self.missing()
            if missing:
                raise RelaError(f"bank {self.path} cannot be assembled: {len(missing)} of {self.num_chunks} "
                                f"chunks missing (first: {missing[0]}); with several machines, --cache-dir "
                                "must be on a file system they all see")
            start = time.perf_counter()
            self.remove_stale_temp_files()
            dims, h, chunk_seconds = set(), hashlib.sha256(), 0.0

            def write(f) -> None:
                nonlocal chunk_seconds
                first, _ = self._read_chunk(0)
                dims.add(first.shape[1])
                header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                          "shape": (self.rows, first.shape[1])}
                np.lib.format.write_array_header_1_0(f, header)
                for i in range(self.num_chunks):
                    values, seconds = self._read_chunk(i)
                    dims.add(values.shape[1])
                    if len(dims) > 1:
                        raise RelaError(f"bank chunks of {self.path} differ in width {sorted(dims)}; "
                                        f"delete {self.chunk_dir} to recompute")
                    h.update(values)
                    f.write(values.tobytes())
                    chunk_seconds += seconds

            atomic_write(self.path, write)
            dim, digest = dims.pop(), h.hexdigest()
            # Verified once, here: a write that went wrong on its way to the disk shows now, not in training.
            if _sha256_rows(np.load(self.path, mmap_mode="r"), dim) != digest:
                self.path.unlink(missing_ok=True)
                raise RelaError(f"bank file {self.path} failed its checksum right after writing (disk error?)")
            meta = {"format": BANK_FORMAT, "key": self.key, **self.about, "rows": self.rows, "dim": dim,
                    "dtype": self.dtype.name, "sha256": digest, "chunk_rows": self.chunk_rows,
                    "extract_seconds": chunk_seconds + time.perf_counter() - start}
            save_json(meta, self.meta_path)
            shutil.rmtree(self.chunk_dir, ignore_errors=True)
            return meta


def meta_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def extract(prior: Prior, dataset: ImageDataset, *, batch_size: int = 512, device="cpu",
            progress: bool = True) -> torch.Tensor:
    """The prior's features of every image, in memory (float32); :func:`extract_chunks` fills a bank file."""
    prior.model.to(device)
    try:
        return embed(prior, dataset.images, batch_size=batch_size, device=device,
                     desc=f"bank: {prior.name}" if progress else None)
    finally:
        prior.model.cpu()


def extract_chunks(prior: Prior, dataset: ImageDataset, writer: BankWriter, *, rank: int = 0,
                   world_size: int = 1, batch_size: int = 512, device="cpu", progress: bool = True,
                   workers: int = 0) -> list[int]:
    """Compute the missing chunks of this rank's share (``writer.owned``); returns the ones it wrote.

    A streamed dataset (:class:`rela.data.stream.StreamSet`) is decoded by ``workers`` DataLoader
    processes while the prior runs here; nothing but the batches in flight is held.
    """
    todo = [i for i in writer.owned(rank, world_size) if not writer.chunk_path(i).is_file()]
    prior.model.to(device)
    try:
        chunks = (_memory_chunks(prior, dataset, writer, todo, batch_size, device) if dataset.images is not None
                  else _streamed_chunks(prior, dataset, writer, todo, batch_size, device, workers))
        with tqdm(total=len(todo), desc=f"bank: {prior.name}", disable=not progress, leave=False) as bar:
            for i, values, seconds in chunks:
                writer.write_chunk(i, values, seconds)
                release_freed_memory()  # resident memory stays that of one chunk, whatever the number of images
                bar.update()
    finally:
        prior.model.cpu()
    return todo


def _memory_chunks(prior, dataset, writer, todo, batch_size, device):
    for i in todo:
        start = time.perf_counter()
        a, b = writer.rows_of(i)
        values = embed(prior, dataset.images[a:b], batch_size=batch_size, device=device)
        yield i, values.numpy(), time.perf_counter() - start


def _streamed_chunks(prior, dataset, writer, todo, batch_size, device, workers):
    """(chunk, features, seconds) per chunk of ``todo``, the images decoded in DataLoader workers.

    With ``--skip-bad-images`` a file that does not decode gets its chunk's mean feature row (rows
    stay aligned with the dataset's indices; training leaves the file out too).
    """
    from rela.data.stream import decode_loader

    batches = [list(range(s, min(s + batch_size, b))) for i in todo
               for a, b in [writer.rows_of(i)] for s in range(a, b, batch_size)]
    loader = decode_loader(dataset, batches, workers, pin_memory=str(device).startswith("cuda"))
    parts, start, heap = [], time.perf_counter(), HeapGuard()
    for rows, batch in zip(batches, loader):
        dataset.bad(batch["bad"])  # a one-line error unless --skip-bad-images
        good = prior(to_device(batch["image"], device)).float().cpu() if len(batch["index"]) else None
        parts.append((batch["index"], good))
        heap.step()  # resident memory stays about one batch's, whatever the number of images
        chunk = rows[0] // writer.chunk_rows
        a, b = writer.rows_of(chunk)
        if rows[-1] + 1 == b:
            found = [(index, values) for index, values in parts if values is not None]
            if not found:
                raise RelaError(f"none of the images {a}..{b - 1} of {dataset.name} decodes; bank not written")
            index, values = torch.cat([i for i, _ in found]), torch.cat([v for _, v in found])
            out = values.mean(0, keepdim=True).repeat(b - a, 1)  # the rows of bad files
            out[index - a] = values
            yield chunk, out.numpy(), time.perf_counter() - start
            parts, start = [], time.perf_counter()


def open_bank(path: str | Path, key: str, dataset: ImageDataset | None = None, *,
              verify: bool = False) -> tuple[np.ndarray, dict]:
    """Memory-map a finished bank after checking it belongs to this prior and dataset.

    Cheap checks only (metadata, header, file size); ``verify=True`` also re-hashes the data.
    The array is mapped copy-on-write: writable for torch, while the file never changes.
    """
    path = Path(path)
    meta_file = meta_path(path)
    try:
        meta = load_json(meta_file)
    except FileNotFoundError:
        raise RelaError(f"bank file {path} has no metadata file {meta_file.name}: not a finished ReLA bank "
                        f"({BANK_FORMAT}); delete it or use another --bank path") from None
    except (ValueError, OSError) as e:
        raise RelaError(f"bank metadata {meta_file} is unreadable ({type(e).__name__}); delete it to rebuild") from None
    if not isinstance(meta, dict) or meta.get("format") != BANK_FORMAT:
        raise RelaError(f"bank file {path} is not a ReLA bank ({BANK_FORMAT})")
    expected = f"this prior and dataset {dataset.name}:{dataset.split}" if dataset is not None else "this key"
    if meta.get("key") != key:
        raise RelaError(
            f"bank file {path} was made for prior {meta.get('prior')!r} on {meta.get('dataset')!r}, "
            f"not for {expected} (key mismatch); delete it or use another --bank path")
    rows, dim, dtype = meta.get("rows"), meta.get("dim"), meta.get("dtype")
    if dataset is not None and rows != len(dataset):
        raise RelaError(f"bank file {path} has {rows} rows, expected {len(dataset)} (one per training image)")
    try:
        array = np.load(path, mmap_mode="c")
    except Exception as e:  # noqa: BLE001 - truncated, not a .npy file, ...
        raise RelaError(f"bank file {path} is truncated or unreadable ({type(e).__name__}: {e}); "
                        "delete it to rebuild") from None
    if array.shape != (rows, dim) or array.dtype.name != dtype:
        raise RelaError(f"bank file {path} holds {array.dtype} {array.shape}, but its metadata says "
                        f"{dtype} ({rows}, {dim}); delete it to rebuild")
    if path.stat().st_size != array.offset + array.nbytes:
        raise RelaError(f"bank file {path} has {path.stat().st_size} bytes, expected "
                        f"{array.offset + array.nbytes}; delete it to rebuild")
    if verify and _sha256_rows(array, dim) != meta.get("sha256"):
        raise RelaError(f"bank file {path} fails its sha256 checksum (corrupted on disk); delete it to rebuild")
    return array, meta


def load_or_extract(prior: Prior, dataset: ImageDataset, *, cache_dir: str | Path = ".cache/rela",
                    path: str | Path | None = None, device="cpu", progress: bool = True,
                    batch_size: int = 512, dtype: str = "float16", chunk_rows: int = CHUNK_ROWS,
                    verify: bool = False, workers: int = 0) -> tuple[torch.Tensor, dict]:
    """Raw prior features for every training image (memory-mapped), extracted unless cached.

    Inside a torch.distributed process group every rank must call this (it shards the
    extraction over the ranks; see the module notes). Returns the features (N x k, ``dtype``,
    backed by the bank file) and a small report. ``bank_seconds`` is what extracting the bank
    cost, also when this call found it cached; ``bank_load_seconds`` is this call's time.
    """
    _check_dtype(dtype)
    key = bank_key(prior, dataset, dtype)
    path = Path(path) if path else Path(cache_dir) / f"bank-{key[:24]}.npy"
    start = time.perf_counter()
    writer = BankWriter(path, key, len(dataset), dtype=dtype, chunk_rows=chunk_rows,
                        about={"prior": prior.name, "dataset": f"{dataset.name}:{dataset.split}"})
    if not writer.complete() and path.exists() and not writer.chunk_dir.is_dir():
        # Not ours to overwrite: an unrelated file, or a bank of an older format (checked before
        # the lock file is made; a finished bank always has its metadata file before its chunks go).
        open_bank(path, key, dataset)
    hit = writer.complete() or _extract(prior, dataset, writer, batch_size=batch_size, device=device,
                                        progress=progress, workers=workers)
    array, meta = open_bank(path, key, dataset, verify=verify)
    feats = torch.from_numpy(array)
    return feats, {"bank_file": str(path), "bank_key": key, "bank_cache_hit": hit,
                   "bank_seconds": float(meta["extract_seconds"]), "bank_dtype": dtype,
                   "bank_load_seconds": time.perf_counter() - start, "bank_shape": list(feats.shape)}


def _claim(writer: BankWriter) -> bool:
    """Under the lock: True if the bank is done by now, else get the folder ready for this extraction."""
    if writer.complete():
        return True
    writer.remove_stale_temp_files()
    return False


def _extract(prior: Prior, dataset: ImageDataset, writer: BankWriter, **options) -> bool:
    """Extract and assemble the bank, alone or as one rank of a process group; True if another process did."""
    rank, world_size = _process_group()
    if world_size == 1:
        with writer.locked():
            if _claim(writer):
                return True
            extract_chunks(prior, dataset, writer, **options)
            writer.assemble()
        return False
    # Rank 0 decides and assembles, holding the lock for the whole group; its verdict (done, go,
    # or an error) is broadcast, so a failure on rank 0 stops every rank instead of leaving them at a barrier.
    with writer.locked() if rank == 0 else nullcontext():
        verdict = [_run_on_rank_zero(rank, lambda: _claim(writer))]
        dist.broadcast_object_list(verdict, src=0)
        done = _raise_failure(verdict[0])
        if not done:
            extract_chunks(prior, dataset, writer, rank=rank, world_size=world_size, **options)
            dist.barrier()
            verdict = [_run_on_rank_zero(rank, writer.assemble)]
            dist.broadcast_object_list(verdict, src=0)
            _raise_failure(verdict[0])
    return done


def _run_on_rank_zero(rank: int, step):
    if rank != 0:
        return None
    try:
        return step()
    except RelaError as e:
        return e


def _raise_failure(verdict):
    if isinstance(verdict, RelaError):
        raise RelaError(str(verdict))
    return verdict
