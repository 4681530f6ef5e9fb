"""Cost of one optimizer step: bare compute vs. BYOL vs. ReLA, and bank extraction vs. bare inference.

Run (from any folder)::

    .venv/bin/python benchmarks/step_cost.py                      # convnet, batch 256, 3 x 20 timed steps
    .venv/bin/python benchmarks/step_cost.py --malloc plain       # glibc's defaults (rela train tunes them)
    .venv/bin/python benchmarks/step_cost.py --backbone resnet-narrow --steps 10

What is measured (median seconds per optimizer step, after ``--warmup`` untimed steps; the step
measurements run in ``--rounds`` interleaved rounds and the medians pool all rounds' steps, so a
slow drift of a shared machine hits every measurement alike). Every measurement also records the
CPU cores that *other* processes used meanwhile (``foreign_cpu``): on 2 cores with 2 torch threads
even one busy neighbour slows steps several-fold, and a disturbed measurement is re-run
(``--retries``).

Allocator: with glibc's defaults a PyTorch CPU process hands the big activation buffers back to
the kernel after every step and page-faults them in again on the next one (~10-50k minor faults
per step here). That costs a varying 10-40 % of a step and depends on the heap's history, so two
measurements of the same code differ by more than the effects measured here. By default
(``--malloc tuned``) the script therefore calls ``mallopt`` (no mmap for big blocks, no trimming)
before measuring, as ``rela train`` does (:func:`rela.hardware.keep_freed_memory`); ``--malloc plain``
measures glibc's defaults. Page faults per step are recorded with every measurement.

(a) ``bare``: the backbone on two already-normalised views (made outside the timed
    region), loss = mean of the features, backward, AdamW step.
(b) ``byol``: the shipped SSL-phase step, ``ReLAModule.training_step`` driven by a real
    ``lightning.Trainer.fit`` (no prior): index the uint8 images, augment both views with
    ``method.views``, normalise, BYOL forward incl. the momentum forward, update_momentum,
    online monitor, backward, AdamW step, LR scheduler step. A callback records
    ``on_train_batch_start`` -> ``on_train_batch_end`` per batch (and the start-to-start
    period, which also holds data fetching, logging and the module's own batch-end hook).
(c) ``rela``: the same fit with prior ``random`` -> bank -> targets and switch ``never``
    (ReLA phase all the way: no momentum forward).
(d) ``momentum_forward``: BYOL's two no-grad momentum forwards (momentum backbone +
    momentum projection head, train mode as in training) on prepared views.
(e) bank extraction (``rela.bank.extract``, random prior) vs. bare prior inference
    (``prior.model`` on pre-normalised tensors, same batch size), in images/s.

Diagnostics that split (b) up: ``byol_compute`` (the BYOL module's forward on prepared views
+ monitor + backward + AdamW + update_momentum, i.e. (b) without data pipeline and Lightning),
``rela_compute`` likewise for (c), ``augment_byol`` / ``augment_rela`` (index + both views +
normalise, no grad).

Ratios: ``c_over_b`` (expected <= 0.8), ``pipeline_overhead`` = b / (a + d) - 1 (expected
< 0.15; the denominator holds neither BYOL's projection/prediction heads nor the monitor, so
this overestimates the pipeline's share by the heads' cost; ``pipeline_overhead_vs_compute``
= b / byol_compute - 1 is the overhead with the heads counted in the compute),
``bank_vs_bare_inference`` = bank images/s / bare images/s (1.0 = no preprocessing cost).
"""

from __future__ import annotations

import argparse
import dataclasses

try:
    import resource
except ImportError:  # not on Windows
    resource = None
import logging
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from common import add_output_args, median, spread

