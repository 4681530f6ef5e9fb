"""Training, top to bottom: build the run (:func:`rela.build.prepare`) -> Lightning fit -> outputs.

:func:`train` resolves every input first (dataset, backbone, prior, bank), so a
bad name fails before the output folder exists; then it fits a
:class:`ReLAModule` with Lightning and writes ``config.yaml``, ``backbone.pt``
and ``metrics.json`` (budget: optimizer steps, images seen, seconds, switch step).
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightly.utils.dist import rank as dist_rank
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
from torch.utils.data import BatchSampler, DataLoader

from rela.accelerator import Progress, ReLAAccelerator
from rela.build import prepare, workers
from rela import console
from rela.callbacks import KNNMonitor, ProgressBar, StepMetrics
from rela.config import TrainConfig
from rela.console import console_scope
from rela.data import DynamicSubsetSampler, ImageDataset, Normalize
from rela.data.augment import augment_views
from rela.data.stream import StreamBatches, StreamSet, in_memory
from rela.data.subset import LossRecord, RandomRule, SubsetRule
from rela.distributed import SyncBatchNorm
from rela.errors import RelaError
from rela.flops import run_flops, step_flops_per_image
from rela.hardware import keep_freed_memory, release_freed_memory
from rela.io import (atomic_write, check_writable, load_json, load_torch, remove_stale_temp_files, save_json,
                     save_torch, save_yaml)
from rela.loggers import build_logger, close_logger
from rela.methods import Method
from rela.priors import BACKBONE_FILE_FORMAT
from rela.schedules import lr_factor

# Test hook: seconds to pause inside every checkpoint write, after the temporary file is written and
# before it replaces last.ckpt, so benchmarks/kill_resume.py can land a SIGKILL mid-write.
CHECKPOINT_DELAY_ENV = "RELA_DEBUG_CHECKPOINT_DELAY"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written through :func:`rela.io.atomic_write`: a kill mid-write leaves the previous one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        delay = float(os.environ.get(CHECKPOINT_DELAY_ENV) or 0)

        def write(f) -> None:
            torch.save(checkpoint, f)
            if delay:
                f.flush()
                time.sleep(delay)

        atomic_write(path, write)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        """Always ``weights_only``: what rela writes is tensors and plain values (:func:`rela.io.load_torch`),
        and a ``last.ckpt`` from someone else's run folder must not run code on ``--resume``."""
        checkpoint = load_torch(path, "checkpoint")
        if not isinstance(checkpoint, dict):
            raise RelaError(f"cannot resume from {path}: not a checkpoint of 'rela train'")
        return checkpoint


