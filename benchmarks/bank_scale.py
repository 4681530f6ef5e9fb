"""A bank at ImageNet scale: 1,281,167 x 2048 features (float16, ~5.2 GB) written, loaded, sampled.

Run from the repository root (it needs ~2.2x the bank's size of free disk, checked first)::

    nice -n 19 .venv/bin/python benchmarks/bank_scale.py                 # ImageNet-1k train size
    nice -n 19 .venv/bin/python benchmarks/bank_scale.py --rows 100000   # a quick smoke run

Random features go through :class:`rela.bank.BankWriter` chunk by chunk, exactly as an
extraction writes them (atomic chunk files with checksums), and are assembled into one
``.npy`` file (checksum verified once). Then:

* **load**: :func:`rela.bank.open_bank` (memory map + metadata, header and size checks),
  repeated; it must not depend on the bank's size. The full sha256 check (``verify=True``)
  is timed once as well, to show what the cheap load avoids;
* **gather**: random batches of 256 rows through the torch tensor ``load_or_extract`` returns
  (a view of the memory map); time and resident memory (``/proc/self/status``: RssFile = mapped
  file pages, RssAnon = the batch's own copy) before and after. *Cold*: the bank's pages are
  first dropped from the page cache (``posix_fadvise(DONTNEED)``, for this file only), so each
  row is read from disk; *warm*: the same batch again.

The bank is written to a temporary folder (``--dir``, default /tmp) and deleted afterwards.
Results: ``bank_scale.json`` under ``--results``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import add_output_args, environment
from rela.bank import BankWriter, open_bank
from rela.io import save_json

PAGE = os.sysconf("SC_PAGE_SIZE")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_281_167, help="images in the bank (ImageNet-1k train: 1,281,167)")
    p.add_argument("--dim", type=int, default=2048, help="feature width (ResNet-50: 2048)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--chunk-rows", type=int, default=16384)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default="/tmp", help="where the temporary bank folder is made")
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p)
    return p.parse_args()


def rss_mb() -> dict:
    """Resident memory now, split into mapped-file pages and anonymous memory (MB)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_bank(args, path: Path, key: str) -> tuple[BankWriter, dict]:
    writer = BankWriter(path, key, args.rows, dtype=args.dtype, chunk_rows=args.chunk_rows,
                        about={"prior": "random-features", "dataset": f"simulated:{args.rows}x{args.dim}"})
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    for i in range(writer.num_chunks):
        a, b = writer.rows_of(i)
        writer.write_chunk(i, rng.standard_normal((b - a, args.dim), dtype=np.float32))
        if i % 10 == 0:
            print(f"  chunk {i + 1}/{writer.num_chunks}", flush=True)
    chunks_seconds = time.perf_counter() - start
    start = time.perf_counter()
    meta = writer.assemble()
    return writer, {"chunks": writer.num_chunks, "write_chunks_seconds": chunks_seconds,
                    "assemble_and_verify_seconds": time.perf_counter() - start,
                    "extract_seconds_recorded": meta["extract_seconds"]}


def measure_gathers(args, feats: torch.Tensor, path: Path) -> dict:
    rng = np.random.default_rng(args.seed + 1)
    row_bytes = feats.shape[1] * feats.element_size()
    # each row spans at most ceil(row_bytes / PAGE) + 1 pages (it need not start on a page boundary)
    touched_bound_mb = args.batch * (math.ceil(row_bytes / PAGE) + 1) * PAGE / 2**20
    runs = []
    for _ in range(args.repeats):
        index = torch.from_numpy(rng.choice(len(feats), args.batch, replace=False))
        drop_from_page_cache(path)
        row = {}
        for state in ("cold", "warm"):
            before = rss_mb()
            start = time.perf_counter()
            batch = feats[index].float()
            seconds = time.perf_counter() - start
            after = rss_mb()
            row[state] = {"seconds": seconds, "rss_delta_mb": after["VmRSS"] - before["VmRSS"],
                          "rss_file_delta_mb": after["RssFile"] - before["RssFile"],
                          "rss_anon_delta_mb": after["RssAnon"] - before["RssAnon"]}
            assert batch.shape == (args.batch, feats.shape[1]) and torch.isfinite(batch).all()
            del batch
        runs.append(row)

    def summary(state: str) -> dict:
        keys = runs[0][state]
        return {k: {"median": statistics.median(r[state][k] for r in runs),
                    "max": max(r[state][k] for r in runs)} for k in keys}

    return {"batch": args.batch, "repeats": args.repeats, "batch_mb": args.batch * row_bytes / 2**20,
            "touched_pages_bound_mb": touched_bound_mb, "cold": summary("cold"), "warm": summary("warm"),
            "runs": runs}