from rela.accelerator import ReLAAccelerator, build_switch
from rela.backbones import build_backbone
from rela.bank import extract
from rela.targets import transport
from rela.config import TrainConfig
from rela.data import RELA_VIEW, Normalize, load_dataset
from rela.hardware import keep_freed_memory
from rela.io import save_json
from rela.methods import METHODS, build_method
from rela.priors import build_prior
from rela.train import ReLAModule


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", default="convnet", help="learner backbone (convnet, resnet-narrow, resnet18, ...)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement and round")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds over all step measurements (interleaved); medians pool every round's steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement")
    p.add_argument("--train-images", type=int, default=20000,
                   help="training images the fits index into (and the bank covers); does not change step cost")
    p.add_argument("--bank-images", type=int, default=20000, help="images for the bank-extraction timing (e)")
    p.add_argument("--bank-batch-size", type=int, default=512,
                   help="batch size of (e), both sides (512 = what rela.train uses for the bank)")
    p.add_argument("--bank-repeats", type=int, default=3,
                   help="runs of (e) per side, alternating; the median is kept")
    p.add_argument("--prior", default="random", help="prior for (c) and (e)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc", choices=["tuned", "plain"], default="tuned",
                   help="tuned: glibc mallopt so freed tensors stay mapped, no per-step page faults (steadier, "
                        "comparable timings); plain: glibc's defaults, as a 'rela train' process runs today")
    p.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c", "d", "e", "diag"],
                   help="measurements to leave out")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="minutes to wait (polling each minute) for the 1-min load average to drop below --max-load")
    p.add_argument("--max-load", type=float, default=0.5)
    p.add_argument("--retries", type=int, default=1,
                   help="re-run a measurement (after --retry-wait s) when other processes used more than "
                        "--max-foreign CPU cores during it; the least disturbed attempt is kept")
    p.add_argument("--max-foreign", type=float, default=0.25, help="CPU cores used by other processes")
    p.add_argument("--retry-wait", type=float, default=30.0)
    add_output_args(p)
    p.add_argument("--no-save", action="store_true", help="print only; write no step_cost.json")
    return p.parse_args(argv)


# --- helpers ---------------------------------------------------------------------------

def timed_loop(fn, warmup: int, steps: int) -> list[float]:
    """Call ``fn(i)`` warmup + steps times; return the wall times of the last ``steps`` calls."""
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        fn(i)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return times


def wait_for_idle(minutes: float, max_load: float) -> None:
    deadline = time.time() + minutes * 60
    while os.getloadavg()[0] >= max_load and time.time() < deadline:
        print(f"load average {os.getloadavg()[0]:.2f} >= {max_load}; waiting ...", flush=True)
        time.sleep(60)


class ForeignCPU:
    """CPU cores that *other* processes used while a measurement ran (Linux /proc/stat).

    With 2 cores and 2 intra-op threads any foreign load makes OpenMP threads wait for each
    other at every barrier, which slows steps several-fold, so this is recorded with every
    measurement; ``None`` where /proc/stat is unavailable.
    """

    def __enter__(self):
        self._faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc):
        end = self._snapshot()
        usage = resource.getrusage(resource.RUSAGE_SELF) if resource else None
        self.minor_faults = usage.ru_minflt - self._faults if usage else None
        self.self_sys_s = end[3] - self._start[3]
        self.cores = None
        if self._start[1] is not None and end[1] is not None and end[0] > self._start[0]:
            busy = (end[1] - self._start[1]) - (end[2] - self._start[2])
            self.cores = max(busy, 0.0) / (end[0] - self._start[0])

    @staticmethod
    def _snapshot():
        t = os.times()
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:9]]
            busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
        except (OSError, ValueError):
            busy = None
        return time.perf_counter(), busy, t.user + t.system, t.system


def batch_indices(n: int, batch_size: int, count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:batch_size] for _ in range(count)]


class StepTimer(Callback):
    """Per-batch wall times inside a real ``Trainer.fit``.

    ``batch``: on_train_batch_start -> on_train_batch_end (callback hooks run before the
    module's, so this covers training_step, backward, optimizer and LR-scheduler step).
    ``period``: start-to-start, i.e. everything the loop does per step (data fetch, logging,
    the module's on_train_batch_end with the switch update).
    """

    def __init__(self):
        self.batch: list[float] = []
        self.period: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._start is not None:
            self.period.append(now - self._start)
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch.append(time.perf_counter() - self._start)


