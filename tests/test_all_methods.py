"""Every method, with and without ReLA: a few real optimizer steps through the shipped training module."""

from __future__ import annotations

import pytest
import torch
from conftest import MOVED, fit, parameters

from rela.cli import main
from rela.config import TrainConfig
from rela.methods import METHODS
from rela.build import prepare
from rela.train import ReLAModule

MOMENTUM_METHODS = {"byol", "mocov2", "dino"}
HEADS = ("projection_head.", "prediction_head.", "classifier.")


def _fit(cfg: TrainConfig, max_steps: int):
    run = prepare(cfg)
    module = ReLAModule(cfg, run.method, run.rela, run.train_set)
    before = parameters(module.method)
    return module, before, fit(module, max_steps=max_steps)


def _moved(before: dict, method, prefixes) -> dict[str, float]:
    """How far each parameter named with one of ``prefixes`` moved from ``before`` (largest entry)."""
    after = parameters(method)
    return {k: (after[k] - v).abs().max().item() for k, v in before.items() if k.startswith(prefixes)}


def _learned(before: dict, method, prefixes) -> bool:
    moved = _moved(before, method, prefixes)
    return bool(moved) and max(moved.values()) > MOVED


def _momentum_followed(before: dict, method) -> bool:
    """The EMA backbone ended nearer to the trained online backbone than it started (lr = 0: equally near)."""
    after = parameters(method)
    pairs = [(k, "backbone_momentum." + k.removeprefix("backbone.")) for k in after if k.startswith("backbone.")]

    def gap(ema):
        return sum((ema[m] - after[o]).pow(2).sum().item() for o, m in pairs)

    return gap(after) < gap(before)


def _cfg(tmp_path, method, prior, switch="adaptive", epochs=1):
    return TrainConfig(accelerator="cpu", dataset="synthetic:128", method=method, prior=prior, switch=switch, epochs=epochs,
                       batch_size=32, probe_every=0, progress=False, cache_dir=str(tmp_path / "cache"),
                       out=str(tmp_path / "run"), extra={})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_plain_method_trains(tmp_path, method):
    module, before, trainer = _fit(_cfg(tmp_path, method, "none"), max_steps=3)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["loss"])
    assert _learned(before, module.method, "backbone."), "the backbone did not learn"
    if method in MOMENTUM_METHODS:
        assert _momentum_followed(before, module.method), "the momentum network did not follow"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_rela_phase_keeps_momentum_networks_moving(tmp_path, method):
    module, before, trainer = _fit(_cfg(tmp_path, method, "random", switch="never"), max_steps=3)
    assert module.switch_step is None
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/rela_loss"]) and float(logged["train/lambda"]) == 1.0
    assert _learned(before, module.method, "backbone.")
    if method in MOMENTUM_METHODS:
        assert _momentum_followed(before, module.method), "EMA networks must follow during the ReLA phase"
    # The method's own heads get no gradient while only the ReLA loss is active: not even weight decay.
    heads = _moved(before, module.method, HEADS)
    assert heads and max(heads.values()) == 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_switch_hands_over_to_the_method(tmp_path, method):
    # synthetic:128 with batch 32 -> 4 steps per epoch; constant:0.5 of 2 epochs switches at step 4.
    module, before, trainer = _fit(_cfg(tmp_path, method, "random", switch="constant:0.5", epochs=2), max_steps=8)
    assert module.switch_step == 4
    logged = trainer.callback_metrics
    assert float(logged["train/lambda"]) == 0.0 and torch.isfinite(logged["train/method_loss"])
    assert _learned(before, module.method, HEADS), "heads train after the switch"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cli_trains_every_method(tmp_path, method, capsys):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "synthetic:64", "--method", method, "--prior", "random",
                 "--switch", "constant:0.5", "--epochs", "2", "--batch-size", "32", "--probe-every", "0",
                 "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (out / "backbone.pt").is_file() and (out / "metrics.json").is_file()
    assert f"trained {method}" in capsys.readouterr().out