class ReLAModule(L.LightningModule):
    """A base method, optionally accelerated by ReLA, plus the online linear monitor."""

    def __init__(self, cfg: TrainConfig, method: Method, rela: ReLAAccelerator | None, dataset: ImageDataset,
                 subset: SubsetRule | None = None):
        super().__init__()
        self.cfg, self.method, self.rela = cfg, method, rela
        self.subset = subset or RandomRule()
        # the subset rule "loss" draws from every image's last loss, recorded on the device at each step
        self.loss_record = LossRecord(len(dataset)) if self.subset.needs_losses else None
        if self.loss_record is not None:
            self.subset.losses = self.loss_record
        self._weights: tuple[torch.Tensor, torch.Tensor] | None = None  # (the sampler's, on the device)
        # Labels train this classifier for monitoring only: its input is detached. Unlabelled data: no monitor.
        self.monitor = nn.Linear(method.feature_dim, dataset.num_classes) if dataset.num_classes else None
        self.normalize = Normalize(dataset.mean, dataset.std, dataset.channels)
        self.num_samples, self.stream = len(dataset), None
        if isinstance(dataset, StreamSet):  # stream mode: workers decode (and augment: --augment-on workers)
            if cfg.switch_aug_at != "step" and cfg.augment_on == "workers":
                raise RelaError("--switch-aug-at epoch needs the views made on the training device (stream-mode "
                                "workers make the method's views); use --augment-on device or --switch-aug-at step")
            self.stream = StreamBatches(dataset, rela.view if rela is not None else None, method.views,
                                        seed=cfg.seed, workers=workers(cfg), prefetch=cfg.prefetch_factor,
                                        pin_memory=True, augment_on=cfg.augment_on)
        else:  # the whole (small) dataset rides along to the training device; batches are index tensors
            self.register_buffer("images", dataset.images, persistent=False)
            self.register_buffer("labels", dataset.labels, persistent=False)
        # rela_phase_images / method_phase_images: images of the steps that ran the ReLA loss / the method's
        # loss (a soft hand-over runs both), what the FLOP count in metrics.json multiplies (rela.flops).
        self.budget = {"steps": 0, "images_seen": 0, "train_seconds": 0.0, "rela_phase_images": 0,
                       "method_phase_images": 0}
        self.history: list[dict] = []
        self._batch_start = 0.0
        self._batch_images, self._batch_lam = 0, 0.0
        # Lightning builds the loader before it restores its own loop state, so its stateful-loader
        # hook never reaches ours; the sampler's position rides in the checkpoint as rela_sampler.
        self._sampler: DynamicSubsetSampler | None = None
        self._sampler_state: dict | None = None
        self.wall_start = time.perf_counter()
        self.wall_before = 0.0  # wall seconds spent by earlier processes of a resumed run
        self.ssl_start_epoch: int | None = None  # epoch of the first step with the base method's loss
        self.views_used: tuple = ()  # the augmentations of the last base-method step (see ssl_views)
        self.bar: dict[str, float] = {}  # what the progress bar shows (rela.callbacks.ProgressBar)
        self._bad_step: torch.Tensor | None = None  # the first step whose loss was not finite (watch_finite)
        self._bad_loss: torch.Tensor | None = None

    # --- data -------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        sampler = DynamicSubsetSampler(self.num_samples, self.cfg.ratio, self.cfg.seed,
                                       rank=self.global_rank, world_size=self.trainer.world_size,
                                       rule=self.subset, epochs=self.cfg.epochs)
        if self._sampler_state is not None:  # resuming: skip what the checkpointed run already trained on
            sampler.load_state_dict(self._sampler_state)
        self._sampler, self._sampler_state = sampler, None
        batch_size = min(self.cfg.batch_size, len(sampler))
        if batch_size < self.cfg.batch_size:
            console.warn(f"the subset per epoch and rank holds {len(sampler)} images; batch size "
                         f"lowered from {self.cfg.batch_size} to {batch_size}")
        if self.stream is not None:
            return self.stream.loader(sampler, batch_size)
        batches = BatchSampler(sampler, batch_size, drop_last=True)
        # An own generator: making an iterator would otherwise draw from the global RNG, which the
        # augmentations use, and a mid-epoch resume (one extra iterator) would then diverge.
        return DataLoader(range(self.num_samples), batch_sampler=batches, collate_fn=torch.tensor,
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    def batch_views(self, batch):
        """(index, labels, k -> k-th ReLA view, () -> the method's views) of a batch, or None (nothing decoded).

        Memory mode, and stream mode with ``--augment-on device``, augment on the device, lazily, in the
        order the step asks (the same draws in both modes); with ``--augment-on workers`` the views come
        augmented from the workers.
        """
        parts = (batch, self.labels[batch], self.images[batch]) if self.stream is None else self.stream.split(batch)
        if parts is None:
            return None
        if self.stream is None or self.stream.augment_on == "device":
            index, y, x = parts

            def method_views() -> list[torch.Tensor]:
                self.views_used = self.ssl_views()
                return augment_views(self.views_used, x)

            rela_views: list[torch.Tensor] = []

            def rela_view(k: int) -> torch.Tensor:  # both views made together, when the first is asked for
                if not rela_views:
                    rela_views.extend(augment_views((self.rela.view,) * 2, x))
                return rela_views[k]

            return index, y, rela_view, method_views
        index, y, rela_views, method_views = parts
        return index, y, rela_views.__getitem__, lambda: method_views

    # --- one step ---------------------------------------------------------------------
    def progress(self) -> Progress:
        """The coming optimizer step, of the steps this run takes (what the switch and momentum follow)."""
        return Progress(self.global_step, int(self.trainer.estimated_stepping_batches), self.current_epoch,
                        self.trainer.max_epochs)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        # Nothing here reads a device value on the host (a GPU would idle while the host waits), except on
        # the steps that log: lambda comes from the switch's host view, the switch and the non-finite check
        # update device tensors, and the logged values are made and read only on those steps.
        parts = self.batch_views(batch)
        if parts is None:
            return None
        index, y, rela_view, method_views = parts
        progress = self.progress()
        step = progress.step
        lam = self.rela.switch.weight(progress) if self.rela is not None else 0.0
        momentum = self.method.update_momentum(*self.momentum_clock(progress, lam))  # in the ReLA phase too (spec step 4)
        loss, rela_loss, method_loss = 0.0, None, None
        weights, per_sample = self.batch_weights(index), self.loss_record is not None
        if lam > 0:  # ReLA phase: two cheap views regressed onto the prior's targets
            rela_loss, features = self.rela.step_loss(self.method.backbone, rela_view, index, self.normalize,
                                                      per_sample=per_sample or weights is not None)
            if rela_loss.dim():  # each image's: recorded for the subset rule, weighted by it
                self.record_losses(index, rela_loss, phase=0)
                rela_loss = _weighted_mean(rela_loss, weights)
            loss = lam * rela_loss
        if lam < 1:  # the method's loss, on its own views (or ReLA's until the epoch ends: --switch-aug-at epoch)
            out = self.method.step_loss(method_views(), y, self.normalize)
            method_loss = out.loss
            if out.per_sample is not None and (per_sample or weights is not None):
                self.record_losses(index, out.per_sample, phase=1)
                method_loss = _weighted_mean(out.per_sample, weights)
            loss, features = loss + (1 - lam) * method_loss, out.features
        monitor_loss, logits = self.monitor_step(features, y)
        self.watch_finite(loss.detach(), step)
        if self.rela is not None:
            # Every rank must take the same decision: the switch sees the loss averaged over ranks.
            mean_loss = None if rela_loss is None else self.all_gather(rela_loss.detach()).float().mean()
            self.rela.switch.step(lam, mean_loss, progress)
        if self.logs_at(step):
            self.check_finite()
            # A phase's loss not computed this step is logged as NaN: Lightning would repeat its last value.
            logs = {"lambda": lam, "method_loss": math.nan if method_loss is None else method_loss.detach()}
            if logits is not None:
                logs["monitor_acc"] = (logits.argmax(1) == y).float().mean()
            if momentum is not None:
                logs["momentum"] = momentum
            if self.rela is not None:
                logs["rela_loss"] = math.nan if rela_loss is None else rela_loss.detach()
                logs.update(self.rela.switch.metrics())  # e.g. rho, after this step's loss went in
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False, on_step=True, on_epoch=False)
            self.log("loss", loss.detach(), on_step=True, on_epoch=False)
            self.bar["loss"] = float(loss.detach())  # the progress bar shows the loss as of the last step that logged
        self._batch_images, self._batch_lam = len(index), lam
        return loss + monitor_loss

    def monitor_step(self, features: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | None]:
        """The online linear monitor's loss on detached features, and its logits; (0, None) without labels."""
        if self.monitor is None:
            return 0.0, None
        logits = self.monitor(features.detach().float())
        return F.cross_entropy(logits, y), logits

    def logs_at(self, step: int) -> bool:
        """Whether step ``step`` writes a log row: Lightning's rule (rows at steps log_every - 1, 2 log_every - 1, ...)."""
        every = self.trainer.log_every_n_steps
        return every > 0 and (step + 1) % every == 0

    def watch_finite(self, loss: torch.Tensor, step: int) -> None:
        """Remember, on the device, the first step whose loss is not finite (:meth:`check_finite` raises)."""
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_loss = torch.zeros((), dtype=torch.float64, device=loss.device)
        first = (self._bad_step < 0) & ~torch.isfinite(loss)
        self._bad_step.copy_(torch.where(first, step, self._bad_step))
        self._bad_loss.copy_(torch.where(first, loss.double(), self._bad_loss))

    def check_finite(self) -> None:
        """Stop the run if a loss went non-finite: on the steps that log, at epoch ends and before every
        checkpoint, so the last checkpoint written is the last good one."""
        if self._bad_step is not None and int(self._bad_step) >= 0:
            raise RelaError(f"the training loss became {float(self._bad_loss)} at step {int(self._bad_step)}; "
                            "lower --lr (the last good checkpoint is kept)")

    def batch_weights(self, index: torch.Tensor) -> torch.Tensor | None:
        """The loss weights of a batch's images under this epoch's subset draw (None: all 1, the random rule)."""
        weights = None if self._sampler is None else self._sampler.weights
        if weights is None:
            return None
        if self._weights is None or self._weights[0] is not weights:  # once per epoch, not per step
            self._weights = (weights, weights.to(self.device, non_blocking=True))
        return self._weights[1][index.to(self.device)]

    def record_losses(self, index: torch.Tensor, losses: torch.Tensor, phase: int) -> None:
        """Keep each image's last loss for the subset rule ``loss``; every rank keeps the whole batch's, so all
        ranks hold the same record and draw the same subsets."""
        if self.loss_record is None:
            return
        if self.trainer.world_size > 1:
            index, losses = self.all_gather(index).flatten(), self.all_gather(losses.detach()).flatten()
        self.loss_record.record(index.to(self.device), losses, phase)

    def momentum_clock(self, progress: Progress, lam: float) -> tuple[int, int]:
        """(step, of steps) the momentum schedule follows: the run's, or with ``momentum_after_switch:
        restart`` the steps since the base method's loss began, so its momentum networks warm up again."""
        if self.cfg.momentum_after_switch == "restart" and self.rela is not None and lam < 1:
            start = self.rela.switch.method_start_step
            start = progress.step if start < 0 else start  # this step is the first with the method's loss
            return progress.step - start, progress.total_steps - start
        return progress.step, progress.total_steps

    def ssl_views(self) -> tuple:
        """The augmentations of a step with the base method's loss: the method's own views, except
        with ``switch_aug_at: epoch`` for the rest of the epoch of the hand-over, which keeps ReLA's
        (the authors' code swaps the data set's transform, which its loader workers see next epoch)."""
        if self.ssl_start_epoch is None:
            self.ssl_start_epoch = self.current_epoch
        if self.cfg.switch_aug_at == "epoch" and self.rela is not None and self.ssl_start_epoch == self.current_epoch:
            return (self.rela.view,) * len(self.method.views)
        return self.method.views

    def on_train_epoch_end(self) -> None:
        self.check_finite()

    def on_train_end(self) -> None:
        self.check_finite()

    def on_train_epoch_start(self) -> None:
        release_freed_memory()  # the heap's holes from the previous epoch (rela.hardware.keep_freed_memory)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # The budget is counted here, not in on_train_batch_end: Lightning runs the callbacks'
        # on_train_batch_end (the mid-epoch checkpoint) before the module's, and a checkpoint must
        # hold the budget of the step it follows (the switch has seen that step in training_step).
        self.budget["train_seconds"] += time.perf_counter() - self._batch_start
        self.budget["steps"] += 1
        images = self._batch_images * self.trainer.world_size
        self.budget["images_seen"] += images
        self.budget["rela_phase_images"] += images * (self._batch_lam > 0)
        self.budget["method_phase_images"] += images * (self._batch_lam < 1)

    # --- optimisation -----------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]  # a frozen transfer head is not among them
        # fused: one kernel for all the parameters and no read of the step count on the host, where the
        # default (foreach) reads it per step (a sync on a GPU); measured in benchmarks/step_overhead.py
        fused = self.device.type in _get_fused_kernels_supported_devices()
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, fused=fused or None)
        total = max(int(self.trainer.estimated_stepping_batches), 1)  # over the steps this run actually takes
        factor = lr_factor(self.cfg.lr_schedule, total=total, warmup=int(self.cfg.warmup * total))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- checkpoint extras ------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # never a checkpoint of weights trained on a non-finite loss
        checkpoint["rela_budget"] = dict(self.budget)
        checkpoint["rela_history"] = list(self.history)
        checkpoint["rela_wall_seconds"] = self.wall_seconds()
        checkpoint["rela_ssl_start_epoch"] = self.ssl_start_epoch
        if self._sampler is not None:
            checkpoint["rela_sampler"] = self._sampler.state_dict()
            if self.stream is not None:  # workers run ahead of training: the position of the last trained batch
                checkpoint["rela_sampler"]["consumed"] = self.stream.position
        # Augmentations draw from the global RNGs; saving them makes a resumed run repeat exactly.
        checkpoint["rela_rng"] = {"cpu": torch.get_rng_state(),
                                  "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.budget = {**self.budget, **checkpoint.get("rela_budget", {})}
        self.history = list(checkpoint.get("rela_history", []))
        self.wall_before = checkpoint.get("rela_wall_seconds", 0.0)
        self.ssl_start_epoch = checkpoint.get("rela_ssl_start_epoch")
        self._sampler_state = checkpoint.get("rela_sampler")
        rng = checkpoint.get("rela_rng")
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.wall_start

    @property
    def switch_step(self) -> int | None:
        if self.rela is None or not bool(self.rela.switch.switched):
            return None
        return int(self.rela.switch.switch_step)


def _weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return losses.mean() if weights is None else (losses * weights.to(losses.dtype)).mean()


def _precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def _strategy(cfg: TrainConfig):
    if cfg.devices * cfg.num_nodes == 1:
        return "auto"
    # Every rank holds the same buffers by construction (images, labels, bank targets, switch state:
    # the switch sees the loss averaged over ranks), so DDP's per-step broadcast of them (~80 MB for
    # Fashion-MNIST) is pure overhead. Which parameters get gradients changes at the switch (the
    # method's heads sit out the ReLA phase, the transfer head the SSL phase), hence the unused-parameter search.
    return DDPStrategy(broadcast_buffers=False, find_unused_parameters=True)


def _sync_batchnorm(cfg: TrainConfig) -> bool:
    """SyncBatchNorm unless asked otherwise, whenever there is more than one process (as solo-learn does):
    per-process statistics would make a DDP step differ from one process on the global batch."""
    return cfg.devices * cfg.num_nodes > 1 if cfg.sync_batchnorm is None else cfg.sync_batchnorm


def _trainer_layout(cfg: TrainConfig) -> dict:
    sync = _sync_batchnorm(cfg)
    cuda = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    return {"accelerator": cfg.accelerator, "devices": cfg.devices, "num_nodes": cfg.num_nodes,
            "strategy": _strategy(cfg), "sync_batchnorm": sync,
            "plugins": [AtomicCheckpointIO()] + ([SyncBatchNorm(cuda)] if sync else [])}


def _start_ranks(cfg: TrainConfig) -> None:
    """Start the other processes and join the process group now, before the bank is extracted.

    Lightning's launcher would otherwise start ranks 1.. only inside ``fit``, after this process
    (rank 0) had extracted the whole bank alone. Started here, every rank extracts its share of
    the chunks (:func:`rela.bank.load_or_extract` shards over the process group). The launcher
    sets LOCAL_RANK/NODE_RANK/WORLD_SIZE in this process and its children, so the ``fit`` below
    starts nobody again and reuses the group; under torchrun or SLURM the processes exist
    already and only the group is joined.
    """
    if cfg.devices * cfg.num_nodes == 1:
        return
    strategy = L.Trainer(**_trainer_layout(cfg), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False).strategy
    strategy.launcher.launch(strategy.setup_environment)


def _check_out_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise RelaError(f"output path {out} exists and is not a folder")
    if not cfg.resume and (out / "checkpoints").exists():
        raise RelaError(f"output folder {out} already holds a run; pass --resume to continue it "
                        "or choose another --out")
    return out


@contextmanager
def _quiet_lightning():
    """Lightning's info banners off for this fit only (its warnings that do not apply: rela.console)."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@console_scope()
def train(cfg: TrainConfig, callbacks: list[Callback] = ()) -> dict:
    """Run one training job as configured; returns the metrics written to ``metrics.json``.

    ``callbacks``: extra Lightning callbacks (benchmarks measure and convert the model through them).
    """
    cfg.validate()
    keep_freed_memory()  # CPU steps no longer page-fault their activations in again (see its docstring)
    out = _check_out_dir(cfg)
    check_writable(out)
    logger = build_logger(cfg.logger, out)  # a missing extra (tensorboard, wandb) fails here, before any work
    wall_start = time.perf_counter()
    _start_ranks(cfg)  # the process group exists before the bank, so ranks share its extraction
    run = prepare(cfg)  # 1-3. data, learner + method, prior -> bank -> targets -> accelerator
    module, train_set = ReLAModule(cfg, run.method, run.rela, run.train_set, run.subset), run.train_set
    release_freed_memory()  # what preparing (the bank, the targets) freed, before workers fork from this process
    last = out / "checkpoints" / "last.ckpt"
    resuming = cfg.resume and last.is_file()
    if resuming:
        _check_checkpoint_fits(last, module)
    # 4. fit
    out.mkdir(parents=True, exist_ok=True)
    if dist_rank() == 0:  # the other ranks run alongside by now (_start_ranks): one process writes the folder
        for folder in (out, out / "checkpoints"):  # what a killed earlier process of this run was writing
            remove_stale_temp_files(folder)
        save_yaml(cfg.to_dict(), out / "config.yaml")
        _keep_previous_log(out / "logs" / "metrics.csv")
    # Both write last.ckpt: at every epoch end and every checkpoint_every steps inside an epoch.
    every = [{"every_n_epochs": 1}] + ([{"every_n_train_steps": cfg.checkpoint_every}] if cfg.checkpoint_every else [])
    step_metrics = StepMetrics()
    callbacks = [*callbacks, step_metrics] + ([ProgressBar()] if cfg.progress else [])
    callbacks += [ModelCheckpoint(dirpath=out / "checkpoints", filename="last", save_top_k=1,
                                  enable_version_counter=False, **when) for when in every]
    if run.test_set is not None:
        callbacks.insert(0, KNNMonitor(run.probe_memory, run.test_set, cfg.probe_every))
    with _quiet_lightning():
        trainer = L.Trainer(
            max_epochs=cfg.epochs, max_steps=cfg.max_steps or -1, **_trainer_layout(cfg), precision=_precision(cfg),
            logger=logger, callbacks=callbacks, enable_progress_bar=cfg.progress, enable_model_summary=False,
            log_every_n_steps=cfg.log_every, use_distributed_sampler=False, num_sanity_val_steps=0,
        )
        module.wall_start = wall_start
        logger.log_hyperparams(cfg.to_dict())
        try:
            if cfg.max_steps != 0:  # 0: the learner stays as initialised (a benchmark's no-training floor)
                trainer.fit(module, ckpt_path=str(last) if resuming else None)
        finally:
            close_logger(logger)
    # FLOPs per image of each step phase, counted on every rank: under DDP the networks now hold
    # SyncBatchNorm, whose collective needs every process
    per_image = _flops_per_image(module, train_set)
    if not trainer.is_global_zero:
        return {}
    # 5. outputs
    save_torch({"format": BACKBONE_FILE_FORMAT, "arch": cfg.backbone, "channels": train_set.channels,
                "image_size": train_set.image_size, "mean": list(train_set.mean), "std": list(train_set.std),
                "feature_dim": run.feature_dim,
                "state_dict": {k: v.cpu() for k, v in module.method.backbone.state_dict().items()}},
               out / "backbone.pt")
    switch_step = module.switch_step
    previous = load_json(out / "metrics.json") if (out / "metrics.json").is_file() else {}
    metrics = {
        "dataset": cfg.dataset, "method": cfg.method, "prior": cfg.prior, "backbone": cfg.backbone,
        "ratio": cfg.ratio, "subset": cfg.subset, "epochs": cfg.epochs, "seed": cfg.seed, "feature_dim": run.feature_dim,
        **module.budget, "switch_step": switch_step,
        "rela_steps": (switch_step if switch_step is not None else module.budget["steps"]) if module.rela else 0,
        "wall_seconds": module.wall_seconds(), "history": module.history, "target_variance": cfg.target_variance,
        **run.bank_info, "flops_per_image": per_image, "train_flops": run_flops(per_image, module.budget),
        "device": run.device, "precision": _precision(cfg), "skipped_images": len(train_set.skipped),
        "data_mode": run.data_mode, "data_wait_fraction": _share(step_metrics.wait_seconds, step_metrics.busy_seconds),
    }
    if previous.get("steps") == metrics["steps"]:  # resumed a finished run: its evaluation still holds
        metrics.update({k: v for k, v in previous.items() if k.endswith("_top1") or k.startswith("eval_")})
    save_json(metrics, out / "metrics.json")
    return metrics


def _flops_per_image(module: ReLAModule, train_set: ImageDataset) -> dict[str, float]:
    sample = in_memory(train_set, 8)
    return step_flops_per_image(module.method, module.rela, module.normalize, sample.images.to(module.device),
                                sample.labels.to(module.device))


def count_step_flops(cfg: TrainConfig) -> dict[str, float]:
    """FLOPs per image of each step phase of ``cfg``'s run, counted on the networks as built (nothing
    trains; FLOPs do not depend on the weights): what ``train`` records, for a run recorded without them."""
    run = prepare(cfg)
    return _flops_per_image(ReLAModule(cfg, run.method, run.rela, run.train_set), run.train_set)


def _share(wait: float, busy: float) -> float | None:
    """The share of the steps' wall time spent waiting for batches (None when no step ran)."""
    return wait / (wait + busy) if wait + busy > 0 else None