def fit_steps(cfg: TrainConfig, dataset, targets: torch.Tensor | None, warmup: int, steps: int,
              seed: int) -> tuple[StepTimer, ReLAModule]:
    """Fit ReLAModule for warmup + steps optimizer steps with Lightning; time every batch."""
    L.seed_everything(seed, verbose=False)
    backbone, feature_dim = build_backbone(cfg.backbone, dataset.channels, dataset.image_size)
    method = build_method(cfg.method, backbone, feature_dim, dataset.num_classes, **cfg.extra)
    rela = None
    if targets is not None:  # as rela.train.train builds it
        rela = ReLAAccelerator(feature_dim, targets, build_switch(cfg.switch))
    module = ReLAModule(cfg, method, rela, dataset)
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=warmup + steps, max_epochs=cfg.epochs, accelerator="cpu", devices=1, precision="32-true",
        logger=False, callbacks=[timer], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
    )
    trainer.fit(module)
    if len(timer.batch) != warmup + steps:
        raise RuntimeError(f"the fit ran {len(timer.batch)} steps, expected {warmup + steps}")
    timer.batch = timer.batch[warmup:]
    timer.period = timer.period[warmup:]  # period[i] ends at the start of batch i + 1
    return timer, module


# --- measurements ----------------------------------------------------------------------

def measure_bare(args, dataset, normalize, views) -> list[float]:
    """(a) backbone fwd+bwd on two prepared views, mean-of-features loss, AdamW step."""
    torch.manual_seed(args.seed)
    backbone, _ = build_backbone(args.backbone, dataset.channels, dataset.image_size)
    backbone.train()
    opt = torch.optim.AdamW(backbone.parameters(), lr=args.lr, weight_decay=1e-4)

    def step(i):
        v1, v2 = views[i]
        opt.zero_grad(set_to_none=True)
        loss = backbone(v1).flatten(1).mean() + backbone(v2).flatten(1).mean()
        loss.backward()
        opt.step()

    return timed_loop(step, args.warmup, args.steps)


def build_byol(args, dataset):
    torch.manual_seed(args.seed)
    backbone, feature_dim = build_backbone(args.backbone, dataset.channels, dataset.image_size)
    method = build_method("byol", backbone, feature_dim, dataset.num_classes)
    return method.train(), feature_dim


def memory_format(t: torch.Tensor) -> str:
    """What layout a 4-D tensor is in (rela's backbones and Normalize decide; this script never converts)."""
    if t.dim() != 4:
        return "n/a"
    cl, nchw = t.is_contiguous(memory_format=torch.channels_last), t.is_contiguous()
    return {(True, True): "either (size-1 dims)", (True, False): "channels_last",
            (False, True): "contiguous"}.get((cl, nchw), "strided")


def measure_momentum_forward(args, dataset, views) -> list[float]:
    """(d) BYOL's two momentum forwards (backbone + projection head, no grad, train mode)."""
    method, _ = build_byol(args, dataset)

    def step(i):
        v1, v2 = views[i]
        method._target(v1)
        method._target(v2)

    return timed_loop(step, args.warmup, args.steps)


