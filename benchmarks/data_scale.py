"""Stream mode at growing N: memory, throughput and disk of bank extraction + 1 epoch at ratio 0.1.

Run from the repository root::

    nice -n 19 .venv/bin/python benchmarks/data_scale.py --sizes 20000 100000 300000 --workers 1
    nice -n 19 .venv/bin/python benchmarks/data_scale.py --sizes 2000 --workers 1      # a quick check

For each N an image folder of N real JPEG files is generated once (Fashion-MNIST images,
resized to 64 x 64 and tinted per file so that no two files are the same; quality 90) under
``--data-dir``. Then, each in its own process (``rela train`` through :func:`rela.train.train`),
in stream mode: a bank is extracted with a random convnet prior, and BYOL trains 1 epoch at
ratio 0.1 (adaptive switch, batch 256). Measured per N:

* **peak memory of the process tree** (the run and its DataLoader workers; /proc sampled every
  0.2 s): PSS, the proportional set size (a page shared by k processes counts 1/k in each, so a
  page a forked worker shares with the run counts once), the figure the targets use; beside it the
  sum of RSS, which counts such pages once per process. The bank is memory-mapped and the images
  are never all decoded, so PSS should not grow with N beyond the targets (N x 128 float32);
* **images/s** of the bank extraction (N / its seconds) and of training (images seen / train
  seconds);
* **data-wait fraction**: time the training loop spent waiting for the next batch, over the
  time of its steps (measured between Lightning's batch hooks);
* **disk bytes** of the image folder and of the bank.

On the smallest N the same epoch also runs in memory mode (``--data-mode memory``), for the
stream/memory images/s ratio. From the measured per-image costs a table projects ImageNet-1K
(1,281,167 images) on one and on four 8-GPU machines; its assumptions are printed beside it.
Results: ``data_scale.json`` and ``data_scale.md`` under ``--results``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from common import BENCH_SWITCH, REPO, ResultsFile, add_output_args, command, table_head, write_report

CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
IMAGENET = 1_281_167


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 300_000])
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of stream mode")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/rela-data-scale"),
                   help="where the generated image folders, runs and banks go (kept between calls)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST's folder (default: where rela finds it)")
    add_output_args(p)
    return p.parse_args(argv)


# --- data ---------------------------------------------------------------------------------

def fashion_mnist(root) -> tuple[np.ndarray, np.ndarray]:
    """All Fashion-MNIST images (train then test; 28 x 28 uint8) and labels, from rela's loader."""
    from rela.data import load_dataset

    parts = [load_dataset("fashion-mnist", split, root) for split in ("train", "test")]
    return (np.concatenate([p.images[:, 0].numpy() for p in parts]),
            np.concatenate([p.labels.numpy() for p in parts]))


def make_folder(root: Path, n: int, size: int, fmnist_root=None) -> Path:
    """``n`` JPEGs under root/CLASS/; image i is Fashion-MNIST image i mod 70k, resized and tinted per file."""
    from PIL import Image

    done = root / ".complete"
    if done.is_file():
        return root
    images, labels = fashion_mnist(fmnist_root)
    for cls in CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        tint = np.random.default_rng(i).uniform(0.5, 1.0, 3)  # every file differs, also past 70k
        gray = Image.fromarray(images[i % len(images)]).resize((size, size), Image.Resampling.BILINEAR)
        rgb = (np.asarray(gray, np.float32)[..., None] * tint).astype(np.uint8)
        Image.fromarray(rgb).save(root / CLASSES[labels[i % len(labels)]] / f"{i:07d}.jpg", quality=90)
    done.write_text(str(n))
    return root


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --- one measured run (``rela train`` in a child process) -------------------------------------

