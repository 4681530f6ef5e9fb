"""Options of ``rela train`` / ``rela eval`` that change what a run does: each one is checked to change
what it names (prior and learner of different widths, --prior-seed, --bank-dtype, eval --k, a
bf16-mixed run on CPU)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from conftest import (
    EVAL,
    MOVED,
    TINY,
    backbone_state,
    parameters,
    read_metrics,
    run_ok,
    saved_backbone_features,
    starting_backbone,
    train_module,
    weighted_knn_top1,
)

from rela.bank import open_bank
from rela.data import load_dataset

ONE_EPOCH = [*TINY, "--epochs", "1", "--probe-every", "0"]


def train(tmp_path, name: str, *extra: str):
    out = tmp_path / name
    run_ok(["train", *ONE_EPOCH, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *extra])
    return out, read_metrics(out)


def assert_learned(run) -> None:
    start, trained = parameters(starting_backbone(run)), backbone_state(run)
    assert min((trained[k] - start[k]).abs().max().item() for k in start) > MOVED


# --- a prior wider or narrower than the learner ------------------------------------------------

@pytest.mark.parametrize("prior, prior_dim", [
    ("random:resnet18", 512),  # wider than the convnet learner's 128: PCA keeps the top 128 components
    ("random:timm:test_resnet", 96),  # narrower: all 96 components, the transfer head maps 128 -> 96
])
def test_prior_and_learner_of_different_widths(tmp_path, prior, prior_dim):
    if "timm:" in prior:
        pytest.importorskip("timm")
    out, m = train(tmp_path, "run", "--prior", prior)
    target_dim = min(m["feature_dim"], prior_dim)
    assert m["feature_dim"] == 128 and m["bank_shape"] == [512, prior_dim]
    assert m["target_dim"] == target_dim
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state["rela.transfer.weight"].shape == (target_dim, 128)
    assert m["rela_steps"] == m["steps"] == 4  # every step regressed onto the targets (finite, or it stops)
    assert_learned(out)


# --- --prior-seed, --bank-dtype --------------------------------------------------------------

def bank(m: dict) -> np.ndarray:
    return np.asarray(open_bank(m["bank_file"], m["bank_key"])[0])


def test_prior_seed_sets_the_random_prior(tmp_path):
    _, default = train(tmp_path, "default", "--prior", "random")  # seed 0: the prior gets seed 1
    out, seeded = train(tmp_path, "seeded", "--prior", "random", "--prior-seed", "7")
    assert (default["prior_name"], seeded["prior_name"]) == ("random:convnet:seed1", "random:convnet:seed7")
    assert seeded["bank_key"] != default["bank_key"] and not np.array_equal(bank(seeded), bank(default))
    # the same prior as --seed 6 gets by default: the very bank, found in the cache
    _, six = train(tmp_path, "six", "--prior", "random", "--seed", "6")
    assert six["bank_cache_hit"] and six["bank_key"] == seeded["bank_key"]
    # the learner is still --seed 0's: --prior-seed moves the prior only
    learner = [parameters(starting_backbone(run)) for run in (tmp_path / "default", out)]
    assert all(torch.equal(learner[0][k], learner[1][k]) for k in learner[0])


def test_bank_dtype_sets_the_stored_precision(tmp_path):
    _, half = train(tmp_path, "half", "--prior", "random")
    _, full = train(tmp_path, "full", "--prior", "random", "--bank-dtype", "float32")
    assert (half["bank_dtype"], full["bank_dtype"]) == ("float16", "float32")
    assert full["bank_key"] != half["bank_key"] and not full["bank_cache_hit"]
    wide, narrow = bank(full), bank(half)
    assert (wide.dtype, narrow.dtype) == (np.float32, np.float16)
    assert not np.array_equal(wide, narrow.astype(np.float32))  # float32 keeps what float16 rounds away
    np.testing.assert_array_equal(wide.astype(np.float16), narrow)  # the same features, rounded


# --- eval --k ------------------------------------------------------------------------------------

def test_eval_k_sets_the_neighbours(random_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "backbone.pt"):
        shutil.copy(random_run / name, run / name)
    run_ok(["eval", str(run), *EVAL, "--k", "1", "5"])
    m = read_metrics(run)
    assert sorted(k for k in m if k.startswith("knn")) == ["knn1_top1", "knn5_top1", "knn_top1"]
    assert m["knn_top1"] == m["knn5_top1"]  # the largest k is the headline
    train_set, test_set = load_dataset("synthetic", "train"), load_dataset("synthetic", "test")
    ftr, fte = saved_backbone_features(run, train_set.images, test_set.images)
    for k in (1, 5):
        assert m[f"knn{k}_top1"] == pytest.approx(weighted_knn_top1(ftr, train_set.labels, fte, test_set.labels, k),
                                                  abs=1e-12)


# --- bf16-mixed on CPU ---------------------------------------------------------------------------

@pytest.mark.parametrize("prior", ["random", "none"])  # ReLA + BYOL, and BYOL alone
def test_bf16_mixed_run_on_cpu(tmp_path, monkeypatch, prior):
    seen = []
    step = train_module.ReLAModule.training_step

    def recording_step(self, index, batch_idx):
        loss = step(self, index, batch_idx)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), loss.item()))
        return loss

    monkeypatch.setattr(train_module.ReLAModule, "training_step", recording_step)
    out, m = train(tmp_path, "run", "--prior", prior, "--precision", "bf16-mixed", "--accelerator", "cpu")
    assert m["precision"] == "bf16-mixed" and m["steps"] == len(seen) == 4
    assert all(on and dtype == torch.bfloat16 and math.isfinite(loss) for on, dtype, loss in seen), seen
    assert_learned(out)
    assert all(v.dtype == torch.float32 for v in backbone_state(out).values() if v.is_floating_point())