def timed_training(args, method, extra_modules, loss_of) -> list[float]:
    """Per call: update_momentum, ``loss_of(i)``, backward, AdamW step (the compute of a training step)."""
    params = [p for m in (method, *extra_modules) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    total = args.warmup + args.steps

    def step(i):
        opt.zero_grad(set_to_none=True)
        method.update_momentum(i, total)
        loss_of(i).backward()
        opt.step()

    return timed_loop(step, args.warmup, args.steps)


def measure_byol_compute(args, dataset, views, labels) -> list[float]:
    """BYOL module on prepared views + monitor + backward + AdamW + update_momentum (no data pipeline)."""
    method, feature_dim = build_byol(args, dataset)
    monitor = torch.nn.Linear(feature_dim, dataset.num_classes)

    def loss(i):
        out = method(list(views[i]), labels[i])
        return out.loss + F.cross_entropy(monitor(out.features.detach()), labels[i])

    return timed_training(args, method, (monitor,), loss)


def measure_rela_compute(args, dataset, rela_views, labels, index, targets) -> list[float]:
    """ReLA-phase step on prepared views: 2 backbone fwd+bwd, transfer head, monitor, AdamW, update_momentum."""
    method, feature_dim = build_byol(args, dataset)
    rela = ReLAAccelerator(feature_dim, targets, build_switch("never"))
    monitor = torch.nn.Linear(feature_dim, dataset.num_classes)

    def loss(i):
        v1, v2 = rela_views[i]
        f1, f2 = method.backbone(v1).flatten(1), method.backbone(v2).flatten(1)
        return rela.loss(f1, f2, index[i]) + F.cross_entropy(monitor(f1.detach()), labels[i])

    return timed_training(args, method, (rela, monitor), loss)


def measure_augment(args, dataset, normalize, view_fns, index) -> list[float]:
    """What training_step does before the forward: index the uint8 images, both views, normalise."""
    torch.manual_seed(args.seed)

    @torch.no_grad()
    def step(i):
        x = dataset.images[index[i]]
        for view in view_fns:
            normalize(view(x))

    return timed_loop(step, args.warmup, args.steps)


def measure_bank(args, prior, bank_set) -> dict:
    """(e) rela.bank.extract vs. the prior model on pre-normalised tensors, same batch size."""
    bs = args.bank_batch_size
    ready = [prior.preprocess(bank_set.images[s: s + bs]) for s in range(0, len(bank_set), bs)]
    n = len(bank_set)
    with torch.no_grad():  # warm-up (both batch shapes): first-call allocations and kernel selection
        for x in ready[:1] + ready[-1:]:
            prior(bank_set.images[:len(x)])
            prior.model(x)
    bank_times, bare_times, prep_times, feats = [], [], [], None
    for _ in range(args.bank_repeats):
        t0 = time.perf_counter()
        feats = extract(prior, bank_set, batch_size=bs, device="cpu", progress=False)
        bank_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            for x in ready:
                prior.model(x).flatten(1).float()
        bare_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # the preprocessing alone (T_eval + normalisation), the difference in question
        for start in range(0, n, bs):
            prior.preprocess(bank_set.images[start: start + bs])
        prep_times.append(time.perf_counter() - t0)
    return {"images": n, "batch_size": bs, "bank_seconds": median(bank_times), "bare_seconds": median(bare_times),
            "bank_images_per_s": n / median(bank_times), "bare_images_per_s": n / median(bare_times),
            "preprocess_seconds": median(prep_times),
            "preprocess_share_of_bank": median(prep_times) / median(bank_times),
            "bank_runs_s": bank_times, "bare_runs_s": bare_times, "features": feats}


# --- running the measurements -----------------------------------------------------------

@dataclasses.dataclass
class Inputs:
    """The data every measurement shares, prepared outside every timed region."""
    dataset: object
    bank_set: object
    normalize: Normalize
    index: list[torch.Tensor]
    labels: list[torch.Tensor]
    views: list[tuple]
    rela_views: list[tuple]


def prepare_inputs(args) -> Inputs:
    train_full = load_dataset(args.dataset, "train")
    dataset = train_full.subset(min(args.train_images, len(train_full)))
    normalize = Normalize(dataset.mean, dataset.std, dataset.channels)
    index = batch_indices(len(dataset), args.batch_size, args.warmup + args.steps, args.seed)
    torch.manual_seed(args.seed)
    with torch.no_grad():  # the method's own views, as training_step uses them
        views = [tuple(normalize(v(dataset.images[i])) for v in METHODS["byol"].views) for i in index]
        rela_views = [tuple(normalize(RELA_VIEW(dataset.images[i])) for _ in range(2)) for i in index]
    return Inputs(dataset, train_full.subset(min(args.bank_images, len(train_full))), normalize, index,
                  [dataset.labels[i] for i in index], views, rela_views)


def layouts_of(args, inputs: Inputs) -> dict:
    probe, _ = build_backbone(args.backbone, inputs.dataset.channels, inputs.dataset.image_size)
    weights4d = [p for p in probe.parameters() if p.dim() == 4]
    return {"backbone_conv_weights": sorted({memory_format(p) for p in weights4d}) or ["n/a"],
            "views": memory_format(inputs.views[0][0])}


class Recorder:
    """Step times pooled over rounds, per-round medians and what other processes did meanwhile."""

    def __init__(self, args):
        self.args = args
        self.times: dict[str, list[float]] = {}
        self.round_medians: dict[str, list[float]] = {}
        self.foreign: dict[str, dict] = {}

    def measure(self, key, label, fn):
        """Run ``fn``; re-run it when other processes disturbed it; keep the least disturbed attempt."""
        best = None
        for attempt in range(self.args.retries + 1):
            print(f"  {label} ...", end="", flush=True)
            with ForeignCPU() as mon:
                value = fn()
            print(f" (other processes: {'?' if mon.cores is None else f'{mon.cores:.2f}'} cores)", flush=True)
            cores = float("inf") if mon.cores is None else mon.cores
            if best is None or cores < best[1]:
                best = (value, cores, mon.minor_faults, mon.self_sys_s)
            if mon.cores is None or mon.cores <= self.args.max_foreign or attempt == self.args.retries:
                break
            time.sleep(self.args.retry_wait)
        rec = self.foreign.setdefault(key, {"foreign_cpu_cores": [], "attempts": 0, "minor_page_faults": [],
                                            "own_system_cpu_s": []})
        rec["foreign_cpu_cores"].append(None if best[1] == float("inf") else round(best[1], 3))
        rec["minor_page_faults"].append(best[2])
        rec["own_system_cpu_s"].append(round(best[3], 3))
        rec["attempts"] += attempt + 1
        return best[0]

    def record(self, key, values):
        self.times.setdefault(key, []).extend(values)
        self.round_medians.setdefault(key, []).append(median(values))

    def run(self, key, label, fn):
        self.record(key, self.measure(key, label, fn))

    def run_fit(self, key, label, fn):
        batch, period = self.measure(key, label, fn)
        self.record(key, batch)
        self.record(f"{key}_period", period)


def bank_and_targets(args, inputs: Inputs, rec: Recorder) -> tuple[dict | None, torch.Tensor | None]:
    """(e) first: its bank provides (c)'s targets."""
    dataset, skip = inputs.dataset, set(args.skip)
    prior = build_prior(args.prior, learner_arch=args.backbone, channels=dataset.channels,
                        image_size=dataset.image_size, mean=dataset.mean, std=dataset.std, seed=args.seed + 1)
    bank, raw = None, None
    if "e" not in skip:
        bank = rec.measure("bank", "(e) bank extraction vs. bare prior inference",
                           lambda: measure_bank(args, prior, inputs.bank_set))
        raw = bank.pop("features")
    if "c" in skip and "diag" in skip:
        return bank, None
    if raw is None or len(raw) < len(dataset):  # (c) needs a bank over the training images
        raw = extract(prior, dataset, batch_size=args.bank_batch_size, progress=False)
    raw = raw[:len(dataset)]
    _, feature_dim = build_backbone(args.backbone, dataset.channels, dataset.image_size)
    return bank, transport(raw, min(feature_dim, raw.shape[1])).values


def fit_config(args, **fields) -> TrainConfig:
    return TrainConfig(dataset=args.dataset, backbone=args.backbone, method="byol", batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, epochs=1000, progress=False, probe_every=0, **fields)


def fit_byol(args, inputs: Inputs):
    timer, _ = fit_steps(fit_config(args), inputs.dataset, None, args.warmup, args.steps, args.seed)
    return timer.batch, timer.period


def fit_rela(args, inputs: Inputs, targets):
    cfg = fit_config(args, prior=args.prior, switch="never")
    timer, module = fit_steps(cfg, inputs.dataset, targets, args.warmup, args.steps, args.seed)
    if module.switch_step is not None:
        raise RuntimeError("the switch fired during the ReLA-phase benchmark")
    return timer.batch, timer.period


def run_rounds(args, inputs: Inputs, rec: Recorder, targets) -> None:
    """Rounds interleave all step measurements, so a slow drift of the machine hits them alike."""
    d, n = inputs.dataset, inputs.normalize
    steps = [  # (skip flag, key, label, measurement, is a Lightning fit)
        ("a", "bare", "(a) bare forward+backward", lambda: measure_bare(args, d, n, inputs.views), False),
        ("d", "momentum_forward", "(d) momentum forward", lambda: measure_momentum_forward(args, d, inputs.views), False),
        ("b", "byol", "(b) BYOL step (Lightning fit)", lambda: fit_byol(args, inputs), True),
        ("c", "rela", "(c) ReLA-phase step (Lightning fit)", lambda: fit_rela(args, inputs, targets), True),
        ("diag", "byol_compute", "diag: BYOL compute on prepared views",
         lambda: measure_byol_compute(args, d, inputs.views, inputs.labels), False),
        ("diag", "rela_compute", "diag: ReLA compute on prepared views",
         lambda: measure_rela_compute(args, d, inputs.rela_views, inputs.labels, inputs.index, targets), False),
        ("diag", "augment_byol", "diag: index + BYOL views + normalise",
         lambda: measure_augment(args, d, n, METHODS["byol"].views, inputs.index), False),
        ("diag", "augment_rela", "diag: index + 2 ReLA views + normalise",
         lambda: measure_augment(args, d, n, (RELA_VIEW, RELA_VIEW), inputs.index), False),
    ]
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f" round {r + 1}/{args.rounds}", flush=True)
        for flag, key, label, fn, is_fit in steps:
            if flag not in args.skip:
                (rec.run_fit if is_fit else rec.run)(key, label, fn)


