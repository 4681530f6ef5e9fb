"""benchmarks/fidelity.py and benchmarks/conditioning.py end to end on a tiny slice of Fashion-MNIST: run as
scripts from an empty folder, every requested cell once, resumable, results only under --results."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import needs_fmnist

from rela.config import TrainConfig
from rela.registry import PRESETS

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SMOKE = ["--epochs", "1", "--seeds", "0", "--train-limit", "2048", "--test-limit", "500"]
sys.path.insert(0, str(BENCHMARKS))


def _script(tmp_path, name: str, *args) -> subprocess.CompletedProcess:
    (tmp_path / "cwd").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *SMOKE, *map(str, args), "--results",
                           str(tmp_path / "res"), "--runs-dir", str(tmp_path / "runs")],
                          cwd=tmp_path / "cwd", capture_output=True, text=True, timeout=1800)


def test_fidelity_rows_cover_every_field_of_the_authors_preset_once():
    from common import BENCH_SWITCH
    from fidelity import DEVIATIONS, row_fields

    # the benchmark's defaults row runs BENCH_SWITCH (adaptive, the authors' rule, what its committed results
    # used), not rela's default switch (soft-plateau since issue 28): against it the switch is no deviation
    preset, default = PRESETS.create("authors"), TrainConfig(switch=BENCH_SWITCH)
    deviating = {k for k, v in preset.items() if getattr(default, k) != v}
    grouped = [k for fields in DEVIATIONS.values() for k in fields]
    assert sorted(grouped) == sorted(deviating)  # each deviation in exactly one row
    assert row_fields("frozen-head") == {"transfer_head": "frozen"} and row_fields("defaults") == {}
    # a --switch pass runs the authors' row with that switch too (cell_config applies it last): its fields say so
    assert row_fields("authors")["switch"] == "adaptive" and row_fields("authors", "constant:0.75")["switch"] == "constant:0.75"
    assert row_fields("defaults", "constant:0.75") == {}  # the pass's switch is in its command, not a deviation


@needs_fmnist
def test_fidelity_script_runs_resumes_and_writes_only_its_results(tmp_path):
    done = _script(tmp_path, "fidelity.py", "--rows", "defaults", "authors")
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "res" / "fidelity_e1.json").read_text())
    assert [r["row"] for r in data["runs"]] == ["defaults", "authors"]
    for r in data["runs"]:
        assert 0 < r["knn_top1"] <= 1 and 0 < r["knn20_top1"] <= 1 and 0 < r["linear_top1"] <= 1
        assert r["steps"] == 1 and r["target_dim"] == 128 and 0 < r["target_explained_variance"] <= 1
    assert data["runs"][1]["fields"]["transfer_head"] == "frozen"
    assert data["meta"]["command"].startswith("python benchmarks/fidelity.py")
    md = (tmp_path / "res" / "fidelity_e1.md").read_text()  # _e1: off the default cell, named so
    assert "| authors |" in md and "ported to CPU" not in md  # the port was measured on the 4-epoch cell only
    assert list((tmp_path / "cwd").iterdir()) == []
    before = (tmp_path / "res" / "fidelity_e1.json").read_text()
    assert _script(tmp_path, "fidelity.py", "--rows", "defaults", "authors").returncode == 0  # nothing reruns
    assert json.loads((tmp_path / "res" / "fidelity_e1.json").read_text())["runs"] == json.loads(before)["runs"]


@needs_fmnist
def test_conditioning_script_chooses_on_the_holdout_and_reports_on_test(tmp_path):
    done = _script(tmp_path, "conditioning.py", "--variances", "0.9", "1.0", "--dtypes", "float16", "--ratios", "0.2",
                   "--holdout", "1024", "--margin", "100")
    assert done.returncode == 0, done.stderr[-3000:]
    val = json.loads((tmp_path / "res" / "conditioning_e1_val1024.json").read_text())
    dims = {r["target_variance"]: r["target_dim"] for r in val["runs"]}
    assert set(dims) == {0.9, 1.0} and dims[0.9] < dims[1.0] == 128
    test = json.loads((tmp_path / "res" / "conditioning_e1.json").read_text())
    # a margin of 100 points keeps today's default: the test split runs only it
    assert [(r["target_variance"], r["bank_dtype"], r["ratio"]) for r in test["runs"]] == [(1.0, "float16", 0.2)]
    assert "Chosen" in (tmp_path / "res" / "conditioning_e1_val1024.md").read_text()
    assert list((tmp_path / "cwd").iterdir()) == []
