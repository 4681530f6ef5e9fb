"""One DDP step on 2 x B images equals one process's step on the same 2B images.

For SimCLR, BYOL, Barlow Twins and the ReLA phase, the real ``rela.train.train`` runs one
optimizer step (AdamW, the training step, Lightning's DDP over gloo) in two processes started
the way a multi-node launcher starts them (LOCAL_RANK, MASTER_ADDR/PORT, WORLD_SIZE set), with
a batch of B per process, and once in one process with a batch of 2B: the global-batch loss
and every parameter and batch-norm buffer of the checkpoint must agree within float
tolerance. With gathering and SyncBatchNorm switched off, SimCLR and Barlow Twins (whose losses
span the batch) and BYOL (batch norm in its heads) must differ, which shows the test can see it.

Augmentations draw random numbers; to give both setups the same views, the driver seeds each
image's augmentation from its content and from how many views of it were drawn so far.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import free_port, run_processes

DRIVER = """
import hashlib, json, os, sys
from collections import Counter
from pathlib import Path

import torch

from rela.config import TrainConfig
from rela.data.augment import ViewAugment
from rela.train import ReLAModule, train

draw, draws = ViewAugment._apply, Counter()


def per_sample_seeded(self, images, size, p):  # p: probabilities, a float or one per image (augment_views)
    views = []
    for i, image in enumerate(images):
        key = hashlib.sha256(image.cpu().numpy().tobytes()).hexdigest()
        draws[key] += 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(key[:12], 16) + draws[key])
            views.append(draw(self, image[None], size,
                              {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in p.items()}))
    return torch.cat(views)


training_step, losses = ReLAModule.training_step, {}


def recording_step(self, index, batch_idx):
    out = training_step(self, index, batch_idx)
    metrics = self.trainer.callback_metrics
    losses[self.cfg.out] = float(metrics.get("train/rela_loss", metrics.get("train/method_loss")))
    return out


def save_gradients(self, optimizer):  # after backward, so after DDP's all-reduce: what the step applies
    if self.global_rank == 0:
        grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}
        torch.save(grads, Path(self.cfg.out, "gradients.pt"))


ViewAugment._apply, ReLAModule.training_step = per_sample_seeded, recording_step
ReLAModule.on_before_optimizer_step = save_gradients
for config in json.loads(Path(sys.argv[1]).read_text()):
    draws.clear()
    train(TrainConfig.from_dict(config))
Path(sys.argv[2]).write_text(json.dumps(losses))
"""

B = 16  # images per process; the single process takes 2B
SMALL_HEADS = {"simclr": {"hidden_dim": 64, "out_dim": 32}, "byol": {"hidden_dim": 64, "out_dim": 32},
               "barlowtwins": {"hidden_dim": 64, "out_dim": 64}}
CASES = {  # name -> (method, prior)
    "simclr": ("simclr", "none"), "byol": ("byol", "none"), "barlowtwins": ("barlowtwins", "none"),
    "rela-phase": ("byol", "random"),
}


def _config(base: Path, case: str, mode: str, batch: int) -> dict:
    method, prior = CASES[case]
    extra = dict(SMALL_HEADS[method])
    synced = mode != "local"
    if method in ("simclr", "barlowtwins"):
        extra["gather_distributed"] = synced
    return {"dataset": f"synthetic:{2 * B}", "backbone": "convnet", "method": method, "prior": prior,
            "switch": "never", "ratio": 1.0, "epochs": 1, "max_steps": 1, "batch_size": batch, "seed": 0,
            "accelerator": "cpu", "devices": 1 if mode == "single" else 2, "sync_batchnorm": synced,
            "probe_every": 0, "progress": False, "checkpoint_every": 0, "extra": extra,
            "log_every": 1,  # the step logs its loss (recording_step reads it); only steps that log do
            "out": str(base / f"{case}-{mode}"), "cache_dir": str(base / "cache")}


def _drive(base: Path, name: str, configs: list[dict], envs: list[dict]) -> list[dict]:
    (base / "driver.py").write_text(DRIVER)
    (base / f"{name}.json").write_text(json.dumps(configs))
    run_processes([[str(base / "driver.py"), str(base / f"{name}.json"), str(base / f"{name}-losses{i}.json")]
                   for i in range(len(envs))],
                  [{**os.environ, "OMP_NUM_THREADS": "1", **e} for e in envs], base, timeout=900)
    return [json.loads((base / f"{name}-losses{i}.json").read_text()) for i in range(len(envs))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Losses and checkpoints of every case: one process (2B), two (B each) synced, two local."""
    base = tmp_path_factory.mktemp("equivalence")
    ddp = [_config(base, case, mode, B) for mode in ("synced", "local") for case in CASES]
    port = str(free_port())
    ranks = _drive(base, "ddp", ddp, [{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
                                      "NODE_RANK": "0", "LOCAL_RANK": str(r)} for r in (0, 1)])
    (single,) = _drive(base, "single", [_config(base, case, "single", 2 * B) for case in CASES], [{}])
    table = {(case, mode): _compare(base, case, mode, ranks, single) for case in CASES for mode in ("synced", "local")}
    print("\ncase         mode    loss 1 proc  loss 2 procs  |loss diff|  grad diff  param diff (all / driven)")
    for (case, mode), row in table.items():
        print(f"{case:12s} {mode:7s} {row['loss_single']:.7f}  {row['loss_ddp']:.7f}  "
              f"{abs(row['loss_ddp'] - row['loss_single']):.2e}  {row['relative_grad_diff']:.2e}   "
              f"{row['max_abs_param_diff']:.2e} / {row['max_abs_driven_param_diff']:.2e}")
    return table


