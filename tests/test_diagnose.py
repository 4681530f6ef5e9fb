"""rela diagnose / rank-priors: the statistics on known cases, then both commands end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import needs_fmnist

from rela.cli import main
from rela.diagnose import class_spread, effective_rank, linear_cka, ridge_r2

SLICE = ["--dataset", "fashion-mnist", "--train-limit", "512", "--test-limit", "128", "--no-progress"]


def test_ridge_r2_recovers_linear_maps_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g)
    assert ridge_r2(x, x)["r2"] == pytest.approx(1, abs=1e-3)
    y = x @ torch.randn(12, 5, generator=g) + 0.1 * torch.randn(400, 5, generator=g)
    assert 0.95 < ridge_r2(x, y)["r2"] < 1
    assert ridge_r2(x, torch.randn(400, 5, generator=g))["r2"] < 0.1  # nothing to predict


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(x, x @ q * 3 + 1) == pytest.approx(1)  # invariant to rotation, scale and shift
    y = torch.randn(300, 6, generator=g)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x))
    assert 0 <= linear_cka(x, y) < 0.2


def test_class_spread_and_effective_rank():
    labels = torch.arange(4).repeat_interleave(50)
    centres = torch.eye(4) * 10
    tight = centres[labels] + 0.01 * torch.randn(200, 4)
    assert class_spread(tight, labels) < 0.01
    assert class_spread(torch.randn(200, 4), labels) > 0.9
    assert effective_rank(torch.randn(500, 16)) > 12
    assert effective_rank(torch.randn(500, 1) @ torch.randn(1, 16)) == pytest.approx(1, abs=1e-3)


@needs_fmnist
def test_diagnose_cli(tmp_path, random_run, capsys):
    out = tmp_path / "diag"
    specs = ["random", "random:resnet-narrow", f"checkpoint:{random_run}"]
    assert main(["diagnose", "--models", *specs, *SLICE, "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out)]) == 0
    assert "Held-out ridge R^2" in capsys.readouterr().out
    report = json.loads((out / "diagnose.json").read_text())
    assert (out / "diagnose.md").is_file() and (out / "diagnose.png").stat().st_size > 1000
    assert report["train_images"] == 512 and report["test_images"] == 128
    for m in report["models"]:
        assert 0 < m["explained_variance"] <= 1 + 1e-9 and 0 < m["class_spread"] < 1 and 0.1 < m["knn_top1"] <= 1
    for a in specs:
        assert report["r2"][a][a] > 0.98
        for b in specs:
            assert 0 <= report["cka"][a][b] <= 1 + 1e-9
            assert report["cka"][a][b] == pytest.approx(report["cka"][b][a])
            assert report["r2"][a][b] <= 1


@needs_fmnist
def test_rank_priors_cli(tmp_path, capsys):
    out = tmp_path / "rank"
    assert main(["rank-priors", "--priors", "random", "random:resnet-narrow", *SLICE, "--samples", "256",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    assert "| rank | prior |" in capsys.readouterr().out
    report = json.loads((out / "rank_priors.json").read_text())
    rows = report["priors"]
    assert [r["rank"] for r in rows] == [1, 2] and {r["spec"] for r in rows} == {"random", "random:resnet-narrow"}
    assert rows[0]["stability"] >= rows[1]["stability"]
    for r in rows:
        assert 0 <= r["stability"] <= 1 and 0 <= r["retrieval"] <= 1 and r["effective_rank"] >= 1
    assert (out / "rank_priors.md").is_file()


@pytest.mark.parametrize("command, args, message", [
    ("diagnose", ["--models", "random", "alexnet:1"], "unknown prior 'alexnet:1'"),
    ("diagnose", ["--models", "random", "none"], "'none' is not a model"),
    ("diagnose", ["--models", "random", "random"], "named twice"),
    ("rank-priors", ["--priors", "checkpoint:/no/such/run"], "does not exist"),
    ("rank-priors", ["--priors", "random", "--prior-weights", "timm:x=y.pt"], "not one of the models"),
    ("rank-priors", ["--priors", "random", "--score", "vibes"], "unknown ranking score 'vibes'"),
    ("diagnose", ["--models", "random", "--dataset", "mnist-ish"], "unknown dataset"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, command, args, message):
    out = tmp_path / "out"
    assert main([command, "--dataset", "synthetic", *args, "--no-progress", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