# --- results ---------------------------------------------------------------------------

def ratios_of(g) -> dict:
    """The ratios of the docstring from ``g(key)`` -> median seconds (None where not measured)."""
    def ratio(num, den):
        return num / den if num is not None and den else None

    def overhead(num, den):
        q = ratio(num, den)
        return None if q is None else q - 1

    both = g("bare") + g("momentum_forward") if g("bare") and g("momentum_forward") else None
    return {
        "c_over_b": ratio(g("rela"), g("byol")),
        "c_over_b_period": ratio(g("rela_period"), g("byol_period")),
        "pipeline_overhead": overhead(g("byol"), both),
        "pipeline_overhead_vs_compute": overhead(g("byol"), g("byol_compute")),
        "rela_overhead_vs_compute": overhead(g("rela"), g("rela_compute")),
        "compute_c_over_b": ratio(g("rela_compute"), g("byol_compute")),
    }


def derived_of(med: dict) -> dict:
    derived = {}
    if all(k in med for k in ("byol_compute", "bare", "momentum_forward")):
        derived["byol_heads_monitor_ema_s"] = med["byol_compute"] - med["bare"] - med["momentum_forward"]
    if "byol" in med and "byol_compute" in med:
        derived["byol_pipeline_and_lightning_s"] = med["byol"] - med["byol_compute"]
    if "byol" in med and "augment_byol" in med:
        derived["augment_share_of_byol_step"] = med["augment_byol"] / med["byol"]
    if "rela" in med and "augment_rela" in med:
        derived["augment_share_of_rela_step"] = med["augment_rela"] / med["rela"]
    return derived


