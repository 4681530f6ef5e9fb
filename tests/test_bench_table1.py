"""`rela bench table1` end to end on a tiny slice: every requested cell runs once, resumes, reports."""

import json

import pytest

from rela.cli import main


def _bench(tmp_path, *extra):
    return main(["bench", "table1", "--rows", "byol-subset", "rela-random-same", "--budgets", "0.5",
                 "--seeds", "0", "--full-epochs", "1", "--train-limit", "512",
                 "--results", str(tmp_path / "t1.json"), "--runs-dir", str(tmp_path / "runs"), *extra])


def test_table1_grid_runs_resumes_and_reports(tmp_path):
    assert _bench(tmp_path) == 0
    data = json.loads((tmp_path / "t1.json").read_text())
    rows = sorted((r["row"], r["budget"]) for r in data["runs"])
    assert rows == [("byol-2ep", 2.0), ("byol-full", 1.0), ("byol-subset", 0.5), ("rela-random-same", 0.5)]
    for r in data["runs"]:
        for key in ("prior", "seed", "knn_top1", "linear_top1", "wall_seconds", "steps", "images_seen",
                    "switch_step", "cost_seconds"):
            assert key in r, key
        assert 0 <= r["knn_top1"] <= 1 and r["steps"] > 0
    full = next(r for r in data["runs"] if r["row"] == "byol-full")
    assert full["steps"] == 2 and full["images_seen"] == 512  # 512 images, batch 256, one epoch
    rela = next(r for r in data["runs"] if r["row"] == "rela-random-same")
    assert rela["prior"] == "random" and rela["images_seen"] == 256  # half the data each epoch
    assert data["meta"]["command"].startswith("rela bench table1 --rows")
    md = (tmp_path / "t1.md").read_text()
    assert "## Headline (computed)" in md and "BYOL-full (100%)" in md
    assert (tmp_path / "t1_cost.png").stat().st_size > 0
    before = (tmp_path / "t1.json").read_text()
    assert _bench(tmp_path) == 0  # every cell is already in the JSON: nothing reruns
    assert json.loads((tmp_path / "t1.json").read_text())["runs"] == json.loads(before)["runs"]


def test_switch_sweep_needs_a_holdout(tmp_path):
    with pytest.raises(SystemExit, match="needs --holdout"):
        _bench(tmp_path, "--sweep-switch", "never")
