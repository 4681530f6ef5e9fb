"""benchmarks/data_scale.py end to end on a tiny folder: it generates real JPEGs, measures stream and memory
mode through ``rela train`` in child processes, and reports the targets and the ImageNet projection."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import make_fashion_root

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "data_scale.py"


def test_data_scale_measures_both_modes_and_projects_imagenet(tmp_path):
    make_fashion_root(tmp_path / "fmnist", n_train=200, n_test=100)
    done = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "300", "--workers", "1", "--image-size", "32",
                           "--batch-size", "32", "--ratio", "0.5", "--data-root", str(tmp_path / "fmnist"),
                           "--data-dir", str(tmp_path / "work"), "--results", str(tmp_path / "res")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # 300 files from 300 Fashion-MNIST images (train then test), each a JPEG in its class folder
    jpegs = sorted((tmp_path / "work" / "jpeg-300").glob("*/*.jpg"))
    assert len(jpegs) == 300 and all(p.read_bytes()[:2] == b"\xff\xd8" for p in jpegs[:5])
    runs = json.loads((tmp_path / "res" / "data_scale.json").read_text())["runs"]
    assert sorted((r["n"], r["mode"]) for r in runs) == [(300, "memory"), (300, "stream")]
    for r in runs:
        assert r["images_seen"] == 128 and r["train_images_per_s"] > 0 and r["extract_images_per_s"] > 0
        assert 0 <= r["data_wait_fraction"] < 1 and r["bank_bytes"] > 300 * 32
        assert 50 < r["peak_pss_mb"] <= r["peak_rss_mb"]  # PSS counts a shared page once: at most the RSS sum
    report = (tmp_path / "res" / "data_scale.md").read_text()
    assert "ImageNet" in report and "stream/memory" in report