def _check_checkpoint_fits(path: Path, module: ReLAModule) -> None:
    """Refuse, before training, a checkpoint of another model (another --backbone, --method or --prior)."""
    try:
        saved = load_torch(path, "checkpoint")["state_dict"]
    except RelaError as e:  # a planted payload, truncated, not a torch file: nothing of it ran
        raise RelaError(f"cannot resume: {e}; delete it to start over") from None
    except (TypeError, KeyError):
        raise RelaError(f"cannot resume from {path}: not a checkpoint of 'rela train'; "
                        "delete it to start over") from None
    expected = module.state_dict()
    problems = [f"{k}: {tuple(saved[k].shape)} in the checkpoint, {tuple(v.shape)} here"
                for k, v in expected.items() if k in saved and saved[k].shape != v.shape]
    problems += [f"{k} missing" for k in expected.keys() - saved.keys()]
    problems += [f"{k} unexpected" for k in saved.keys() - expected.keys()]
    if problems:
        raise RelaError(f"cannot resume from {path}: it holds another model than --backbone {module.cfg.backbone} "
                        f"--method {module.cfg.method} --prior {module.cfg.prior} ({len(problems)} mismatches, "
                        f"e.g. {'; '.join(sorted(problems)[:3])}); resume with the run's own settings "
                        "(its config.yaml) or choose another --out")


def _keep_previous_log(csv: Path) -> None:
    """Lightning's CSV logger empties its folder's metrics.csv; keep a resumed run's earlier log."""
    if csv.is_file():
        k = 1
        while (kept := csv.with_name(f"metrics.{k}.csv")).exists():
            k += 1
        csv.rename(kept)