def _compare(base: Path, case: str, mode: str, ranks: list[dict], single: dict) -> dict:
    """Loss, gradient and parameter differences of a two-process run from the one-process run.

    The first AdamW step moves every element by about lr * g / (|g| + eps): an element whose
    gradient is zero in exact arithmetic (e.g. the bias of a linear layer followed by batch
    norm) moves by up to lr in a direction set by rounding noise. ``max_abs_driven_param_diff``
    leaves those out (|g| below 1e-5 of the model's largest gradient in the one-process run);
    ``max_abs_param_diff`` keeps them. Gradient differences are relative to that largest gradient.
    """
    run, reference = base / f"{case}-{mode}", base / f"{case}-single"
    state, expected = _state(run), _state(reference)
    grads, expected_grads = (torch.load(r / "gradients.pt", weights_only=True) for r in (run, reference))
    assert state.keys() == expected.keys() and grads.keys() == expected_grads.keys()
    scale = max(g.abs().max() for g in expected_grads.values()).item()
    driven = {k: expected_grads[k].abs() >= 1e-5 * scale for k in expected_grads}
    return {
        "loss_single": single[str(reference)],
        "loss_ddp": sum(r[str(run)] for r in ranks) / 2,  # the global batch's loss: the mean over equal halves
        "relative_grad_diff": max((grads[k] - g).abs().max().item() for k, g in expected_grads.items()) / scale,
        "max_abs_param_diff": max((state[k] - expected[k]).abs().max().item() for k in expected),
        "max_abs_driven_param_diff": max((state[k] - expected[k])[driven[k]].abs().max().item()
                                         if driven[k].any() else 0.0 for k in driven),
    }


def _state(run: Path) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of the run's checkpoint: parameters and batch-norm statistics."""
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {k: v.double() for k, v in state.items() if v.is_floating_point()}


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_step_with_gathering_and_syncbn_equals_one_process(runs, case):
    row = runs[case, "synced"]
    assert row["loss_ddp"] == pytest.approx(row["loss_single"], rel=1e-5, abs=1e-6)
    assert row["relative_grad_diff"] < 1e-4
    assert row["max_abs_driven_param_diff"] < 1e-5


@pytest.mark.parametrize("case", ["simclr", "barlowtwins", "byol"])
def test_without_gathering_or_syncbn_the_step_differs(runs, case):
    row = runs[case, "local"]
    assert abs(row["loss_ddp"] - row["loss_single"]) > 1e-4 or row["relative_grad_diff"] > 1e-2
