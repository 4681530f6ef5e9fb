"""GPU benchmark in one command: the chip's bare BYOL step, rela's BYOL and ReLA runs, and lightly's own recipe.

ResNet-18 with the CIFAR stem on Fashion-MNIST padded to 32 x 32 and repeated to 3 channels,
bf16 autocast on CUDA (fp32 on CPU, as ``rela train --precision auto``), channels_last,
optionally ``torch.compile`` of rela's backbone. Runs, in this order (the most telling first, so a
timeout keeps them):

- ``bare``: the ceiling. rela's BYOL network (backbone, heads, momentum copies), its AdamW and its loss
  on 2 views already normalised on the device, in a plain PyTorch loop: no augmentation, no data
  loading, no Lightning, no online monitor. Every other run's ``bare_share`` is its images/s over this.
- ``byol-full``, ``rela-10/20/50``: ``rela train`` (method BYOL; prior none / random at 10, 20, 50 %
  of the data per epoch, ``--switch``, default adaptive) on the memory path: the dataset resident on the device,
  batches indexed and augmented there.
- ``lightly-byol``: the peer, lightly's BYOL example as its users run it: a plain PyTorch loop,
  lightly's heads, loss, momentum update and cosine momentum schedule, SGD lr 0.06,
  ``BYOLTransform`` (torchvision transforms, per sample, in DataLoader workers) on a
  ``torchvision.datasets.ImageFolder`` of the same images as PNG files; same backbone (rela's
  registry), batch size, epochs, bf16 autocast + channels_last on CUDA. Its backbone is saved as a
  rela ``backbone.pt`` and evaluated by the same ``rela.evaluate.evaluate_run``.
- ``byol-full-stream``, ``rela-20-stream``: ``rela train --data-mode stream`` on the same PNG files,
  decoded per sample in ``--workers`` DataLoader workers.

``--quick`` runs bare, byol-full, rela-20, lightly-byol and byol-full-stream for 5 epochs: sized from
the rates the issue measured on an H200 (about 10,000 images/s) to fit 8 minutes with the machine's
set-up; ``--smoke`` runs every kind on CPU, tiny (a test).

Per run, into ``RESULTS/gpu_<mode>-<device>.json`` (``runs``: a list, in the order they ran) and
``.md``, rewritten after EVERY run (a timeout or kill keeps what finished; the next call skips the
runs stored under the same settings, ``--fresh`` starts over):

- ``images_per_second``: training images over wall-clock seconds in the steady state, from step
  ``--warmup-steps`` (at most half the run) to the end, the device synchronised at both ends;
  ``bare_share`` and ``lightly_ratio``: that rate over the bare step's and over lightly's;
  ``byol_ratio``: a rela run's over BYOL-full's on the same data path; ``memory_ratio``: a stream
  run's over the same run on the memory path;
- ``gpu_busy_fraction``: seconds with a CUDA kernel running over wall seconds in a profiled window
  of ``--profile-steps`` steps after the warm-up (None off CUDA);
- ``data_wait_fraction``: share of the steps' wall time spent waiting for the next batch;
- ``tflops_per_second``: rela.flops' count of a step's FLOPs per image x images/s;
- ``kernels_per_step`` (in the profiled window) and ``host_syncs_per_step`` (the ``--sync-steps`` steps
  after it, counted by ``torch.cuda.set_sync_debug_mode("warn")``), None off CUDA;
- ``peak_gpu_memory_gb`` (None off CUDA); ``knn_top1`` (k=200), ``knn20_top1``, ``linear_top1``;
- cost as wall-clock and as FLOPs side by side: ``cost_seconds`` (the fit's wall seconds + the bank's)
  and ``cost_flops`` (training + bank FLOPs), each also over BYOL-full's (``*_ratio``).

The bare step trains no model on the data (one fixed batch): its accuracy and cost fields are None.

On a lent GPU, one call (the machine has no internet; carry the data and a lightly wheel)::

    # here, once: the four Fashion-MNIST .gz files and lightly's wheel into ignored folders
    mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
    pip download --no-deps -d .whl lightly==1.6.0
    # there (carry: data/fashion-mnist, .whl), one call with a 600 s limit:
    bash benchmarks/gpu_check.sh
    #   = pip install --no-index --no-deps --target /tmp/pylib .whl/*.whl
    #     PYTHONPATH=/tmp/pylib:$PWD python3 -m pytest -q -rs -m cuda tests   (CUDA-only tests)
    #     PYTHONPATH=/tmp/pylib:$PWD python3 benchmarks/gpu.py --quick --data-root data/fashion-mnist \\
    #         --results ${OUT:-benchmarks/results}
    make bench-gpu BENCH_PYTHON=python3  # the full benchmark (20 epochs, every run; a second call resumes it)
    python benchmarks/gpu.py --smoke     # the same code on CPU, tiny, under a minute
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from common import add_output_args
from rela.backbones import build_backbone
from rela.config import TrainConfig
from rela.data import ImageDataset, Normalize, load_dataset
from rela.data.augment import to_float
from rela.data.stream import default_workers
from rela.evaluate import evaluate_run
from rela.flops import count_flops, untouched
from rela.hardware import autocast_dtype
from rela.io import load_json, save_json, save_text, save_torch, save_yaml
from rela.methods import build_method
from rela.priors import BACKBONE_FILE_FORMAT
from rela.registry import DATASETS
from rela.train import train

# name -> (kind, prior, ratio, data path); the order is the order they run in
RUNS = {
    "bare": ("bare", None, None, "device"),
    "byol-full": ("rela", "none", 1.0, "memory"),
    "rela-20": ("rela", "random", 0.2, "memory"),
    "lightly-byol": ("lightly", None, 1.0, "stream"),
    "byol-full-stream": ("rela", "none", 1.0, "stream"),
    "rela-10": ("rela", "random", 0.1, "memory"),
    "rela-50": ("rela", "random", 0.5, "memory"),
    "rela-20-stream": ("rela", "random", 0.2, "stream"),
}
QUICK = ("bare", "byol-full", "rela-20", "lightly-byol", "byol-full-stream")
BASE, PEER = "byol-full", "lightly-byol"
ACCURACY = ("knn_top1", "knn20_top1", "linear_top1")
FORMAT = 2  # of the results file: raised when a run's measured fields change (an older file is not resumed)


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


# --- what every kind of run measures the same way --------------------------------------------

def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Meter:
    """Steady-state images/s, a profiled window, a sync-counted window, peak memory: one per run.

    Steps [warmup, warmup + profile_steps): the CUDA kernels (GPU busy fraction, kernels per step);
    the next ``sync_steps`` steps: the host-device synchronisations that
    ``torch.cuda.set_sync_debug_mode("warn")`` flags (``.item()``, a tensor in an ``if``, blocking
    copies), per step. The device is synchronised only at these windows' edges and at the run's end: a
    synchronisation inside the steps would change what is measured. Off CUDA only the rate is measured.
    """

    SYNC_WARNING = "synchronizing CUDA operation"  # what torch warns on each sync in sync debug mode "warn"

    def __init__(self, device, warmup: int, profile_steps: int, sync_steps: int = 20):
        self.device, self.warmup = torch.device(device), warmup
        self.profile_steps, self.sync_steps = profile_steps, sync_steps
        self.cuda = self.device.type == "cuda"
        self.profiler = self.catcher = None
        self.t0 = self.seconds = self.images0 = self.images = self.busy = self.kernels = self.peak_gb = None
        self.syncs = self.sync_from = self.flagged = None
        self.start_time = self.fit_seconds = 0.0

    def start(self, total_steps: int) -> None:
        """Before the first step: a short run is timed from its middle (warm-up at most half of it)."""
        self.warmup = min(self.warmup, total_steps // 2)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        synchronize(self.device)
        self.start_time = time.perf_counter()

    def before_step(self, step: int, images_so_far: int) -> None:
        if step == self.warmup and self.t0 is None:
            synchronize(self.device)
            self.t0, self.images0 = time.perf_counter(), images_so_far
            if self.cuda:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                self.profiler.__enter__()
        if self.cuda and step == self.warmup + self.profile_steps and self.sync_from is None:
            self.sync_from, self.catcher = step, warnings.catch_warnings(record=True)
            self.flagged = self.catcher.__enter__()
            warnings.simplefilter("always")  # every sync, not the first per line of code
            torch.cuda.set_sync_debug_mode("warn")
        if self.catcher is not None and step == self.sync_from + self.sync_steps:
            self._stop_counting(step)

    def _stop_counting(self, step: int) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self.catcher.__exit__(None, None, None)
        self.catcher = None
        if step > self.sync_from:
            self.syncs = sum(self.SYNC_WARNING in str(w.message) for w in self.flagged) / (step - self.sync_from)

    def after_step(self, steps_done: int) -> None:
        if self.profiler is not None and self.busy is None and steps_done >= self.warmup + self.profile_steps:
            synchronize(self.device)
            wall = time.perf_counter() - self.t0
            self.profiler.__exit__(None, None, None)
            self.busy = _kernel_seconds(self.profiler) / wall
            self.kernels = _kernel_count(self.profiler) / max(steps_done - self.warmup, 1)

    def finish(self, images_total: int, steps_total: int) -> None:
        if self.catcher is not None:  # the run ended inside the sync-counted window
            self._stop_counting(steps_total)
        synchronize(self.device)
        end = time.perf_counter()
        self.fit_seconds = end - self.start_time
        if self.t0 is not None:
            self.seconds, self.images = end - self.t0, images_total - self.images0
        if self.profiler is not None and self.busy is None:  # the run ended inside the profiled window
            self.after_step(steps_total)
        if self.cuda:
            self.peak_gb = torch.cuda.max_memory_allocated(self.device) / 2**30

    def record(self) -> dict:
        return {"timed_images": self.images, "timed_seconds": self.seconds, "fit_seconds": self.fit_seconds,
                "images_per_second": self.images / self.seconds if self.seconds else None,
                "gpu_busy_fraction": self.busy, "kernels_per_step": self.kernels, "host_syncs_per_step": self.syncs,
                "peak_gpu_memory_gb": self.peak_gb}


def _kernel_count(profiler) -> int:
    """CUDA kernels (and copies) the device ran in the profiled window."""
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in profiler.events())


def _kernel_seconds(profiler) -> float:
    """Seconds in which at least one CUDA kernel ran (overlapping kernels counted once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in profiler.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    return busy / 1e6  # microseconds


class WaitClock:
    """rela's StepMetrics definition of data wait, for the plain loops: the time from the end of one
    step to the start of the next (fetching the batch) over the loop's wall time. The Meter's calls
    sit inside the steps, so its synchronisations never count as waiting for data."""

    def __init__(self):
        self.wait = self.busy = 0.0
        self.mark = time.perf_counter()

    def fetched(self) -> None:
        now = time.perf_counter()
        self.wait, self.mark = self.wait + now - self.mark, now

    def stepped(self) -> None:
        now = time.perf_counter()
        self.busy, self.mark = self.busy + now - self.mark, now

    def fraction(self) -> float | None:
        return self.wait / (self.wait + self.busy) if self.wait + self.busy > 0 else None


def autocast(device):
    """bf16 (fp16 before Ampere) autocast on CUDA, off on CPU: what ``rela train --precision auto`` picks."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=autocast_dtype(device), enabled=device.type == "cuda")


def precision(device) -> str:
    if torch.device(device).type != "cuda":
        return "32-true"
    return "bf16-mixed" if autocast_dtype(device) == torch.bfloat16 else "16-mixed"


# --- rela train runs ----------------------------------------------------------------------------

class GpuProbe(Callback):
    """channels_last (+ torch.compile) at fit start, and the :class:`Meter` around the fit's steps."""

    def __init__(self, compile_backbone: bool, warmup: int, steps: int, sync_steps: int):
        self.compile_backbone, self.warmup, self.steps, self.sync_steps = compile_backbone, warmup, steps, sync_steps
        self.meter: Meter | None = None

    def on_fit_start(self, trainer, module) -> None:
        module.to(memory_format=torch.channels_last)
        module.method.backbone.register_forward_pre_hook(
            lambda m, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:]))
        if self.compile_backbone:
            module.method.backbone.compile()  # in place: state-dict keys stay as they are

    def on_train_start(self, trainer, module) -> None:
        self.meter = Meter(module.device, self.warmup, self.steps, self.sync_steps)
        self.meter.start(int(trainer.estimated_stepping_batches))

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.meter.before_step(trainer.global_step, module.budget["images_seen"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.meter.after_step(trainer.global_step)

    def on_train_end(self, trainer, module) -> None:
        self.meter.finish(module.budget["images_seen"], trainer.global_step)


def rela_run(name: str, args, device: str, png: Path | None) -> dict:
    _, prior, ratio, path = RUNS[name]
    stream = path == "stream"
    cfg = TrainConfig(dataset=f"imagefolder:{png}" if stream else DATASET, data_root=args.data_root,
                      image_size=32 if stream else None, data_mode=path, num_workers=args.workers if stream else None,
                      train_limit=args.train_limit, test_limit=args.test_limit, backbone=args.backbone,
                      method="byol", prior=prior, switch=args.switch, ratio=ratio, epochs=args.epochs,
                      batch_size=args.batch_size, accelerator="cpu" if args.smoke else "auto",
                      probe_every=0, progress=False, cache_dir=str(args.runs_dir / "cache" / name),
                      out=str(args.runs_dir / name))
    probe = GpuProbe(args.compile, args.warmup_steps, args.profile_steps, args.sync_steps)
    m = train(cfg, callbacks=[probe])
    metrics = evaluate_run(cfg.out, linear_epochs=args.linear_epochs, device=device, progress=False)
    return {**probe.meter.record(), "steps": m["steps"], "images_seen": m["images_seen"],
            "flops_per_image": m["train_flops"] / m["images_seen"], "train_flops": m["train_flops"],
            "bank_flops": m.get("bank_flops", 0.0), "bank_seconds": m.get("bank_seconds", 0.0),
            "bank_cache_hit": m.get("bank_cache_hit"), "data_wait_fraction": m["data_wait_fraction"],
            "precision": m["precision"], "switch_step": m["switch_step"], **{k: metrics[k] for k in ACCURACY}}


# --- the bare step ------------------------------------------------------------------------------

def bare_run(args, device: str) -> dict:
    """rela's BYOL network, optimizer and loss on 2 fixed views on the device, in a plain loop."""
    data = fashion_mnist_rgb32("train", args.data_root)
    defaults = TrainConfig()
    torch.manual_seed(0)
    backbone, dim = build_backbone(args.backbone, data.channels, data.image_size)
    method = build_method("byol", backbone, dim, data.num_classes).to(device).train()
    method.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=defaults.lr,
                            weight_decay=defaults.weight_decay)
    b = args.batch_size
    # two different batches of real images as the two views (Normalize returns channels_last)
    x = Normalize(data.mean, data.std, data.channels).to(device)(to_float(data.images[:2 * b].to(device)))
    views, labels = [x[:b], x[b:2 * b]], data.labels[:b].to(device)
    with untouched(method):
        per_image = count_flops(lambda: method([v[:8] for v in views], labels[:8]).loss.backward()) / 8
    total = args.bare_warmup + args.bare_steps
    meter, clock = Meter(device, args.bare_warmup, args.profile_steps, args.sync_steps), WaitClock()
    meter.start(total)
    for step in range(total):
        clock.fetched()  # the views are already there: the wait is the loop's own
        meter.before_step(step, step * b)
        with autocast(device):
            loss = method(views, labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.update_momentum(step, total)
        meter.after_step(step + 1)
        clock.stepped()
    meter.finish(total * b, total)
    return {**meter.record(), "steps": total, "images_seen": total * b, "flops_per_image": per_image,
            "data_wait_fraction": clock.fraction(), "precision": precision(device)}


# --- the peer: lightly's BYOL recipe ------------------------------------------------------------

class LightlyBYOL(nn.Module):
    """The model of lightly's BYOL example: online backbone + projection + prediction, momentum copies."""

    def __init__(self, backbone: nn.Module, dim: int):
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(dim, 1024, 256)
        self.prediction_head = BYOLPredictionHead(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x):
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def forward_momentum(self, x):
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


def lightly_run(args, device: str, png: Path) -> dict:
    import torchvision
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.utils import update_momentum
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    from lightly.utils.scheduler import cosine_schedule

    stats = fashion_mnist_rgb32("train", args.data_root)  # mean/std only; the peer trains on the PNG files
    normalize = {"mean": list(stats.mean), "std": list(stats.std)}
    # lightly's CIFAR settings (32 px, no blur), normalised with the data's statistics as rela's runs are
    transform = BYOLTransform(BYOLView1Transform(input_size=32, gaussian_blur=0.0, normalize=normalize),
                              BYOLView2Transform(input_size=32, gaussian_blur=0.0, normalize=normalize))
    dataset = torchvision.datasets.ImageFolder(str(png / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, pin_memory=torch.device(device).type == "cuda")
    torch.manual_seed(0)
    backbone, dim = build_backbone(args.backbone, 3, 32)
    model = LightlyBYOL(backbone, dim).to(device).to(memory_format=torch.channels_last)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)

    def loss_of(x0, x1):
        p0, p1 = model(x0), model(x1)
        z0, z1 = model.forward_momentum(x0), model.forward_momentum(x1)
        return 0.5 * (criterion(p0, z1) + criterion(p1, z0))

    sample = torch.stack([dataset[i][0][0] for i in range(8)]).to(device)
    with untouched(model):
        per_image = count_flops(lambda: loss_of(sample, sample).backward()) / 8
    total = args.epochs * len(loader)
    meter, step = Meter(device, args.warmup_steps, args.profile_steps, args.sync_steps), 0
    meter.start(total)
    clock = WaitClock()
    for epoch in range(args.epochs):
        momentum = cosine_schedule(epoch, args.epochs, 0.996, 1)
        clock.mark = time.perf_counter()  # an epoch's first wait: starting the workers, the first batch
        for (x0, x1), _ in loader:
            clock.fetched()
            meter.before_step(step, step * args.batch_size)
            update_momentum(model.backbone, model.backbone_momentum, m=momentum)
            update_momentum(model.projection_head, model.projection_head_momentum, m=momentum)
            x0 = x0.to(device, non_blocking=True, memory_format=torch.channels_last)
            x1 = x1.to(device, non_blocking=True, memory_format=torch.channels_last)
            with autocast(device):
                loss = loss_of(x0, x1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            meter.after_step(step)
            clock.stepped()
    images = step * args.batch_size
    meter.finish(images, step)
    save_peer_run(args, model.backbone, dim, stats)
    metrics = evaluate_run(args.runs_dir / PEER, linear_epochs=args.linear_epochs, device=device, progress=False)
    return {**meter.record(), "steps": step, "images_seen": images, "flops_per_image": per_image,
            "train_flops": per_image * images, "bank_flops": 0.0, "bank_seconds": 0.0,
            "data_wait_fraction": clock.fraction(), "precision": precision(device),
            **{k: metrics[k] for k in ACCURACY}}


def save_peer_run(args, backbone: nn.Module, dim: int, data: ImageDataset) -> None:
    """The peer's backbone as a finished ``rela train`` run, so ``evaluate_run`` scores it like rela's
    memory-path runs (the same test split, k-NN and linear probe)."""
    out = args.runs_dir / PEER
    cfg = TrainConfig(dataset=DATASET, data_root=args.data_root, train_limit=args.train_limit,
                      test_limit=args.test_limit, backbone=args.backbone, method="byol", prior="none",
                      epochs=args.epochs, batch_size=args.batch_size, out=str(out))
    save_yaml(cfg.to_dict(), out / "config.yaml")
    save_torch({"format": BACKBONE_FILE_FORMAT, "arch": args.backbone, "channels": data.channels,
                "image_size": data.image_size, "mean": list(data.mean), "std": list(data.std), "feature_dim": dim,
                "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()}}, out / "backbone.pt")
    save_json({"data_mode": "memory"}, out / "metrics.json")


# --- the results file ---------------------------------------------------------------------------

def derive(runs: dict) -> None:
    """Each run against the bare step, lightly's recipe and BYOL-full (None until that run has finished)."""
    def rate(name):
        return (runs.get(name) or {}).get("images_per_second")

    def over(name, other):
        return runs[name]["images_per_second"] / rate(other) if rate(other) else None

    base = runs.get(BASE)
    for name, r in runs.items():
        r["bare_share"], r["lightly_ratio"] = over(name, "bare"), over(name, PEER)
        stream = name.endswith("-stream")
        # the issue's targets: ReLA's rate over BYOL's on the same data path; the stream path over the memory path
        r["byol_ratio"] = over(name, f"{BASE}-stream" if stream else BASE) if r["kind"] == "rela" else None
        r["memory_ratio"] = over(name, name.removesuffix("-stream")) if stream else None
        r["tflops_per_second"] = r["flops_per_image"] * r["images_per_second"] / 1e12
        trains = r["kind"] != "bare"  # the bare step trains nothing: no training cost, no accuracy
        r["cost_seconds"] = r["fit_seconds"] + r["bank_seconds"] if trains else None
        r["cost_flops"] = r["train_flops"] + r["bank_flops"] if trains else None
        r["cost_seconds_ratio"] = r["cost_seconds"] / base["cost_seconds"] if trains and base else None
        r["cost_flops_ratio"] = r["cost_flops"] / base["cost_flops"] if trains and base else None


def markdown(report: dict) -> str:
    s = report["settings"]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"# GPU benchmark: {s['device']} ({s['mode']}; {s['backbone']}, batch {s['batch_size']}, "
             f"{s['epochs']} epochs, compile={s['compile']})", "",
             "| run | data path | images/s | x bare step | x lightly | x BYOL-full | x memory path | GPU busy | data wait | TFLOP/s | kernels/step "
             "| syncs/step | peak GB | k-NN top-1 | linear top-1 | cost s (x BYOL) | cost PFLOP (x BYOL) "
             "| switch step |",
             "|" + "---|" * 18]
    for name, r in report["runs"].items():
        cost_s = "-" if r["cost_seconds"] is None else f"{r['cost_seconds']:.1f} ({f(r['cost_seconds_ratio'], '.2f')})"
        cost_f = "-" if r["cost_flops"] is None else f"{r['cost_flops'] / 1e15:.3g} ({f(r['cost_flops_ratio'], '.2f')})"
        lines.append(f"| {name} | {r['data_path']} | {f(r['images_per_second'], '.0f')} | {f(r['bare_share'], '.2f')} "
                     f"| {f(r['lightly_ratio'], '.2f')} | {f(r['byol_ratio'], '.2f')} "
                     f"| {f(r['memory_ratio'], '.2f')} | {f(r['gpu_busy_fraction'], '.2f')} "
                     f"| {f(r['data_wait_fraction'], '.3f')} | {f(r['tflops_per_second'], '.2f')} "
                     f"| {f(r['kernels_per_step'], '.0f')} | {f(r['host_syncs_per_step'], '.1f')} "
                     f"| {f(r['peak_gpu_memory_gb'], '.2f')} | {f(r['knn_top1'], '.3f')} "
                     f"| {f(r['linear_top1'], '.3f')} "
                     f"| {cost_s} | {cost_f} | {f(r['switch_step'], 'd')} |")
    return "\n".join(lines + [
        "", "images/s: steady state (after the warm-up steps), wall clock. bare step: rela's BYOL network, AdamW "
        "and loss on 2 views already on the device, plain loop (no augmentation, data loading, Lightning). "
        "lightly-byol: lightly's BYOL example (SGD, BYOLTransform in DataLoader workers on the PNG files). "
        "Stream path: PNG files decoded in DataLoader workers "
        f"({s['workers']}); memory path: the dataset resident on the device. Cost: the fit's wall seconds + the "
        "bank's, and training + bank FLOPs, each over BYOL-full's.", ""])


def settings(args, device: str) -> dict:
    """What the stored runs depend on: a file made under other settings is not resumed."""
    return {"format": FORMAT, "device": torch.cuda.get_device_name(device) if device == "cuda" else "CPU",
            "mode": args.mode,
            "torch": torch.__version__, **{k: getattr(args, k) for k in (
                "backbone", "switch", "compile", "epochs", "batch_size", "train_limit", "test_limit", "linear_epochs",
                "workers", "warmup_steps", "profile_steps", "sync_steps", "bare_warmup", "bare_steps")}}


def run_all(args) -> dict:
    device = "cpu" if args.smoke else ("cuda" if torch.cuda.is_available() else "cpu")
    here = settings(args, device)
    tag = re.sub(r"[^a-z0-9]+", "-", f"{args.mode} {here['device']}".lower()).strip("-")
    json_path, md_path = args.results / f"gpu_{tag}.json", args.results / f"gpu_{tag}.md"
    report = {"settings": here, "runs": {}}
    if json_path.is_file() and not args.fresh:
        stored = load_json(json_path)
        if stored.get("settings") != here:
            raise SystemExit(f"{json_path} holds runs made under other settings ({stored.get('settings')}); "
                             "pass --fresh to start over, or another --results")
        report = {**stored, "runs": {r["run"]: r for r in stored["runs"]}}
        derive(report["runs"])
    names = args.runs or (QUICK if args.mode == "quick" else list(RUNS))
    png = None
    if any(RUNS[n][3] == "stream" for n in names if n not in report["runs"]):
        png = png_folder(args.runs_dir, args.data_root, args.train_limit, args.test_limit)
    for name in names:
        if name in report["runs"]:
            print(f"{name}: stored in {json_path}, skipped", flush=True)
            continue
        print(f"{name}: running", flush=True)
        # a run killed midway starts over; each run extracts its own bank (a cached one would cost no time)
        for folder in (args.runs_dir / name, args.runs_dir / "cache" / name):
            shutil.rmtree(folder, ignore_errors=True)
        kind, prior, ratio, path = RUNS[name]
        if kind == "bare":
            row = bare_run(args, device)
        elif kind == "lightly":
            row = lightly_run(args, device, png)
        else:
            row = rela_run(name, args, device, png)
        row.setdefault("switch_step", None)
        if kind == "bare":
            row.update({k: None for k in ACCURACY}, train_flops=None, bank_flops=None, bank_seconds=None)
        report["runs"][name] = {"run": name, "kind": kind, "prior": prior, "ratio": ratio, "data_path": path, **row}
        derive(report["runs"])
        # after every run, so a timeout keeps what finished; a list, in the order they ran (JSON keys get sorted)
        save_json({**report, "runs": list(report["runs"].values())}, json_path)
        save_text(markdown(report), md_path)
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=None, help="folder with the 4 Fashion-MNIST .gz files")
    add_output_args(p, runs="bench-gpu")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--epochs", type=int, default=None, help="default 20 (--quick: 5)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--linear-epochs", type=int, default=50)
    p.add_argument("--compile", action="store_true", help="torch.compile rela's backbone")
    p.add_argument("--switch", default="adaptive",
                   help="the ReLA runs' switch (pinned, not rela's default: comparable across rela versions)")
    p.add_argument("--warmup-steps", type=int, default=20, help="steps before the timed and profiled window")
    p.add_argument("--profile-steps", type=int, default=20, help="steps profiled (GPU busy, kernels per step)")
    p.add_argument("--sync-steps", type=int, default=20, help="steps after those whose host syncs are counted")
    p.add_argument("--bare-warmup", type=int, default=20, help="bare step: untimed steps")
    p.add_argument("--bare-steps", type=int, default=None, help="bare step: timed steps (default 500, --quick 200)")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), help="these runs only, in this order")
    p.add_argument("--fresh", action="store_true", help="discard the stored runs of these settings")
    p.add_argument("--workers", type=int, default=default_workers(), help="DataLoader workers (stream path, lightly)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="5 epochs, the main runs only: fits 8 minutes on an H200")
    mode.add_argument("--smoke", action="store_true", help="CPU, convnet, 320 images, 1 epoch: checks the code path")
    args = p.parse_args(argv)
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.epochs = args.epochs or (5 if args.quick else 20)
    args.bare_steps = args.bare_steps or (200 if args.quick else 500)
    if args.smoke:
        args.backbone, args.epochs, args.batch_size, args.linear_epochs = "convnet", 1, 32, 2
        args.train_limit, args.test_limit = args.train_limit or 320, args.test_limit or 160
        args.warmup_steps, args.bare_warmup, args.bare_steps = 2, 2, 6
    report = run_all(args)
    print(markdown(report))


if __name__ == "__main__":
    main()