def ratio_ranges(rec: Recorder, rounds: int) -> dict:
    """Each ratio's [min, max] over the rounds' own medians."""
    per_round = [ratios_of(lambda k, i=i: rec.round_medians[k][i] if k in rec.round_medians else None)
                 for i in range(rounds)]
    return {k: [min(vals), max(vals)] for k in per_round[0] if (vals := [pr[k] for pr in per_round if pr[k] is not None])}


DEFINITIONS = {
    "bare": "(a) backbone fwd on 2 prepared normalised views, loss = mean of features, backward, AdamW step",
    "byol": "(b) Lightning fit batch: ReLAModule.training_step (index, 2 method.views, normalise, BYOL fwd "
            "incl. momentum fwd, update_momentum, monitor) + backward + AdamW + LR scheduler; "
            "on_train_batch_start -> on_train_batch_end",
    "rela": "(c) same fit with prior -> bank -> targets and switch 'never' (ReLA phase only)",
    "byol_period / rela_period": "start-to-start interval of consecutive batches in the fit (adds data "
                                 "fetch, logging, module.on_train_batch_end incl. the switch update)",
    "momentum_forward": "(d) 2 x (momentum backbone + momentum projection head), no grad, train mode",
    "pipeline_overhead": "byol / (bare + momentum_forward) - 1; the denominator leaves out BYOL's "
                         "projection/prediction heads (online fwd+bwd), the monitor, update_momentum and "
                         "Lightning, so those count as overhead here",
    "pipeline_overhead_vs_compute": "byol / byol_compute - 1: byol_compute = BYOL module fwd on prepared "
                                    "views (heads + momentum fwd) + monitor + backward + AdamW + "
                                    "update_momentum; what remains is augmentation, indexing, "
                                    "normalisation and Lightning",
    "rela_overhead_vs_compute": "rela / rela_compute - 1, the same split for the ReLA phase",
    "augment_byol / augment_rela": "index uint8 batch + both views + normalise, no grad",
    "byol_heads_monitor_ema_s": "byol_compute - bare - momentum_forward: BYOL projection/prediction "
                                "heads (fwd+bwd), monitor, update_momentum, AdamW on the heads",
    "byol_pipeline_and_lightning_s": "byol - byol_compute: indexing, augmentation, normalisation, "
                                     "Lightning's loop and logging",
    "bank_vs_bare_inference": "bank extraction images/s / bare prior-model images/s on pre-normalised "
                              "tensors (same batch size); bank.preprocess_share_of_bank times the "
                              "preprocessing alone, which is the whole difference between the two",
}
NOTES = {
    "malloc_note": "tuned: mallopt(M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=2 GiB, M_MMAP_MAX=0) before "
                   "measuring, so freed activations stay mapped (no per-step page faults); plain: glibc "
                   "defaults",
    "foreign_cpu_note": "foreign_cpu: CPU cores used by other processes during each measurement and "
                        "round (/proc/stat minus this process); > ~0.1 means the timing is disturbed; "
                        "minor_page_faults / own_system_cpu_s: this process's, over the whole measurement "
                        "(warm-up steps and setup included)",
}


