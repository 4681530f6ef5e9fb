"""GPU benchmark in one command: BYOL on all data vs ReLA (random prior) on 10/20/50 % per epoch.

ResNet-18 with the CIFAR stem on Fashion-MNIST padded to 32 x 32 and repeated to 3 channels,
bf16 autocast (``--precision auto`` on CUDA), channels_last, optionally ``torch.compile``.
Offline by design: the four Fashion-MNIST ``.gz`` files travel with the source tree, e.g.::

    mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
    make bench-gpu                       # = python benchmarks/gpu.py --data-root data/fashion-mnist
    python benchmarks/gpu.py --data-root data/fashion-mnist --compile
    python benchmarks/gpu.py --smoke     # the same code on CPU, tiny, under a minute

Per run it reports images/s (training images over training seconds), the GPU busy fraction (CUDA
kernel time over wall time in a profiled window of ``--profile-steps`` steps after warm-up), peak
GPU memory, k-NN and linear top-1 on the test split, and the cost ratio (training + bank seconds
over BYOL-full's training seconds), into ``OUT/gpu_<tag>.json`` and ``.md``.

Two data paths: ``memory`` (every run; the whole dataset resident on the device, batches indexed
and augmented there) and ``stream`` (``--stream-runs``, default BYOL-full and ReLA-20 %: the same
32 x 32 x 3 images written once as lossless PNG files under RUNS_DIR/fmnist-rgb32-png, decoded and
augmented per sample in ``--workers`` DataLoader workers, ``rela train --data-mode stream``). Both
report the data-wait fraction: the share of step wall time spent waiting for the next batch.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from common import add_output_args
from rela.config import TrainConfig
from rela.data import ImageDataset, load_dataset
from rela.data.stream import default_workers
from rela.evaluate import evaluate_run
from rela.io import save_json, save_text
from rela.registry import DATASETS
from rela.train import train

RUNS = [("byol-full", "none", 1.0), ("rela-10", "random", 0.1), ("rela-20", "random", 0.2), ("rela-50", "random", 0.5)]


def fashion_mnist_rgb32(split: str, root=None, **_) -> ImageDataset:
    """Fashion-MNIST, 28 x 28 grey -> 32 x 32 RGB: 2 px of zero padding, the channel repeated three times."""
    ds = load_dataset("fashion-mnist", split, root)
    images = F.pad(ds.images, (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    return ImageDataset(DATASET, split, images, ds.labels, ds.num_classes, ds.mean * 3, ds.std * 3)


DATASET = "fashion-mnist-rgb32"
try:  # a registered dataset: train, eval and the bank cache treat it like any other
    DATASETS.register(DATASET, help="Fashion-MNIST at 32x32x3 (benchmarks/gpu.py)")(fashion_mnist_rgb32)
except ValueError:  # this module imported a second time
    pass


def png_folder(root: Path, data_root, train_limit: int | None, test_limit: int | None) -> Path:
    """The 32 x 32 x 3 images as PNG files, root/{train,test}/cN/I.png, written once (the stream path's data).

    Lossless, so both data paths train on the same pixels; written to a temporary folder and renamed,
    so an interrupted run leaves no half-written folder behind.
    """
    from PIL import Image

    folder = root / f"fmnist-rgb32-png-{train_limit or 'all'}-{test_limit or 'all'}"
    if folder.is_dir():
        return folder
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    for split, limit in (("train", train_limit), ("test", test_limit)):
        ds = fashion_mnist_rgb32(split, data_root)
        n = min(limit or len(ds.labels), len(ds.labels))
        for c in range(ds.num_classes):
            (partial / split / f"c{c}").mkdir(parents=True, exist_ok=True)
        pixels = ds.images[:n].permute(0, 2, 3, 1).numpy()
        for i, (image, label) in enumerate(zip(pixels, ds.labels[:n].tolist())):
            Image.fromarray(image).save(partial / split / f"c{label}" / f"{i:05d}.png")
    partial.rename(folder)
    return folder


class GpuProbe(Callback):
    """channels_last (+ torch.compile) at fit start; peak memory; GPU busy fraction over a profiled window."""

    def __init__(self, compile_backbone: bool, warmup: int, steps: int):
        self.compile_backbone, self.warmup, self.steps = compile_backbone, warmup, steps
        self.profiler, self.window_start, self.result = None, 0.0, {}

    def on_fit_start(self, trainer, module) -> None:
        module.to(memory_format=torch.channels_last)
        module.method.backbone.register_forward_pre_hook(
            lambda m, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:]))
        if self.compile_backbone:
            module.method.backbone.compile()  # in place: state-dict keys stay as they are
        if module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if module.device.type == "cuda" and trainer.global_step == self.warmup and self.profiler is None:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self.profiler.__enter__()
            self.window_start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        done = trainer.global_step >= self.warmup + self.steps
        if self.profiler is not None and done and "gpu_busy_fraction" not in self.result:
            torch.cuda.synchronize(module.device)
            wall = time.perf_counter() - self.window_start
            self.profiler.__exit__(None, None, None)
            self.result["gpu_busy_fraction"] = _kernel_seconds(self.profiler) / wall

    def on_train_end(self, trainer, module) -> None:
        if module.device.type == "cuda":
            self.result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(module.device) / 2**30


def _kernel_seconds(profiler) -> float:
    """Seconds in which at least one CUDA kernel ran (overlapping kernels counted once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in profiler.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    return busy / 1e6  # microseconds


def accuracy(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("knn_top1", "knn20_top1", "linear_top1")}


def run_all(args) -> dict:
    device = "cpu" if args.smoke else ("cuda" if torch.cuda.is_available() else "cpu")
    stream_data = png_folder(args.runs_dir, args.data_root, args.train_limit, args.test_limit) if args.stream_runs else None
    rows = {}
    for name, prior, ratio in RUNS:
        for path in ("memory", "stream") if name in args.stream_runs else ("memory",):
            stream = path == "stream"
            cfg = TrainConfig(dataset=f"imagefolder:{stream_data}" if stream else DATASET, data_root=args.data_root,
                              image_size=32 if stream else None, data_mode=path, num_workers=args.workers if stream else None,
                              train_limit=args.train_limit, test_limit=args.test_limit, backbone=args.backbone,
                              method="byol", prior=prior, switch="adaptive", ratio=ratio, epochs=args.epochs,
                              batch_size=args.batch_size, accelerator="cpu" if args.smoke else "auto",
                              probe_every=0, progress=False, cache_dir=str(args.runs_dir / "cache"),
                              out=str(args.runs_dir / (f"{name}-stream" if stream else name)))
            probe = GpuProbe(args.compile, args.warmup_steps, args.profile_steps)
            m = train(cfg, callbacks=[probe])
            rows[f"{name}-stream" if stream else name] = {
                "prior": prior, "ratio": ratio, "data_path": path, "steps": m["steps"], "images_seen": m["images_seen"],
                "train_seconds": m["train_seconds"], "bank_seconds": m.get("bank_seconds", 0.0),
                "images_per_second": m["images_seen"] / m["train_seconds"], "switch_step": m["switch_step"],
                "data_wait_fraction": m["data_wait_fraction"], "precision": m["precision"],
                "gpu_busy_fraction": probe.result.get("gpu_busy_fraction"),
                "peak_gpu_memory_gb": probe.result.get("peak_gpu_memory_gb"),
                **accuracy(evaluate_run(cfg.out, linear_epochs=args.linear_epochs, device=device, progress=False))}
    base = rows["byol-full"]["train_seconds"]
    for row in rows.values():
        row["cost_ratio"] = (row["train_seconds"] + row["bank_seconds"]) / base
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none (CPU)"
    return {"device": gpu, "smoke": args.smoke, "backbone": args.backbone, "compile": args.compile,
            "channels_last": True, "epochs": args.epochs, "batch_size": args.batch_size,
            "train_limit": args.train_limit, "stream_workers": args.workers, "runs": rows}


def markdown(report: dict) -> str:
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [f"# GPU benchmark ({report['device']}, {report['backbone']}, compile={report['compile']}, "
             f"smoke={report['smoke']})", "",
             "| run | ratio | data path | images/s | data wait | GPU busy | peak GPU GB | k-NN top-1 | linear top-1 "
             "| cost ratio | switch step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        lines.append(f"| {name} | {r['ratio']} | {r['data_path']} | {r['images_per_second']:.0f} "
                     f"| {fmt(r['data_wait_fraction'], '.2f')} | {fmt(r['gpu_busy_fraction'], '.2f')} "
                     f"| {fmt(r['peak_gpu_memory_gb'], '.2f')} | {r['knn_top1']:.3f} | {r['linear_top1']:.3f} "
                     f"| {r['cost_ratio']:.2f} | {r['switch_step']} |")
    return "\n".join(lines + ["", f"Stream path: PNG files decoded in DataLoader workers ({report['stream_workers']}) "
                                  "(memory path: the dataset resident on the device).", ""])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=None, help="folder with the 4 Fashion-MNIST .gz files")
    add_output_args(p, runs="bench-gpu")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--linear-epochs", type=int, default=50)
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--warmup-steps", type=int, default=20, help="steps before the profiled window")
    p.add_argument("--profile-steps", type=int, default=20)
    p.add_argument("--stream-runs", nargs="*", default=["byol-full", "rela-20"], choices=[r[0] for r in RUNS],
                   help="runs repeated on the DataLoader (stream) path; none: only the memory path")
    p.add_argument("--workers", type=int, default=default_workers(), help="DataLoader workers of the stream path")
    p.add_argument("--smoke", action="store_true", help="CPU, convnet, 320 images, 1 epoch: checks the code path")
    args = p.parse_args(argv)
    if args.smoke:
        args.backbone, args.epochs, args.batch_size, args.linear_epochs = "convnet", 1, 32, 2
        args.train_limit, args.test_limit = args.train_limit or 320, args.test_limit or 160
    report = run_all(args)
    tag = "smoke" if args.smoke else re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
    out = args.results
    save_json(report, out / f"gpu_{tag}.json")
    save_text(markdown(report), out / f"gpu_{tag}.md")
    print(markdown(report))


if __name__ == "__main__":
    main()
