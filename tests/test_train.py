"""End to end: ``rela train`` + ``rela eval`` on tiny synthetic data and a real Fashion-MNIST slice."""

from __future__ import annotations

import csv
import shutil

import lightning as L
import pytest
import torch
import yaml
from conftest import (
    EVAL,
    FASHION_MNIST_ROOT,
    MOVED,
    TINY,
    TINY_STEPS,
    backbone_state,
    make_fashion_root,
    needs_fmnist,
    parameters,
    read_metrics,
    run_ok,
    saved_backbone_features,
    starting_backbone,
    train_module,
    untrained_twin,
    weighted_knn_top1,
)
from lightning.pytorch.callbacks import Callback

from rela.backbones import build_backbone
from rela.cli import main
from rela.config import TrainConfig
from rela.data import DynamicSubsetSampler, load_dataset
from rela.methods import build_method

RUN_FILES = ("config.yaml", "metrics.json", "backbone.pt", "checkpoints/last.ckpt", "logs/metrics.csv")
EVAL_KEYS = ("knn_top1", "linear_top1", "knn20_top1", "knn200_top1")
BUDGET_KEYS = ("steps", "images_seen", "train_seconds", "wall_seconds", "switch_step")
CHANCE = 1 / 10  # synthetic and Fashion-MNIST both have 10 balanced classes


def assert_learned(m: dict, untrained: dict) -> None:
    """Training removed at least a third of the errors its own learner made before the first step.

    An untrained convnet already scores ~0.97 k-NN and ~0.95 linear on ``synthetic`` (measured: 7
    and 12 errors in 256), so a fixed floor such as 2 x chance cannot tell a learner that learned
    from one that did not; TINY runs measured 1-2 and 2-3 errors, and plain BYOL 7 linear errors
    once the batched random-resized crop redraws misfit crops as torchvision does (smaller crops).
    A learner that does not learn keeps its 12.
    """
    for key in ("knn_top1", "linear_top1"):
        assert 1 - m[key] <= 2 / 3 * (1 - untrained[key]), (key, m[key], untrained[key])


def assert_learned_knn(m: dict, untrained: dict) -> None:
    """k-NN errors cut by a third, linear errors fewer than before training: for 8 steps of the ReLA phase.

    The linear probe after 8 ReLA steps is too noisy for the one-third rule: over seeds 0-5 of the TINY
    random-prior run it made 10 / 11 / 11 / 6 / 7 / 0 linear errors of 256 (k-NN 4 / 1 / 2 / 2 / 5 / 0)
    since a step's two views are made in one call, and 0 / 24 / 10 / 11 / 9 / 2 (k-NN 0 / 5 / 0 / 4 / 8 / 0)
    before, with the same augmentations drawn in another order (measured for issue 26, in its note).
    """
    assert 1 - m["knn_top1"] <= 2 / 3 * (1 - untrained["knn_top1"]), (m["knn_top1"], untrained["knn_top1"])
    assert m["linear_top1"] > untrained["linear_top1"], (m["linear_top1"], untrained["linear_top1"])


@pytest.fixture(scope="module")
def untrained(random_run, tmp_path_factory) -> dict:
    """Evaluation of the TINY learner (seed 0) before training; random_run and none_run both start there."""
    return untrained_twin(random_run, tmp_path_factory.mktemp("untrained") / "run")


def check_finished_run(run, steps: int, batch_size: int) -> dict:
    for name in RUN_FILES:
        assert (run / name).is_file(), f"{name} missing from {run}"
    metrics = read_metrics(run)
    for key in BUDGET_KEYS + EVAL_KEYS:
        assert key in metrics, key
    assert metrics["steps"] == steps
    assert metrics["images_seen"] == steps * batch_size
    assert 0 < metrics["train_seconds"] <= metrics["wall_seconds"]
    for key in EVAL_KEYS:
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["knn_top1"] == metrics["knn200_top1"]  # the largest k is the headline number
    return metrics