def environment_of(load_start, wall0: float) -> dict:
    return {
        "torch": torch.__version__, "lightning": L.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
        **NOTES, "wall_seconds": time.perf_counter() - wall0,
    }


def build_result(args, inputs: Inputs, rec: Recorder, bank, run_info: dict) -> dict:
    med = {k: median(v) for k, v in rec.times.items()}
    ratios = ratios_of(med.get)
    ratios["bank_vs_bare_inference"] = (bank["bank_images_per_s"] / bank["bare_images_per_s"]) if bank else None
    return {
        "benchmark": "step_cost",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "config": {"backbone": args.backbone, "dataset": args.dataset, "batch_size": args.batch_size,
                   "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                   "train_images": len(inputs.dataset), "prior": args.prior, "lr": args.lr, "seed": args.seed,
                   "bank_images": len(inputs.bank_set), "malloc": args.malloc,
                   "mallopt_applied": run_info["mallopt_applied"], "layouts": layouts_of(args, inputs)},
        "medians_s": med,
        "per_step_s": {k: spread(v) for k, v in rec.times.items()},
        "ratios": ratios,
        "ratio_range_over_rounds": ratio_ranges(rec, args.rounds),
        "derived": derived_of(med),
        "round_medians_s": rec.round_medians,
        "bank": bank,
        "foreign_cpu": rec.foreign,
        "expected": {"c_over_b": "<= 0.8", "pipeline_overhead": "< 0.15"},
        "definitions": DEFINITIONS,
        "environment": environment_of(run_info["load_start"], run_info["wall0"]),
    }


