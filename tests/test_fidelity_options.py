"""The options that reproduce the authors' reference code (issue 16), each checked to change what it names and
nothing else: --transfer-head, --prior learner-init, --lr-schedule, --momentum-schedule, --switch-aug-at,
--hidden-dim, --target-variance, and the ``authors`` preset that sets them all."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import MOVED, TINY, read_metrics, run_ok, starting_backbone
from lightning.pytorch.callbacks import Callback

from rela.bank import open_bank
from rela.build import prepare, prior_for
from rela.cli import build_parser, config_from_args, main
from rela.config import TrainConfig
from rela.data import Normalize, load_dataset
from rela.errors import RelaError
from rela.evaluate import backbone_features
from rela.presets import preset_file
from rela.targets import transport
from rela.train import train

TINY_CFG = dict(dataset="synthetic", backbone="convnet", batch_size=32, ratio=0.125, epochs=2, probe_every=0,
                progress=False, checkpoint_every=0, accelerator="cpu",  # 64 images per epoch: 2 steps of 32
                switch="adaptive")  # cannot fire in 4 steps: ReLA-phase runs unless a test names a switch


class Recorder(Callback):
    """Per step: the LR and the weight lambda, the EMA weight measured from the momentum backbone's
    arithmetic, and which augmentations the base method's loss saw; parameters at the start and the end."""

    def __init__(self):
        self.lr, self.lam, self.momentum, self.rela_views, self.start, self.end = [], [], [], [], {}, {}

    @staticmethod
    def _params(module) -> dict:
        return {k: p.detach().clone() for k, p in module.named_parameters()}

    def on_train_start(self, trainer, module):
        self.start = self._params(module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lr.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.lam.append(module.rela.switch.weight(module.progress()) if module.rela is not None else 0.0)
        self._online = self._params(module.method.backbone)
        self._ema = self._params(module.method.backbone_momentum)
        module.views_used = ()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # ema_new = m * ema_old + (1 - m) * online_old, with online_old the weights before this step's update
        ema = self._params(module.method.backbone_momentum)
        num = torch.cat([(ema[k] - self._online[k]).flatten() for k in ema])
        den = torch.cat([(self._ema[k] - self._online[k]).flatten() for k in ema])
        keep = den.abs() > 1e-4
        self.momentum.append(float((num[keep] / den[keep]).median()) if keep.any() else None)
        views, rela = module.views_used, module.rela
        self.rela_views.append(None if not views else rela is not None and all(v is rela.view for v in views))

    def on_train_end(self, trainer, module):
        self.end = self._params(module)


def fit(tmp_path, name: str, **fields) -> Recorder:
    recorder = Recorder()
    cfg = TrainConfig(**{**TINY_CFG, "out": str(tmp_path / name), "cache_dir": str(tmp_path / "cache"), **fields})
    train(cfg, callbacks=[recorder])
    return recorder


def changed(a: dict, b: dict, prefix: str) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a if k.startswith(prefix))


# --- --transfer-head ---------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["frozen", "trained"])
def test_transfer_head_frozen_keeps_its_initial_weights_while_the_backbone_learns(tmp_path, head):
    rec = fit(tmp_path, head, prior="random", transfer_head=head, epochs=1)
    assert changed(rec.end, rec.start, "method.backbone.") > MOVED  # the learner trained in both cases
    moved = changed(rec.end, rec.start, "rela.transfer.")
    assert (moved == 0.0) if head == "frozen" else (moved > MOVED)


# --- --prior learner-init -----------------------------------------------------------------------