def tree_memory(root_pid: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes of a process and all its descendants (from /proc/PID/smaps_rollup)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    rss = pss = 0
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def measured_run(config: dict, work: Path) -> dict:
    """``rela train --config`` in a child process; its metrics.json plus the peak RSS and PSS of its process tree."""
    work.mkdir(parents=True, exist_ok=True)
    spec = work / "config.json"  # JSON is YAML: the run's TrainConfig fields
    spec.write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "rela", "train", "--config", str(spec)], cwd=REPO)
    peak, done = [0, 0], threading.Event()

    def watch():
        while not done.is_set():
            peak[:] = map(max, peak, tree_memory(proc.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rc = proc.wait()
    done.set()
    watcher.join()
    if rc != 0:
        raise SystemExit(f"measured run failed (exit {rc}): {spec}")
    metrics = json.loads((Path(config["out"]) / "metrics.json").read_text())
    return {**metrics, "peak_rss_bytes": peak[0], "peak_pss_bytes": peak[1]}


def run_config(args, folder: Path, out: Path, cache: Path, mode: str) -> dict:
    return {"dataset": f"imagefolder:{folder}", "image_size": args.image_size, "backbone": "convnet",
            "method": "byol", "prior": "random", "switch": BENCH_SWITCH, "ratio": args.ratio, "epochs": 1, "batch_size": args.batch_size,
            "data_mode": mode, "num_workers": args.workers, "probe_every": 0, "progress": False,
            "checkpoint_every": 0, "out": str(out), "cache_dir": str(cache), "seed": 0}


def measure(args, n: int, mode: str) -> dict:
    """Bank extraction (fresh cache) + 1 epoch at ``args.ratio`` on N images in ``mode``."""
    folder = make_folder(args.data_dir / f"jpeg-{n}", n, args.image_size, args.data_root)
    work = args.data_dir / f"run-{n}-{mode}-w{args.workers}"
    cache = work / "cache"
    m = measured_run(run_config(args, folder, work / "run", cache, mode), work)
    return {"n": n, "mode": mode, "workers": args.workers, "peak_rss_mb": m["peak_rss_bytes"] / 2**20,
            "peak_pss_mb": m["peak_pss_bytes"] / 2**20,
            "extract_images_per_s": n / m["bank_seconds"], "bank_seconds": m["bank_seconds"],
            "train_images_per_s": m["images_seen"] / m["train_seconds"], "images_seen": m["images_seen"],
            "data_wait_fraction": m["data_wait_fraction"],  # rela train's StepMetrics: wait / (wait + steps)
            "folder_bytes": disk_bytes(folder), "bank_bytes": disk_bytes(Path(m["bank_file"])),
            "bank_dim": m["bank_shape"][1]}


# --- the report --------------------------------------------------------------------------------

def scale_table(runs: list[dict]) -> list[str]:
    lines = table_head("N", "mode", "workers", "peak PSS (MB)", "peak RSS sum (MB)", "extraction img/s", "training img/s",
                       "data wait", "folder (MB)", "bank (MB)")
    for r in sorted(runs, key=lambda r: (r["n"], r["mode"])):
        lines.append(f"| {r['n']} | {r['mode']} | {r['workers']} | {r['peak_pss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['extract_images_per_s']:.0f} | {r['train_images_per_s']:.0f} | "
                     f"{r['data_wait_fraction']:.1%} | {r['folder_bytes'] / 2**20:.1f} | {r['bank_bytes'] / 2**20:.2f} |")
    return lines


def targets(runs: list[dict]) -> list[str]:
    stream = {r["n"]: r for r in runs if r["mode"] == "stream"}
    memory = {r["n"]: r for r in runs if r["mode"] == "memory"}
    lines = []
    if len(stream) > 1:
        lo, hi = stream[min(stream)], stream[max(stream)]
        lines.append(f"- peak PSS at N={hi['n']} / at N={lo['n']}: {hi['peak_pss_mb'] / lo['peak_pss_mb']:.2f} "
                     "(target <= 1.2)")
    for n in sorted(set(stream) & set(memory)):
        ratio = stream[n]["train_images_per_s"] / memory[n]["train_images_per_s"]
        lines.append(f"- N={n}: stream/memory training images/s {ratio:.2f} with {stream[n]['workers']} worker(s) "
                     f"(target >= 0.8); memory-mode data wait {memory[n]['data_wait_fraction']:.1%} (target < 10%)")
    return lines


# Assumptions of the ImageNet projection (stated in the report).
ASSUME = {"prior_dim": 2048, "gpu_prior_images_per_s": 2500, "decode_ms_per_image": 6.0, "cpu_cores": 64,
          "gpus": 8, "jpeg_kb": 110}


def projection(runs: list[dict]) -> list[str]:
    """ImageNet-1K on 1 and 4 machines of 8 GPUs, from the measured per-image costs and ASSUME."""
    stream = sorted((r for r in runs if r["mode"] == "stream"), key=lambda r: r["n"])
    if not stream:
        return []
    base = stream[0]
    per_image_mb = (stream[-1]["peak_pss_mb"] - base["peak_pss_mb"]) / max(stream[-1]["n"] - base["n"], 1)
    a = ASSUME
    bank_gb = IMAGENET * a["prior_dim"] * 2 / 1e9
    lines = table_head("machines", "bank on disk (float16)", "extraction time", "RAM per process tree")
    ram_gb = (base["peak_pss_mb"] + per_image_mb * (IMAGENET - base["n"])) / 1024
    for machines in (1, 4):
        decode_rate = machines * a["cpu_cores"] * 1000 / a["decode_ms_per_image"]
        rate = min(machines * a["gpus"] * a["gpu_prior_images_per_s"], decode_rate)
        lines.append(f"| {machines} x {a['gpus']} GPUs | {bank_gb:.1f} GB | {IMAGENET / rate / 60:.1f} min | "
                     f"~{ram_gb:.1f} GB |")
    measured_ms = 1000 * base["workers"] / base["extract_images_per_s"]
    lines += ["", f"Assumptions: a prior of {a['prior_dim']} features (ResNet-50); {a['gpu_prior_images_per_s']} "
              f"images/s of prior inference per GPU (224 px, bf16); JPEG decode + resize {a['decode_ms_per_image']} ms "
              f"per image per core ({a['jpeg_kb']} kB ImageNet JPEGs; measured here: {measured_ms:.2f} ms per "
              f"{base['n']}-set 64 px image per worker, prior included); {a['cpu_cores']} cores per machine. "
              "Extraction is sharded over all ranks (rela.bank), so it runs at the slower of GPU and decode "
              f"throughput. RAM per process tree (a rank and its workers, PSS): measured at N={base['n']} plus the "
              f"measured PSS growth per image ({per_image_mb * 1024:.3f} kB between N={base['n']} and "
              f"N={stream[-1]['n']}; the per-image arrays a run holds in memory, the N x 128 float32 targets and the "
              "labels, are 0.5 kB) times 1.28M."]
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    results = ResultsFile(args.results / "data_scale.json", {"workers": args.workers, "image_size": args.image_size,
                                                               "ratio": args.ratio, "cores": os.cpu_count()},
                          command=command(__file__, sys.argv[1:]))
    todo = [(n, "stream") for n in args.sizes] + [(min(args.sizes), "memory")]
    for n, mode in todo:
        if results.find(n=n, mode=mode, workers=args.workers) is None:
            print(f"N={n} {mode} mode ...", flush=True)
            results.add(measure(args, n, mode))
    runs = [r for r in results.runs if r["workers"] == args.workers]
    write_report([f"# Stream mode at scale ({args.workers} worker(s), {os.cpu_count()} cores)", "",
                  results.commands_shown(), "", *scale_table(runs), "", *targets(runs), "",
                  "## ImageNet-1K projection", "", *projection(runs)], args.results / "data_scale.md")


if __name__ == "__main__":
    main()