def set_up_process(args) -> bool:
    """Quiet Lightning, threads, allocator, an idle machine; returns whether mallopt was applied."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    mallopt_applied = keep_freed_memory() if args.malloc == "tuned" else False
    wait_for_idle(args.wait_idle, args.max_load)
    return mallopt_applied


def main(argv=None) -> dict:
    args = parse_args(argv)
    run_info = {"mallopt_applied": set_up_process(args), "load_start": os.getloadavg(), "wall0": time.perf_counter()}
    torch.manual_seed(args.seed)
    inputs = prepare_inputs(args)
    rec = Recorder(args)
    print(f"backbone {args.backbone}, batch {args.batch_size}, {args.rounds} round(s) of {args.warmup} warm-up + "
          f"{args.steps} timed steps, {torch.get_num_threads()} threads, load {run_info['load_start'][0]:.2f}",
          flush=True)
    bank, targets = bank_and_targets(args, inputs, rec)
    run_rounds(args, inputs, rec, targets)
    result = build_result(args, inputs, rec, bank, run_info)
    print_table(result)
    if not args.no_save:
        save_json(result, args.results / "step_cost.json")
        print(f"wrote {args.results / 'step_cost.json'}")
    return result


def print_table(r: dict) -> None:
    med, ps = r["medians_s"], r["per_step_s"]
    names = [("bare", "(a) bare fwd+bwd, 2 prepared views"), ("momentum_forward", "(d) momentum forward x2"),
             ("byol", "(b) BYOL step, Lightning"), ("byol_period", "    BYOL step-to-step period"),
             ("rela", "(c) ReLA-phase step, Lightning"), ("rela_period", "    ReLA step-to-step period"),
             ("byol_compute", "diag: BYOL compute, prepared views"),
             ("rela_compute", "diag: ReLA compute, prepared views"),
             ("augment_byol", "diag: index+augment+normalise, BYOL"),
             ("augment_rela", "diag: index+augment+normalise, ReLA")]
    fc = r["foreign_cpu"]
    per_run = r["config"]["warmup"] + r["config"]["steps"]
    print(f"\n{'measurement':40s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s} {'other cores':>12s} "
          f"{'faults/step':>12s}")
    for key, label in names:
        if key in med and ps[key]["n"]:  # --steps 1 leaves no step-to-step period
            s = ps[key]
            other = [c for c in fc.get(key, {}).get("foreign_cpu_cores", []) if c is not None]
            other = f"{max(other):.2f}" if other else ""  # the worst round
            faults = [f for f in fc.get(key, {}).get("minor_page_faults", []) if f is not None]
            faults = f"{median(faults) / per_run:.0f}" if faults else ""
            print(f"{label:40s} {1e3 * s['median']:10.1f} {1e3 * s['min']:8.1f} {1e3 * s['max']:8.1f} {other:>12s} "
                  f"{faults:>12s}")
    if r["bank"]:
        b = r["bank"]
        print(f"\n(e) bank extraction {b['bank_images_per_s']:9.0f} img/s   bare prior inference "
              f"{b['bare_images_per_s']:9.0f} img/s   ({b['images']} images, batch {b['batch_size']}); "
              f"preprocessing alone {1e3 * b['preprocess_seconds']:.0f} ms = "
              f"{100 * b['preprocess_share_of_bank']:.1f} % of the extraction")
    d = r["derived"]
    if "byol_heads_monitor_ema_s" in d:
        print(f"\nBYOL step split: backbone fwd+bwd (a) {1e3 * med['bare']:.0f} ms + momentum fwd (d) "
              f"{1e3 * med['momentum_forward']:.0f} ms + heads/monitor/EMA {1e3 * d['byol_heads_monitor_ema_s']:.0f} ms"
              + (f" + pipeline/Lightning {1e3 * d['byol_pipeline_and_lightning_s']:.0f} ms"
                 if "byol_pipeline_and_lightning_s" in d else ""))
    print()
    spread = r["ratio_range_over_rounds"]
    for k, v in r["ratios"].items():
        exp = r["expected"].get(k, "")
        several = r["config"]["rounds"] > 1 and k in spread
        rng = f"rounds {spread[k][0]:6.3f} .. {spread[k][1]:6.3f}" if several else ""
        print(f"{k:30s} {'n/a' if v is None else f'{v:.3f}':>7s}  {rng:26s} {('expected ' + exp) if exp else ''}")
    env = r["environment"]
    print(f"\ntorch {env['torch']}, {env['threads']} threads, load average at start "
          f"{env['load_average_start'][0]:.2f}, wall {env['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