def test_learner_init_prior_is_the_learners_own_initial_network(tmp_path):
    out = tmp_path / "run"
    run_ok(["train", *TINY, "--epochs", "1", "--probe-every", "0", "--out", str(out), "--cache-dir",
            str(tmp_path / "cache"), "--prior", "learner-init", "--bank-dtype", "float32"])
    m = read_metrics(out)
    assert m["prior_name"] == "learner-init:convnet"
    data = load_dataset("synthetic", "train")
    normalize = Normalize(data.mean, data.std, data.channels)
    # the learner before its first step, rebuilt as rela train builds it
    expected = backbone_features(starting_backbone(out), data.images[:64], normalize)
    bank = np.asarray(open_bank(m["bank_file"], m["bank_key"])[0][:64])
    assert np.allclose(bank, expected.numpy(), atol=1e-4)
    # not another network of the same architecture (a learner of another seed)
    other = backbone_features(starting_backbone(out, seed=1), data.images[:64], normalize)
    assert not np.allclose(bank, other.numpy(), atol=1e-2)


def test_learner_init_prior_needs_a_learner_and_is_keyed_by_its_weights():
    data = load_dataset("synthetic", "train", limit=32)
    with pytest.raises(RelaError, match="learner-init"):
        prior_for("learner-init", data, learner_arch="convnet", seed=0)
    one, two = (prepare(TrainConfig(**{**TINY_CFG, "seed": s})).method.backbone for s in (0, 1))
    ids = [prior_for("learner-init", data, learner_arch="convnet", seed=0, learner=b).identity() for b in (one, two)]
    assert ids[0] != ids[1]  # the bank cache key follows the weights, not the name
    assert all(p.requires_grad for p in one.parameters())  # the prior is a copy: the learner stays trainable


# --- --lr-schedule, --momentum-schedule ------------------------------------------------------------

def test_constant_lr_schedule_keeps_the_peak_lr_and_leaves_the_momentum_schedule_alone(tmp_path):
    rec = fit(tmp_path, "lr", lr_schedule="constant", warmup=0.0, lr=1e-3)
    assert len(rec.lr) == 4 and rec.lr == [1e-3] * 4
    rising = [m for m in rec.momentum if m is not None]
    assert len(rising) == 3 and rising == sorted(rising) and rising[-1] - rising[0] > 1e-3  # still cosine


def test_constant_momentum_schedule_keeps_0_99_and_leaves_the_lr_schedule_alone(tmp_path):
    rec = fit(tmp_path, "m", momentum_schedule="constant", warmup=0.0, lr=1e-3)
    measured = [m for m in rec.momentum if m is not None]
    assert len(measured) == 3 and all(abs(m - 0.99) < 1e-4 for m in measured)
    assert rec.lr[0] == 1e-3 and rec.lr == sorted(rec.lr, reverse=True) and rec.lr[-1] < 0.7e-3  # still cosine


# --- --switch-aug-at ------------------------------------------------------------------------------

@pytest.mark.parametrize("at", ["step", "epoch"])
def test_switch_aug_at_epoch_keeps_relas_views_until_the_epoch_of_the_switch_ends(tmp_path, at):
    # soft:0.25:0 hands over at a quarter of the 4 steps, step 1, in the middle of epoch 0 (2 steps per epoch)
    # (adaptive:0, deciding at step 0, now hands over at step 1 + LAG: the start of epoch 1)
    rec = fit(tmp_path, at, prior="random", switch="soft:0.25:0", switch_aug_at=at)
    assert rec.lam == [1.0, 0.0, 0.0, 0.0]
    # step 0: ReLA only; step 1: the base method in epoch 0; steps 2-3: in epoch 1
    expected = [None, True, False, False] if at == "epoch" else [None, False, False, False]
    assert rec.rela_views == expected


# --- --rela-augment, --momentum-after-switch (investigations of the hand-over, issue 13) -------------------

def test_rela_augment_names_the_views_of_the_rela_phase_only(tmp_path):
    from rela.data.augment import RELA_VIEW, WEAK_VIEW

    def prepared(name):
        return prepare(TrainConfig(**TINY_CFG, prior="random", rela_augment=name, cache_dir=str(tmp_path)))

    default, weak, method = (prepared(n) for n in ("rela", "weak", "method"))
    assert default.rela.view is RELA_VIEW and weak.rela.view is WEAK_VIEW
    assert method.rela.view is method.method.views[0] and method.method.views == default.method.views
    assert WEAK_VIEW.jitter_p == WEAK_VIEW.gray_p == 0.0 and RELA_VIEW.jitter_p > 0