def measure_loads(args, path: Path, key: str) -> dict:
    """open_bank repeated on a file dropped from the page cache: seconds and resident memory."""
    drop_from_page_cache(path)
    before = rss_mb()
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        open_bank(path, key)
        seconds.append(time.perf_counter() - start)
    after = rss_mb()
    print(f"load: {', '.join(f'{s * 1e3:.2f} ms' for s in seconds)}", flush=True)
    return {"load_seconds": seconds, "load_seconds_median": statistics.median(seconds),
            "load_rss_delta_mb": after["VmRSS"] - before["VmRSS"], "rss_before_load": before, "rss_after_load": after}


def measure(args, workdir: Path, free: int) -> dict:
    """Write, load, gather and fully verify one bank in ``workdir``."""
    key, path = "simulated-bank-" + "0" * 49, workdir / "bank.npy"
    print(f"writing {args.rows} x {args.dim} {args.dtype} to {workdir}", flush=True)
    rss_start = rss_mb()
    start = time.perf_counter()
    _, write = write_bank(args, path, key)
    write["total_seconds"] = time.perf_counter() - start
    loads = measure_loads(args, path, key)
    array, _ = open_bank(path, key)
    gather = measure_gathers(args, torch.from_numpy(array), path)  # what load_or_extract returns: a view of the map
    print(f"gather {args.batch} rows: cold {gather['cold']['seconds']['median'] * 1e3:.1f} ms, "
          f"warm {gather['warm']['seconds']['median'] * 1e3:.2f} ms; RSS +{gather['cold']['rss_delta_mb']['median']:.1f} MB "
          f"(bound {gather['touched_pages_bound_mb']:.1f} MB)", flush=True)
    del array
    start = time.perf_counter()
    open_bank(path, key, verify=True)
    file_bytes = path.stat().st_size
    return {
        "rows": args.rows, "dim": args.dim, "dtype": args.dtype, "chunk_rows": args.chunk_rows,
        "file_bytes": file_bytes, "file_gb": file_bytes / 1e9, "data_bytes": args.rows * args.dim * np.dtype(args.dtype).itemsize,
        "write": write, **{k: loads[k] for k in ("load_seconds", "load_seconds_median", "load_rss_delta_mb")},
        "full_checksum_verify_seconds": time.perf_counter() - start, "gather": gather,
        "rss_mb": {"start": rss_start, "before_load": loads["rss_before_load"], "after_load": loads["rss_after_load"]},
        "meta": {"command": "nice -n 19 .venv/bin/python " + " ".join(sys.argv), "niced": True,
                 "note": "ran at nice 19 next to other CPU jobs on a shared 2-core machine: times are upper "
                         "bounds; the page cache of the bank file was dropped before the load and every cold "
                         "gather (posix_fadvise DONTNEED)",
                 **environment(), "numpy": np.__version__, "free_disk_gb_before": free / 1e9},
    }


def main() -> int:
    args = parse_args()
    need = int(2.2 * args.rows * args.dim * np.dtype(args.dtype).itemsize)  # chunks + assembled file, for a moment
    free = shutil.disk_usage(args.dir).free
    if free < need:
        print(f"not enough free disk in {args.dir}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed",
              file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="rela-bank-scale-", dir=args.dir))
    # a SIGTERM (timeout, scheduler) still runs the clean-up below: gigabytes of temporary bank
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = measure(args, workdir, free)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = args.results / "bank_scale.json"
    save_json(result, out)
    print(f"file {result['file_gb']:.2f} GB; write {result['write']['total_seconds']:.0f} s; load median "
          f"{result['load_seconds_median'] * 1e3:.2f} ms; full checksum {result['full_checksum_verify_seconds']:.1f} s; "
          f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
