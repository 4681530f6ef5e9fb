"""Budget and data options: --max-steps, --holdout (validation split), the digits dataset."""

from __future__ import annotations

import json

import torch

from rela.cli import main
from rela.data import load_dataset

TINY = ["--dataset", "synthetic:256", "--batch-size", "32", "--no-progress", "--probe-every", "0"]


def test_max_steps_cuts_a_run_inside_an_epoch(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "3", "--max-steps", "5", "--out", str(out),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 5 and m["images_seen"] == 5 * 32


def test_holdout_splits_the_training_set():
    train = load_dataset("synthetic:100", "train", holdout=30)
    val = load_dataset("synthetic:100", "test", holdout=30)
    full = load_dataset("synthetic:100", "train")
    assert len(train) == 70 and len(val) == 30
    assert torch.equal(torch.cat([train.images, val.images]), full.images)
    assert train.fingerprint() != full.fingerprint()  # a bank of the full set is never reused for it


def test_holdout_run_evaluates_on_the_holdout(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--holdout", "64", "--out", str(out),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    assert main(["eval", str(out), "--no-progress", "--linear-epochs", "2"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_test_images"] == 64 and m["eval_split"] == "test-holdout64"


def test_bad_holdout_is_a_user_error(tmp_path, capsys):
    assert main(["train", *TINY, "--holdout", "256", "--out", str(tmp_path / "run")]) == 2
    assert "holdout" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_digits_dataset_is_a_fixed_split_at_28px():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape[1:] == (1, 28, 28) and len(train) + len(test) == 1797
    assert set(train.labels.tolist()) == set(range(10))
    assert torch.equal(load_dataset("digits", "train").images, train.images)  # deterministic
