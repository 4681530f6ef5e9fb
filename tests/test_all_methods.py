"""Every method, with and without ReLA: a few real optimizer steps through the shipped training module."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from rela.cli import main
from rela.config import TrainConfig
from rela.methods import METHODS
from rela.build import prepare
from rela.train import ReLAModule

MOMENTUM_METHODS = {"byol", "mocov2", "dino"}


def _fit(cfg: TrainConfig, max_steps: int):
    run = prepare(cfg)
    module = ReLAModule(cfg, run.method, run.rela, run.train_set)
    before = copy.deepcopy(module.method.state_dict())
    trainer = L.Trainer(max_steps=max_steps, max_epochs=cfg.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(module)
    return module, before, trainer


def _changed(before: dict, after: dict, prefix: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)
               and before[k].is_floating_point())


def _cfg(tmp_path, method, prior, switch="adaptive", epochs=1):
    return TrainConfig(dataset="synthetic:128", method=method, prior=prior, switch=switch, epochs=epochs,
                       batch_size=32, probe_every=0, progress=False, cache_dir=str(tmp_path / "cache"),
                       out=str(tmp_path / "run"), extra={})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_plain_method_trains(tmp_path, method):
    module, before, trainer = _fit(_cfg(tmp_path, method, "none"), max_steps=3)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["loss"])
    after = module.method.state_dict()
    assert _changed(before, after, "backbone."), "the backbone did not learn"
    if method in MOMENTUM_METHODS:
        assert _changed(before, after, "backbone_momentum."), "the momentum network did not follow"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_rela_phase_keeps_momentum_networks_moving(tmp_path, method):
    module, before, trainer = _fit(_cfg(tmp_path, method, "random", switch="never"), max_steps=3)
    assert module.switch_step is None
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/rela_loss"]) and float(logged["train/lambda"]) == 1.0
    after = module.method.state_dict()
    assert _changed(before, after, "backbone.")
    if method in MOMENTUM_METHODS:
        assert _changed(before, after, "backbone_momentum."), "EMA networks must follow during the ReLA phase"
    # The method's own heads get no gradient while only the ReLA loss is active.
    heads = [k for k in before if k.startswith(("projection_head.", "prediction_head.", "classifier."))]
    assert heads and not _changed({k: before[k] for k in heads}, after, "")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_switch_hands_over_to_the_method(tmp_path, method):
    # synthetic:128 with batch 32 -> 4 steps per epoch; constant:0.5 of 2 epochs switches at step 4.
    module, before, trainer = _fit(_cfg(tmp_path, method, "random", switch="constant:0.5", epochs=2), max_steps=8)
    assert module.switch_step == 4
    logged = trainer.callback_metrics
    assert float(logged["train/lambda"]) == 0.0 and torch.isfinite(logged["train/method_loss"])
    heads = [k for k in before if k.startswith(("projection_head.", "prediction_head.", "classifier."))]
    assert _changed({k: before[k] for k in heads}, module.method.state_dict(), ""), "heads train after the switch"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cli_trains_every_method(tmp_path, method, capsys):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "synthetic:64", "--method", method, "--prior", "random",
                 "--switch", "constant:0.5", "--epochs", "2", "--batch-size", "32", "--probe-every", "0",
                 "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (out / "backbone.pt").is_file() and (out / "metrics.json").is_file()
    assert f"trained {method}" in capsys.readouterr().out
