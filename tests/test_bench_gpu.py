"""``benchmarks/gpu.py --smoke``: the GPU benchmark's code path on CPU, from Fashion-MNIST files on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import make_fashion_root

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def test_gpu_benchmark_smoke_runs_on_cpu_and_writes_its_report(tmp_path):
    make_fashion_root(tmp_path / "fmnist", n_train=320, n_test=160)
    # A script run, as a user makes it: the dataset it registers and the settings it makes stay in its process.
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--data-root", str(tmp_path / "fmnist"),
                           "--results", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_smoke.json").read_text())
    # every run on the memory path; BYOL-full and ReLA-20 % again on the DataLoader path, from PNG files
    assert list(report["runs"]) == ["byol-full", "byol-full-stream", "rela-10", "rela-20", "rela-20-stream", "rela-50"]
    assert {r["data_path"] for n, r in report["runs"].items() if n.endswith("-stream")} == {"stream"}
    pngs = sorted((tmp_path / "runs").glob("fmnist-rgb32-png-*/train/*/*.png"))
    assert len(pngs) == 320 and not list((tmp_path / "runs").glob("*.partial-*"))
    for name, run in report["runs"].items():
        assert run["images_per_second"] > 0 and 0 <= run["knn_top1"] <= 1 and 0 <= run["linear_top1"] <= 1
        assert 0 <= run["data_wait_fraction"] < 1
        assert run["gpu_busy_fraction"] is None and run["peak_gpu_memory_gb"] is None  # CPU: not measured
    assert report["runs"]["byol-full"]["cost_ratio"] == 1.0
    assert report["runs"]["rela-10"]["bank_seconds"] > 0  # ReLA runs extract a bank of the 32x32 RGB images
    # the same pixels on both paths: the stream run's bank is extracted from the PNG files, its accuracy is measured
    assert report["runs"]["rela-20-stream"]["bank_seconds"] > 0
    assert "| rela-50 | 0.5 | memory |" in (tmp_path / "out" / "gpu_smoke.md").read_text()