@pytest.mark.parametrize("mode", ["continue", "restart"])
def test_momentum_after_switch_restart_starts_the_schedule_again_where_the_methods_loss_begins(tmp_path, mode):
    from rela.schedules import momentum_schedule
    cosine = momentum_schedule("cosine")
    # soft:0.25:0 hands over after step 0 of 4: steps 1-3 train the base method
    rec = fit(tmp_path, mode, prior="random", switch="soft:0.25:0", momentum_after_switch=mode)
    assert rec.lam == [1.0, 0.0, 0.0, 0.0] and rec.momentum[0] is None  # step 0: the EMA still equals the learner
    clock = [(s - 1, 3) for s in (1, 2, 3)] if mode == "restart" else [(s, 4) for s in (1, 2, 3)]
    assert rec.momentum[1:] == pytest.approx([cosine(s, n, 0.99, 1.0) for s, n in clock], abs=2e-4)
    state = torch.load(tmp_path / mode / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert int(state["state_dict"]["rela.switch.method_start"]) == 1  # checkpointed: a resumed run keeps its clock


def test_a_run_without_a_prior_ignores_every_prior_only_field(tmp_path):
    from rela.config import PRIOR_ONLY_FIELDS
    changed_fields = dict(prior_weights=str(tmp_path / "absent.pt"), prior_seed=7, switch="never",
                          bank=str(tmp_path / "absent.npy"), bank_dtype="float32", target_variance=0.5,
                          transfer_head="frozen", switch_aug_at="epoch", rela_augment="weak",
                          momentum_after_switch="restart")
    assert set(changed_fields) == PRIOR_ONLY_FIELDS
    assert all(changed_fields[k] != getattr(TrainConfig(), k) for k in changed_fields)
    default, changed_run = fit(tmp_path, "default"), fit(tmp_path, "changed", **changed_fields)
    assert default.lr == changed_run.lr and default.momentum == changed_run.momentum
    assert all(torch.equal(default.end[k], changed_run.end[k]) for k in default.end)  # the same run, bit for bit


def test_a_run_that_never_hands_over_ignores_every_handover_only_field(tmp_path):
    from rela.config import HANDOVER_ONLY_FIELDS
    changed_fields = dict(switch_aug_at="epoch", momentum_after_switch="restart")
    assert set(changed_fields) == HANDOVER_ONLY_FIELDS
    default = fit(tmp_path, "default", prior="random", switch="never")
    changed_run = fit(tmp_path, "changed", prior="random", switch="never", **changed_fields)
    assert default.momentum == changed_run.momentum and default.end.keys() == changed_run.end.keys()
    assert all(torch.equal(default.end[k], changed_run.end[k]) for k in default.end)
    # while a run that hands over does change (the same fields are not inert there)
    handing_over = fit(tmp_path, "switching", prior="random", switch="adaptive:0", **changed_fields)
    assert handing_over.momentum != fit(tmp_path, "switching-default", prior="random", switch="adaptive:0").momentum


# --- --hidden-dim ---------------------------------------------------------------------------------

def test_hidden_dim_sets_the_width_of_the_byol_heads_only():
    default = prepare(TrainConfig(**TINY_CFG)).method
    narrow = prepare(TrainConfig(**TINY_CFG, hidden_dim=256)).method
    assert default.projection_head.layers[0].out_features == 1024
    assert narrow.projection_head.layers[0].out_features == 256
    assert narrow.prediction_head.layers[0].out_features == 256
    assert narrow.projection_head.layers[-1].out_features == default.projection_head.layers[-1].out_features == 256
    assert torch.equal(next(default.backbone.parameters()), next(narrow.backbone.parameters()))
    with pytest.raises(RelaError, match="hidden_dim is set twice"):
        TrainConfig(**TINY_CFG, hidden_dim=256, extra={"hidden_dim": 64}).validate()


# --- --target-variance ------------------------------------------------------------------------------

def test_target_variance_keeps_the_fewest_components_explaining_that_share():
    gen = torch.Generator().manual_seed(0)
    variances = torch.tensor([10.0, 5.0, 3.0, 2.0])  # cumulative shares 0.5, 0.75, 0.9, 1.0
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    features = (torch.randn(20000, 4, generator=gen, dtype=torch.float64) * variances.sqrt().double()) @ rotation.T
    for q, dim in ((0.4, 1), (0.6, 2), (0.85, 3), (0.95, 4), (1.0, 4)):
        targets = transport(features, 4, variance=q)
        assert targets.values.shape == (20000, dim), q
        assert targets.explained_variance == pytest.approx(float(variances[:dim].sum() / 20), abs=0.01)
    assert transport(features, 2, variance=0.95).values.shape[1] == 2  # never more than m


def test_target_variance_is_logged_with_the_kept_dimension(tmp_path):
    out = tmp_path / "run"
    run_ok(["train", *TINY, "--epochs", "1", "--probe-every", "0", "--out", str(out), "--cache-dir",
            str(tmp_path / "cache"), "--prior", "random", "--target-variance", "0.9"])
    m = read_metrics(out)
    assert m["target_variance"] == 0.9 and 1 <= m["target_dim"] < 128 and 0.9 <= m["target_explained_variance"] < 1
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state["rela.transfer.weight"].shape == (m["target_dim"], 128)


# --- validation and the preset ----------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, named", [
    ("--transfer-head", "fixed", "transfer_head"), ("--switch-aug-at", "batch", "switch_aug_at"),
    ("--lr-schedule", "linear", "lr schedule"), ("--momentum-schedule", "step", "momentum schedule"),
    ("--hidden-dim", "0", "hidden_dim"), ("--target-variance", "0", "target_variance"),
    ("--target-variance", "1.5", "target_variance"), ("--prior", "learner-init:x", "prior"),
    ("--preset", "reference", "preset"), ("--rela-augment", "strong", "rela_augment"),
    ("--momentum-after-switch", "reset", "momentum_after_switch"),
])
def test_a_bad_value_is_one_line_naming_the_field_and_exit_2(tmp_path, capsys, flag, value, named):
    assert main(["train", flag, value, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rela: error:") and named in err and "\n" not in err
    assert not (tmp_path / "never").exists()


def test_the_authors_preset_sets_every_deviation_and_yields_to_config_and_flags(tmp_path):
    preset = TrainConfig.from_preset("authors").validate()
    expected = dict(prior="learner-init", transfer_head="frozen", lr=1e-3, weight_decay=0.01, warmup=0.0,
                    lr_schedule="constant", momentum_schedule="constant", hidden_dim=256, switch_aug_at="epoch",
                    bank_dtype="float32", switch="adaptive")
    assert {k: getattr(preset, k) for k in expected} == expected
    default = TrainConfig()
    # every one is a deviation, the switch too since rela's default became soft-plateau (issue 28)
    assert [k for k in expected if getattr(default, k) == expected[k]] == []
    # every other field is rela's default
    assert {f.name for f in dataclasses.fields(TrainConfig) if getattr(preset, f.name) != getattr(default, f.name)} \
        == set(expected)
    assert preset_file("authors").is_file()
    # preset < --config file < flags
    own = tmp_path / "own.yaml"
    own.write_text("lr: 5.0e-4\nhidden_dim: 512\n")
    cfg = config_from_args(build_parser().parse_args(["train", "--preset", "authors", "--config", str(own),
                                                      "--hidden-dim", "128"]))
    assert (cfg.lr, cfg.hidden_dim, cfg.transfer_head, cfg.weight_decay) == (5e-4, 128, "frozen", 0.01)
    assert TrainConfig.from_preset("authors", prior="random").prior == "random"
