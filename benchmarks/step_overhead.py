"""The framework's cost of a training step: rela's step against a bare PyTorch step, on a tiny network on CPU.

With a network this small (``tiny``: a 4-8-16 convnet, BYOL heads 32 wide, 16 x 16 images, batch 16)
the arithmetic is negligible and a step's time is what the framework around it does: Python, Lightning,
the augmentations' launches, host-device syncs. That is what leaves a GPU idle, so this CPU proxy tracks
it where no GPU is at hand (issue 26). Per phase (``rela``: random prior, switch ``never``; ``byol``: no
prior) it reports per step:

- ``ms``: median CPU time of the process per step, start to start of consecutive batches (so the data
  fetch, the logging and the loop's own hooks count), over ``--steps`` steps after ``--warmup``; CPU time,
  not wall time, because on a shared machine a step's wall time mostly measures the neighbours (one torch
  thread: the step's CPU time is its work). ``wall_ms``: the same in wall time;
- ``bare_ms`` and ``ratio``: the same network, optimizer (AdamW, PyTorch's default) and loss in a plain
  loop on views made beforehand (no augmentation, no Lightning), and rela's time over it;
- ``bare_aug_ms`` and ``aug_ratio``: the plain loop again, making each step's views inside the step as rela
  does (``augment_views``, then normalised), and rela's time over it: what is left is the framework's
  (Lightning's loop, hooks, logging, the switch, the budget counters), the augmentation's own work aside;
- ``syncs``: ``aten::item`` + ``aten::_local_scalar_dense`` calls per step (each a host-device
  synchronisation on CUDA), and ``ops``: aten operators per step, from ``--profile-steps`` steps each
  profiled on its own, leaving out the steps that log (``--log-every``).

rela's step runs through :func:`rela.train.train` as users run it (CSV logger, checkpoints, no progress
bar). ``--label before|after`` stores the figures under that label in ``step_overhead.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightly.models.utils import update_momentum
from lightly.utils.scheduler import cosine_schedule
from lightning.pytorch.callbacks import Callback
from torch.profiler import ProfilerActivity, profile

from common import ResultsFile, add_output_args, command, config, environment, median, table_head, write_report
from rela.backbones import _convnet
from rela.build import prepare
from rela.data import Normalize
from rela.data.augment import augment_views
from rela.registry import BACKBONES
from rela.train import train

BACKBONE = "tiny"
try:  # a registered backbone, so rela train builds it like any other
    BACKBONES.register(BACKBONE, help="4-8-16 convnet (benchmarks/step_overhead.py)")(
        lambda in_chans: _convnet(in_chans, widths=(4, 8, 16)))
except ValueError:  # this module imported a second time
    pass

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense")
PHASES = {"rela": {"prior": "random", "switch": "never"}, "byol": {"prior": "none"}}


def run_config(phase: str, args, folder: Path):
    steps = args.warmup + args.steps + args.profile_steps
    # one epoch holds every measured step: no epoch-end checkpoint or probe inside the window
    return config(dataset=f"synthetic:{(steps + 1) * args.batch_size}", backbone=BACKBONE, method="byol",
                  hidden_dim=32, batch_size=args.batch_size, epochs=1, max_steps=steps, accelerator="cpu",
                  precision="32-true", probe_every=0, progress=False, log_every=args.log_every, seed=0,
                  out=str(folder / phase), cache_dir=str(folder / "cache"), **PHASES[phase])


def _inside_fused_optimizer(event) -> bool:
    while (event := event.cpu_parent) is not None:
        if event.name.startswith("aten::_fused_adam"):
            return True
    return False


def count(prof) -> tuple[int, int]:
    """(host syncs, aten operators) recorded by a profiler.

    The fused optimizers' CPU kernels read each parameter's step count with ``item()`` from host memory;
    their CUDA kernels read it on the device, so those reads are no syncs and are not counted.
    """
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    syncs = [e for e in events if e.name in SYNC_OPS and not _inside_fused_optimizer(e)]
    return len(syncs), len(events)


class StepProbe(Callback):
    """Start-to-start times of the steps after ``warmup``, then each of ``profiled`` steps profiled alone."""

    def __init__(self, warmup: int, timed: int, log_every: int):
        self.warmup, self.timed, self.log_every = warmup, timed, log_every
        self.times: list[tuple[float, float]] = []  # (wall, CPU) seconds per step
        self.counts: list[tuple[int, int]] = []
        self._start, self._prof, self._step = None, None, -1

    def _close(self) -> None:
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            # a step that logs (either rule: rela's step % log_every, Lightning's (step + 1) % log_every)
            if self._step % self.log_every and (self._step + 1) % self.log_every:
                self.counts.append(count(self._prof))
            self._prof = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        now = (time.perf_counter(), time.process_time())
        self._close()
        step = trainer.global_step
        if self.warmup < step <= self.warmup + self.timed:
            self.times.append((now[0] - self._start[0], now[1] - self._start[1]))
        if step >= self.warmup + self.timed:
            self._prof, self._step = profile(activities=[ProfilerActivity.CPU]), step
            self._prof.__enter__()
        self._start = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, trainer, module) -> None:
        self._close()  # before the epoch's checkpoint (Lightning runs checkpoint callbacks after the others)


def bare_step(phase: str, args, folder: Path, augment: bool = False):
    """The plain-PyTorch step on the same networks (built by rela from the same config), views made beforehand,
    or inside the step (``augment``) by the augmentation rela's step runs."""
    run = prepare(run_config(phase, args, folder))
    method, rela = run.method.train(), run.rela
    params = [p for m in (method, rela) if m is not None for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    total = args.warmup + args.steps
    normalize = Normalize(run.train_set.mean, run.train_set.std, run.train_set.channels)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(total):
        index = torch.randperm(len(run.train_set.labels), generator=g)[:args.batch_size]
        x = run.train_set.images[index]
        views = (rela.view, rela.view) if rela is not None else tuple(method.views)
        made = None if augment else [normalize(v) for v in augment_views(views, x)]
        batches.append((index, run.train_set.labels[index], x, views, made))

    def step(i: int) -> None:
        index, y, x, views, made = batches[i]
        v0, v1 = made or [normalize(v) for v in augment_views(views, x)]
        opt.zero_grad(set_to_none=True)
        if rela is not None:
            loss = rela.loss(method.backbone(v0).flatten(1), method.backbone(v1).flatten(1), index)
        else:
            m = cosine_schedule(i, total, 0.99, 1.0)
            update_momentum(method.backbone, method.backbone_momentum, m)
            update_momentum(method.projection_head, method.projection_head_momentum, m)
            loss = method([v0, v1], y).loss
        loss.backward()
        opt.step()

    times = []
    for i in range(total):
        start = (time.perf_counter(), time.process_time())
        step(i)
        times.append((time.perf_counter() - start[0], time.process_time() - start[1]))
    return times[args.warmup:]


def measure(phase: str, args, folder: Path) -> dict:
    probe = StepProbe(args.warmup, args.steps, args.log_every)
    metrics = train(run_config(phase, args, folder), callbacks=[probe])
    if phase == "rela" and metrics["switch_step"] is not None:
        raise RuntimeError("the switch fired during the ReLA-phase measurement")
    bare, bare_aug = bare_step(phase, args, folder), bare_step(phase, args, folder, augment=True)
    ms, bare_ms, bare_aug_ms = (1e3 * median([t[1] for t in times]) for times in (probe.times, bare, bare_aug))
    wall_ms, bare_wall_ms = (1e3 * median([t[0] for t in times]) for times in (probe.times, bare))
    n = max(len(probe.counts), 1)
    return {"phase": phase, "ms": ms, "bare_ms": bare_ms, "ratio": ms / bare_ms, "wall_ms": wall_ms,
            "bare_wall_ms": bare_wall_ms, "bare_aug_ms": bare_aug_ms, "aug_ratio": ms / bare_aug_ms,
            "syncs": sum(c[0] for c in probe.counts) / n, "ops": sum(c[1] for c in probe.counts) / n,
            "profiled_steps": len(probe.counts), "timed_steps": len(probe.times)}


def report(results: ResultsFile, path: Path) -> None:
    lines = ["# Step overhead: rela's training step vs a bare PyTorch step (tiny network, CPU)", "",
             "Per step: median CPU ms (start to start), the bare step's, their ratio, median wall ms of both, host syncs "
             "(aten::item + _local_scalar_dense) and aten operators, steady state, log steps left out. "
             "The bare step: the same networks, loss and AdamW (PyTorch's default) on views made beforehand, "
             "no augmentation, no Lightning. Reads of the step count inside the fused AdamW's CPU kernel "
             "are not counted (its CUDA kernel reads it on the device).", "",
             "Bare + aug: the bare loop making its views inside the step with rela's augmentation "
             "(`augment_views`); rela's time over it is the framework's share alone (rows measured before "
             "this column existed show -).", "",
             *table_head("label", "phase", "CPU ms", "bare CPU ms", "ratio", "bare + aug CPU ms", "ratio to it",
                         "wall ms (bare)", "syncs/step", "aten ops/step")]
    for r in results.runs:
        aug = (f"{r['bare_aug_ms']:.2f} | {r['aug_ratio']:.2f}" if "bare_aug_ms" in r else "- | -")
        lines.append(f"| {r['label']} | {r['phase']} | {r['ms']:.2f} | {r['bare_ms']:.2f} | {r['ratio']:.2f} | {aug} "
                     f"| {r['wall_ms']:.1f} ({r['bare_wall_ms']:.1f}) | {r['syncs']:.1f} | {r['ops']:.0f} |")
    lines += ["", results.commands_shown(), f"torch {results.meta['torch']}, {results.meta['threads']} thread(s)"]
    write_report(lines, path.with_suffix(".md"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", default="after", help="what the figures are stored under (before | after | ...)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=40, help="timed steps per phase")
    p.add_argument("--profile-steps", type=int, default=25, help="steps profiled (those that log are left out)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="step_overhead", help="results file name (without suffix)")
    add_output_args(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = ResultsFile(args.results / f"{args.name}.json", meta={"env": environment()},
                          command=command(__file__, sys.argv[1:] if argv is None else list(argv)))
    results.runs = [r for r in results.runs if r["label"] != args.label]  # a label measured again replaces its rows
    with tempfile.TemporaryDirectory() as tmp:
        for phase in PHASES:
            results.add({"label": args.label, **measure(phase, args, Path(tmp))})
    report(results, args.results / f"{args.name}.json")
    return {"meta": results.meta, "runs": results.runs}


if __name__ == "__main__":
    main()
