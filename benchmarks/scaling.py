"""Growth: wall-clock and peak memory of bank extraction and of one epoch vs. dataset size.

Run from the repository root (a few CPU minutes)::

    nice -n 19 .venv/bin/python benchmarks/scaling.py                     # 5k ... 60k Fashion-MNIST images
    nice -n 19 .venv/bin/python benchmarks/scaling.py --sizes 2000 4000   # a smoke run

For each size N (``--train-limit N``) two fresh subprocesses run, so each peak RSS belongs to
one measurement alone (``os.wait4`` returns the child's own resource usage):

* ``extract``: :func:`rela.train.prepare` -- data, learner, random convnet prior, bank
  extraction into an empty cache, transport -- timing the extraction itself (``bank_seconds``);
* ``epoch``: :func:`rela.train.train` for one epoch of ReLA + BYOL (convnet, batch 256, the
  default adaptive switch, which does not fire within one epoch at these sizes), reusing the
  bank; timing the optimizer steps (``train_seconds``) and the whole process.

The exponent b of ``seconds = a * N^b`` is fitted by least squares on log-log axes (1.0:
linear growth). Results: ``scaling.{json,md}`` under ``--results``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import BENCH_SWITCH, add_output_args, environment, table_head, write_report
from rela.config import TrainConfig
from rela.io import save_json


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000, 40000, 60000])
    p.add_argument("--batch-size", type=int, default=256)
    add_output_args(p)
    p.add_argument("--child", nargs=3, metavar=("PHASE", "SIZE", "WORKDIR"), help=argparse.SUPPRESS)
    return p.parse_args()


def config(size: int, batch_size: int, workdir: Path) -> TrainConfig:
    return TrainConfig(dataset="fashion-mnist", train_limit=size, backbone="convnet", method="byol",
                       prior="random", switch=BENCH_SWITCH, epochs=1, batch_size=batch_size, probe_every=0, progress=False,
                       checkpoint_every=0, accelerator="cpu", out=str(workdir / "run"),
                       cache_dir=str(workdir / "cache"))


def child(phase: str, size: int, workdir: Path, batch_size: int) -> dict:
    """One measurement; prints its result as the last line of stdout."""
    from rela.build import prepare
    from rela.train import train

    cfg = config(size, batch_size, workdir)
    start = time.perf_counter()
    if phase == "extract":
        info = prepare(cfg).bank_info
        assert info["bank_cache_hit"] is False
        return {"bank_seconds": info["bank_seconds"], "process_seconds": time.perf_counter() - start,
                "bank_bytes": Path(info["bank_file"]).stat().st_size, "bank_shape": info["bank_shape"]}
    metrics = train(cfg)
    assert metrics["bank_cache_hit"] is True
    return {"train_seconds": metrics["train_seconds"], "steps": metrics["steps"],
            "images_seen": metrics["images_seen"], "switch_step": metrics["switch_step"],
            "process_seconds": time.perf_counter() - start}


def run_child(phase: str, size: int, workdir: Path, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--batch-size", str(batch_size), "--child", phase, str(size), str(workdir)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    # ru_maxrss is in kilobytes on Linux
    return {**result, "peak_rss_mb": usage.ru_maxrss / 1024, "wall_seconds": time.perf_counter() - start,
            "cpu_seconds": usage.ru_utime + usage.ru_stime}


def exponent(sizes: list[int], seconds: list[float]) -> float:
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def report(rows: list[dict], fits: dict, args) -> None:
    meta = {"command": "nice -n 19 .venv/bin/python " + " ".join(sys.argv), "niced": True,
            "note": "ran at nice 19 next to other CPU jobs on a shared 2-core machine: timings are upper bounds "
                    "(the lead may rerun it on a quiet machine); peak RSS is per subprocess (os.wait4)",
            "batch_size": args.batch_size, **environment()}
    save_json({"rows": rows, "fitted_exponent": fits, "meta": meta}, args.results / "scaling.json")
    lines = [f"# Scaling with dataset size (Fashion-MNIST, convnet, ReLA + BYOL, batch {args.batch_size})", "",
             f"Command: `{meta['command']}`. {meta['note']}.", "",
             *table_head("images", "bank extraction s", "extraction peak RSS MB", "epoch train s", "epoch process s",
                         "epoch peak RSS MB")]
    for r in rows:
        e, t = r["extract"], r["epoch"]
        lines.append(f"| {r['size']} | {e['bank_seconds']:.1f} | {e['peak_rss_mb']:.0f} | {t['train_seconds']:.1f} "
                     f"| {t['process_seconds']:.1f} | {t['peak_rss_mb']:.0f} |")
    lines += ["", "Fitted exponent b of seconds = a * N^b: " + ", ".join(f"{k} {v:.2f}" for k, v in fits.items())]
    write_report(lines, args.results / "scaling.md")


def main() -> int:
    args = parse_args()
    if args.child:
        phase, size, workdir = args.child
        print(json.dumps(child(phase, int(size), Path(workdir), args.batch_size)))
        return 0
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="rela-scaling-") as tmp:
            extract = run_child("extract", size, Path(tmp), args.batch_size)
            epoch = run_child("epoch", size, Path(tmp), args.batch_size)
        rows.append({"size": size, "extract": extract, "epoch": epoch})
        print(f"N={size:6d}: bank {extract['bank_seconds']:.1f} s (peak RSS {extract['peak_rss_mb']:.0f} MB), "
              f"epoch {epoch['train_seconds']:.1f} s train / {epoch['process_seconds']:.1f} s process "
              f"(peak RSS {epoch['peak_rss_mb']:.0f} MB)", flush=True)
    sizes = [r["size"] for r in rows]
    fits = {"bank_seconds": exponent(sizes, [r["extract"]["bank_seconds"] for r in rows]),
            "epoch_train_seconds": exponent(sizes, [r["epoch"]["train_seconds"] for r in rows]),
            "epoch_process_seconds": exponent(sizes, [r["epoch"]["process_seconds"] for r in rows])}
    report(rows, fits, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