def test_rela_run_with_random_prior(random_run, untrained):
    m = check_finished_run(random_run, TINY_STEPS, 32)
    assert_learned_knn(m, untrained)
    # the bank: a random convnet (128-d) for a convnet learner (128-d), seeded with --seed + 1
    assert m["prior_name"] == "random:convnet:seed1"
    assert m["bank_shape"] == [512, 128] and m["target_dim"] == 128
    assert m["bank_cache_hit"] is False
    assert 0 < m["target_explained_variance"] <= 1.0 + 1e-6
    # After 8 steps the slow loss EMA is still far above the fast one (it starts 1.0 higher and
    # closes ~1% of the gap per step), so rho = exp(-gap) < 0.995: no switch, every step was ReLA.
    assert m["switch_step"] is None and m["rela_steps"] == m["steps"]
    # the cost-curve probe ran after each epoch, with the budget spent so far
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert [h["steps"] for h in m["history"]] == [TINY_STEPS // 2, TINY_STEPS]
    assert all(0 <= h["probe_knn_top1"] <= 1 and not h["switched"] for h in m["history"])
    assert m["history"][-1]["train_seconds"] == m["train_seconds"]


def test_plain_byol_run(none_run, random_run, untrained):
    m = check_finished_run(none_run, TINY_STEPS, 32)
    start, other = parameters(starting_backbone(none_run)), parameters(starting_backbone(random_run))
    assert all(torch.equal(start[k], other[k]) for k in start)  # the same learner as random_run's
    assert_learned(m, untrained)
    assert m["switch_step"] is None and m["rela_steps"] == 0
    assert "bank_file" not in m and m["bank_seconds"] == 0.0


def test_run_config_and_checkpoint(random_run):
    cfg = TrainConfig.from_yaml(random_run / "config.yaml")
    assert (cfg.dataset, cfg.prior, cfg.ratio, cfg.epochs, cfg.batch_size) == ("synthetic", "random", 0.3, 2, 32)
    assert cfg.out == str(random_run)
    ckpt = torch.load(random_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["rela_budget"]["steps"] == TINY_STEPS
    assert ckpt["global_step"] == TINY_STEPS and ckpt["epoch"] == 1
    # the backbone file holds the trained weights of the checkpoint
    state = backbone_state(random_run)
    for key, value in state.items():
        assert torch.equal(ckpt["state_dict"][f"method.backbone.{key}"], value)
    # the bank targets are rebuilt from the cache and never stored in the checkpoint
    assert not any("targets" in k for k in ckpt["state_dict"])
    with open(random_run / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and "probe_knn" in rows[0]


@pytest.mark.parametrize("run_name", ["random_run", "none_run"])
def test_backbone_weights_changed_during_training(run_name, request):
    run = request.getfixturevalue(run_name)
    start = parameters(starting_backbone(run))
    elsewhere = parameters(starting_backbone(run, seed=1))
    trained = backbone_state(run)
    # every trainable weight took optimiser steps (BatchNorm running statistics are not weights)
    moved = {k: (trained[k] - start[k]).abs().max().item() for k in start}
    assert min(moved.values()) > MOVED, moved
    # and from this start: the trained weights lie nearer to it than to another seed's init
    def distance(a):
        return sum((trained[k] - a[k]).pow(2).sum().item() for k in start)

    assert distance(start) < distance(elsewhere)


def test_same_seed_same_results(random_run, tmp_path):
    again = tmp_path / "again"
    run_ok(["train", *TINY, "--out", str(again), "--cache-dir", str(tmp_path / "cache"),
            "--prior", "random", "--probe-every", "1", "--seed", "0"])
    run_ok(["eval", str(again), *EVAL])
    first, second = read_metrics(random_run), read_metrics(again)
    for key in ("steps", "images_seen", "knn_top1", "linear_top1", "knn20_top1", "bank_key"):
        assert first[key] == second[key], key
    assert [h["probe_knn_top1"] for h in first["history"]] == [h["probe_knn_top1"] for h in second["history"]]
    a, b = backbone_state(random_run), backbone_state(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_constant_switch_hands_over_after_the_first_epoch(constant_run):
    m = check_finished_run(constant_run, TINY_STEPS, 32)
    steps_per_epoch = TINY_STEPS // 2
    assert m["switch_step"] == steps_per_epoch
    assert m["rela_steps"] == steps_per_epoch
    assert [h["switched"] for h in m["history"]] == [False, True]
    with open(constant_run / "logs" / "metrics.csv") as f:
        assert "probe_knn" in f.readline()


def test_config_file_with_flag_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": "synthetic", "backbone": "convnet", "prior": "none", "ratio": 0.5, "epochs": 1,
        "batch_size": 64, "seed": 3, "probe_every": 0, "progress": False, "extra": {"hidden_dim": 64},
    }))
    out = tmp_path / "out"
    run_ok(["train", "--config", str(config), "--epochs", "2", "--out", str(out), "--cache-dir", str(tmp_path / "c")])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 2  # the flag wins
    assert (saved["seed"], saved["batch_size"], saved["ratio"]) == (3, 64, 0.5)  # the file's values stay
    assert saved["extra"] == {"hidden_dim": 64}
    m = read_metrics(out)
    assert m["steps"] == 2 * (round(0.5 * 512) // 64) and m["seed"] == 3
    assert m["history"] == []  # probe_every: 0 from the file
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"]["method.projection_head.layers.0.weight"].shape[0] == 64  # extra reached BYOL


def test_training_loop_draws_a_new_subset_every_epoch():
    """The trainer really calls set_epoch: each epoch iterates that epoch's subset, exactly once."""
    data = load_dataset("synthetic:200")
    cfg = TrainConfig(accelerator="cpu", dataset="synthetic:200", ratio=0.25, epochs=3, batch_size=10, seed=4, probe_every=0,
                      progress=False)
    backbone, dim = build_backbone("convnet", 3, 16)
    module = train_module.ReLAModule(cfg, build_method("byol", backbone, dim, 10, hidden_dim=32, out_dim=16),
                                     None, data)
    seen: dict[int, list[int]] = {}

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(trainer.current_epoch, []).extend(batch.tolist())

    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[Record()])
    trainer.fit(module)
    reference = DynamicSubsetSampler(200, 0.25, seed=4)
    for epoch in range(3):
        assert seen[epoch] == reference.indices(epoch).tolist()
    assert len({frozenset(v) for v in seen.values()}) == 3
    assert module.budget["steps"] == 3 * 5 and module.budget["images_seen"] == 3 * 50


# --- resume -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed_run(random_run, tmp_path_factory):
    """A copy of the finished, evaluated random_run, trained again with --resume."""
    copy = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(random_run, copy)
    run_ok(["train", *TINY, "--out", str(copy), "--cache-dir", str(random_run.parent / "cache"),
            "--prior", "random", "--probe-every", "1", "--seed", "0", "--resume"])
    return copy


def test_resume_after_finished_run_changes_nothing(random_run, resumed_run):
    before, after = read_metrics(random_run), read_metrics(resumed_run)
    assert after["steps"] == before["steps"] == TINY_STEPS
    assert after["images_seen"] == before["images_seen"]
    assert after["bank_cache_hit"] is True  # the targets were rebuilt from the cached bank
    a, b = backbone_state(random_run), backbone_state(resumed_run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_keeps_evaluation_results(random_run, resumed_run):
    after = read_metrics(resumed_run)
    for key in ("knn_top1", "linear_top1"):
        assert after.get(key) == read_metrics(random_run)[key]


def test_resume_keeps_training_log(random_run, resumed_run):
    original = (random_run / "logs" / "metrics.csv").read_text()
    kept = [p.read_text() for p in (resumed_run / "logs").glob("metrics*.csv")]
    assert original in kept, "the earlier training log must survive a resume"


def test_resume_continues_an_unfinished_run(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = [*TINY, "--out", str(out), "--cache-dir", str(cache), "--prior", "random", "--probe-every", "1"]
    run_ok(["train", *common, "--epochs", "1"])
    assert read_metrics(out)["steps"] == TINY_STEPS // 2
    run_ok(["train", *common, "--epochs", "2", "--resume"])
    m = read_metrics(out)
    assert m["steps"] == TINY_STEPS and m["images_seen"] == TINY_STEPS * 32  # the budget carries over
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert m["bank_cache_hit"] is True


class SimulatedCrash(RuntimeError):
    pass


def test_run_killed_after_an_epoch_resumes_to_identical_weights(random_run, tmp_path, monkeypatch):
    """Crash at the start of epoch 2, resume: the result equals the uninterrupted random_run."""
    def crash(self):
        if self.current_epoch == 1:
            raise SimulatedCrash("killed (simulated)")

    out = tmp_path / "run"
    args = ["train", *TINY, "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--prior", "random", "--probe-every", "1", "--seed", "0"]
    monkeypatch.setattr(train_module.ReLAModule, "on_train_epoch_start", crash, raising=False)
    with pytest.raises(SimulatedCrash):
        main(args)
    monkeypatch.undo()
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / "metrics.json").exists()
    run_ok([*args, "--resume"])
    m, reference = read_metrics(out), read_metrics(random_run)
    assert m["steps"] == reference["steps"] and m["images_seen"] == reference["images_seen"]
    assert [h["probe_knn_top1"] for h in m["history"]] == [h["probe_knn_top1"] for h in reference["history"]]
    a, b = backbone_state(random_run), backbone_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- a real slice of Fashion-MNIST ------------------------------------------------------------


def test_fashion_mnist_from_data_root_flag(tmp_path, monkeypatch):
    """--data-root points the loader at a folder of IDX files (here tiny ones the test writes)."""
    monkeypatch.delenv("RELA_DATA", raising=False)
    root = tmp_path / "my-data"
    make_fashion_root(root / "fashion-mnist", n_train=40, n_test=20)  # the sub-folder layout
    out = tmp_path / "run"
    run_ok(["train", "--dataset", "fashion-mnist", "--data-root", str(root), "--epochs", "1", "--batch-size", "8",
            "--backbone", "convnet", "--prior", "random", "--probe-every", "1", "--no-progress",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    m = read_metrics(out)
    assert m["steps"] == 40 // 8 and m["bank_shape"] == [40, 128]
    assert yaml.safe_load((out / "config.yaml").read_text())["data_root"] == str(root)
    # eval finds the data through the run's config, and the test split holds the 20 written images
    run_ok(["eval", str(out), *EVAL])
    assert read_metrics(out)["eval_test_images"] == 20


@needs_fmnist
def test_fashion_mnist_slice(tmp_path, monkeypatch):
    monkeypatch.delenv("RELA_DATA", raising=False)
    out = tmp_path / "fmnist"
    run_ok(["train", "--dataset", "fashion-mnist", "--data-root", str(FASHION_MNIST_ROOT),
            "--train-limit", "1000", "--test-limit", "500", "--epochs", "3", "--batch-size", "64",
            "--backbone", "convnet", "--prior", "random", "--probe-every", "0", "--no-progress",
            # the measured margin below is of 45 ReLA steps on CPU: with the default soft-plateau the run hands
            # over to BYOL, which gains less in so few steps (200-NN 0.478 against 0.452, measured)
            "--switch", "adaptive", "--accelerator", "cpu",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    run_ok(["eval", str(out), *EVAL])
    m = check_finished_run(out, 3 * (1000 // 64), 64)
    assert m["bank_shape"] == [1000, 128]
    assert m["eval_test_images"] == 500
    # Learned, against its own untrained learner on the same 500 images: 200-NN 0.452 untrained,
    # 0.524 after these 45 steps (measured); at least 15 more images right leaves a margin. The
    # 10-epoch linear probe is no measure of 45 steps (untrained 0.606, trained 0.58, measured), so
    # it is only checked to work.
    floor = untrained_twin(out, tmp_path / "untrained")
    assert m["knn_top1"] >= floor["knn_top1"] + 15 / 500, (m["knn_top1"], floor["knn_top1"])
    assert m["linear_top1"] > 3 * CHANCE
    blob = torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)
    assert (blob["channels"], blob["image_size"]) == (1, 28)


def test_image_folder_run(tmp_path):
    from test_data import make_image_folder

    root = make_image_folder(tmp_path / "pics", per_class=12, size=(24, 20))
    out = tmp_path / "run"
    run_ok(["train", "--dataset", f"imagefolder:{root}", "--image-size", "16", "--backbone", "convnet",
            "--batch-size", "8", "--epochs", "1", "--prior", "random", "--probe-every", "1", "--no-progress",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    run_ok(["eval", str(out), *EVAL])
    m = read_metrics(out)
    assert m["steps"] == 24 // 8 and m["images_seen"] == 24
    assert m["bank_shape"] == [24, 128] and m["eval_test_images"] == 24
    # two solid colours: any backbone tells them apart
    assert m["knn_top1"] == m["knn20_top1"] == m["linear_top1"] == 1.0
    assert m["history"][0]["probe_knn_top1"] == 1.0
    blob = torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)
    assert (blob["channels"], blob["image_size"]) == (3, 16)
    assert tuple(blob["mean"]) == pytest.approx((0.485, 0.456, 0.406))


def test_probe_on_a_training_set_smaller_than_k(tmp_path):
    out = tmp_path / "run"
    run_ok(["train", "--dataset", "synthetic", "--train-limit", "16", "--batch-size", "8", "--epochs", "1",
            "--prior", "none", "--probe-every", "1", "--no-progress", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")])
    history = read_metrics(out)["history"]
    assert len(history) == 1
    # The probe's k = 20 exceeds the 16 training images: all 16 vote. It ran after the last step,
    # so on the saved weights, over the whole test split (256 < PROBE_TEST_IMAGES).
    train, test = load_dataset("synthetic", "train", limit=16), load_dataset("synthetic", "test")
    ftr, fte = saved_backbone_features(out, train.images, test.images)
    expected = weighted_knn_top1(ftr, train.labels, fte, test.labels, k=16)
    assert history[0]["probe_knn_top1"] == pytest.approx(expected, abs=1e-12)
    assert CHANCE < expected < 1  # a value that tells a right probe from a wrong one
