"""Lightning callbacks of a rela run: per-step records and the online k-NN monitor.

- :class:`StepMetrics` (always on in :func:`rela.train.train`) logs, through whichever
  logger is active (``--logger``), the learning rate, the throughput in images/s, the data
  wait and, once, the step at which the switch hands over to the base method.
- :class:`KNNMonitor` scores the learner's frozen features with weighted k-NN on a
  held-out split every few epochs, shows the score in the progress bar, logs it and
  keeps it in the run's ``metrics.json`` (``history``). ``rela train`` adds one
  (``--probe-every``); add others through ``train(cfg, callbacks=[...])``::

      from rela import KNNMonitor, TrainConfig, load_dataset, train

      # a validation split: train on all but the last 5000 training images, score on those
      cfg = TrainConfig(holdout=5000, probe_every=0, out="runs/val")
      memory = load_dataset("fashion-mnist", "train", holdout=5000)
      queries = load_dataset("fashion-mnist", "test", holdout=5000)
      train(cfg, callbacks=[KNNMonitor(memory, queries, every=2, k=200, name="val_knn")])

Both work with :class:`rela.train.ReLAModule` (they read its backbone, normalisation and budget).
"""

from __future__ import annotations

import time
from collections import deque

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from rela.data import ImageDataset
from rela.data.stream import in_memory
from rela.evaluate import backbone_features, knn_accuracy

PROBE_TRAIN_IMAGES, PROBE_TEST_IMAGES = 5000, 2000


class StepMetrics(Callback):
    """Per-step records beside the losses: ``train/lr``, ``images_per_s``, ``data_wait`` and ``switch_step``.

    A step's *busy* time runs from ``on_train_batch_start`` to ``on_train_batch_end``; its *wait* is
    the time before it since the previous step ended (or since its epoch started): fetching the
    batch, plus what else runs between steps (logger writes, mid-epoch checkpoints). ``images_per_s``
    is the images of all processes over busy + wait, ``data_wait`` the share of that time spent
    waiting, both averaged over the last ``window`` steps (default: the trainer's
    ``log_every_n_steps``, so a logged row covers the steps since the previous one). On a GPU the
    split between busy and wait is approximate (kernels run asynchronously); their sum is wall time.
    ``train/lr`` is the learning rate the step used. These are logged on the steps that log only (each
    logged value costs the step time, and a device value a sync). ``train/switch_step`` is written once,
    directly to the loggers at that step, as soon as a step that logs (or an epoch end) sees the hand-over. ``wait_seconds`` and ``busy_seconds``
    total this process's steps of the fit (since the resume, for a resumed run): ``rela train``
    reports their ratio as ``data_wait_fraction`` in metrics.json.
    """

    def __init__(self, window: int | None = None):
        self.window = window
        self._steps: deque = deque()
        self._last_end = 0.0
        self._start = 0.0
        self._lr = 0.0
        self._switch_logged = False
        self.wait_seconds = self.busy_seconds = 0.0

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        self._steps = deque(maxlen=self.window or max(trainer.log_every_n_steps, 1))
        self._switch_logged = module.switch_step is not None  # a resumed run logged it already

    def on_train_epoch_start(self, trainer: L.Trainer, module) -> None:
        self._last_end = time.perf_counter()  # the epoch's first wait: making the iterator, the first batch

    def on_train_batch_start(self, trainer: L.Trainer, module, batch, batch_idx: int) -> None:
        self._start = time.perf_counter()
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]  # schedulers step after the batch

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        end = time.perf_counter()
        self._steps.append((self._start - self._last_end, end - self._start, len(batch) * trainer.world_size))
        self.wait_seconds += self._start - self._last_end
        self.busy_seconds += end - self._start
        self._last_end = end
        if not module.logs_at(trainer.global_step - 1):  # the step just taken
            return
        wait = sum(s[0] for s in self._steps)
        total = wait + sum(s[1] for s in self._steps)
        module.log_dict({"train/lr": self._lr, "train/images_per_s": sum(s[2] for s in self._steps) / total,
                         "train/data_wait": wait / total}, on_step=True, on_epoch=False)
        self.log_switch(trainer, module)

    def on_train_epoch_end(self, trainer: L.Trainer, module) -> None:
        self.log_switch(trainer, module)

    def log_switch(self, trainer: L.Trainer, module) -> None:
        """Write ``train/switch_step`` once, at the step of the hand-over (reads the device: not every step)."""
        if self._switch_logged:
            return
        switch_step = module.switch_step
        if switch_step is not None and not self._switch_logged:
            self._switch_logged = True
            for logger in trainer.loggers:
                logger.log_metrics({"train/switch_step": switch_step}, step=switch_step)


class KNNMonitor(Callback):
    """Online monitor: weighted k-NN top-1 (cosine, as ``rela eval``) of the frozen backbone, every ``every`` epochs.

    ``memory`` (labelled features to vote) and ``queries`` (the held-out images scored) are
    datasets of the run's dataset, cut to their first ``memory_images`` / ``query_images``
    images. Runs on the first process only, after the epochs ``every``, ``2 * every``, ... and the
    last; its time is not counted in the run's ``train_seconds``. The score goes to the progress
    bar and the logger as ``name`` and into the epoch's record of ``metrics.json``'s
    ``history`` as ``<name>_top1``, beside the budget spent by then.
    """

    def __init__(self, memory: ImageDataset, queries: ImageDataset, every: int = 1, *, k: int = 20,
                 name: str = "probe_knn", memory_images: int = PROBE_TRAIN_IMAGES,
                 query_images: int = PROBE_TEST_IMAGES):
        if every < 1 or k < 1:
            raise ValueError(f"KNNMonitor needs every >= 1 and k >= 1, got every={every}, k={k}")
        self.every, self.k, self.name = every, k, name
        self.memory = in_memory(memory, memory_images)  # decoded once, also when the run streams
        self.queries = in_memory(queries, query_images)

    def score(self, module) -> float:
        """The k-NN top-1 of ``module``'s backbone now."""
        backbone = module.method.backbone
        ftr = backbone_features(backbone, self.memory.images, module.normalize, device=module.device)
        fte = backbone_features(backbone, self.queries.images, module.normalize, device=module.device)
        return knn_accuracy(ftr, self.memory.labels, fte, self.queries.labels, self.memory.num_classes,
                            ks=(self.k,))[self.k]

    def on_train_epoch_end(self, trainer: L.Trainer, module) -> None:
        epoch = trainer.current_epoch + 1
        if not trainer.is_global_zero or (epoch % self.every and epoch != trainer.max_epochs):
            return
        acc = self.score(module)
        record = next((h for h in module.history if h["epoch"] == epoch), None)
        if record is None:  # the first monitor of this epoch: the budget spent so far
            record = {"epoch": epoch, **module.budget, "switched": module.switch_step is not None}
            module.history.append(record)
        record[f"{self.name}_top1"] = acc
        module.log(self.name, acc, rank_zero_only=True)
        module.bar[self.name] = acc


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar, showing the module's ``bar``: numbers on the host.

    Lightning reads every value logged with ``prog_bar=True`` back from the device after every step
    (a host-device sync each, on a GPU), however seldom it was logged; rela logs none that way and
    notes what the bar shows (the loss as of the last step that logged, the probe) in ``module.bar``.
    """

    def get_metrics(self, trainer: L.Trainer, module) -> dict:
        return {**super().get_metrics(trainer, module), **getattr(module, "bar", {})}
