"""``benchmarks/gpu.py --smoke``: the GPU benchmark's code path on CPU, from Fashion-MNIST files on disk.

One benchmark is killed midway, then called again: the finished runs survive the kill and are not
run again; every run kind (the bare step, rela's runs on both data paths, lightly's recipe) reports
every figure.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_fashion_root

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
ALL_RUNS = ["bare", "byol-full", "rela-20", "lightly-byol", "byol-full-stream", "rela-10", "rela-50", "rela-20-stream"]
# what the issue asks of every run: rate, share of the bare step, lightly ratio, GPU busy, data wait,
# TFLOP/s, peak memory, accuracy, cost as seconds and as FLOPs
FIELDS = {"images_per_second", "bare_share", "lightly_ratio", "byol_ratio", "memory_ratio", "gpu_busy_fraction", "data_wait_fraction",
          "tflops_per_second", "flops_per_image", "kernels_per_step", "host_syncs_per_step", "peak_gpu_memory_gb",
          "knn_top1", "linear_top1",
          "cost_seconds", "cost_flops", "cost_seconds_ratio", "cost_flops_ratio", "fit_seconds", "steps",
          "images_seen", "precision", "switch_step", "kind", "data_path"}


def command(root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--smoke", "--data-root", str(root / "fmnist"), "--results",
            str(root / "out"), "--runs-dir", str(root / "runs"), *extra]


def report(root: Path) -> dict:
    """The results file, its runs by name (in the order stored)."""
    data = json.loads((root / "out" / "gpu_smoke-cpu.json").read_text())
    return {**data, "runs": {r["run"]: r for r in data["runs"]}}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A smoke benchmark killed (SIGKILL) after its second run is stored, then called again to the end."""
    root = tmp_path_factory.mktemp("bench")
    make_fashion_root(root / "fmnist", n_train=320, n_test=160)
    # A script run, as a user makes it: the dataset it registers and the settings it makes stay in its process.
    proc = subprocess.Popen(command(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results, deadline = root / "out" / "gpu_smoke-cpu.json", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if results.is_file() and len(report(root)["runs"]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the benchmark ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = report(root)
    done = subprocess.run(command(root), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, killed, done.stdout


def test_a_killed_benchmark_keeps_its_finished_runs_and_the_next_call_skips_them(bench):
    root, killed, stdout = bench
    finished = list(killed["runs"])
    assert finished == ALL_RUNS[:len(finished)] and len(finished) < len(ALL_RUNS)
    for name in finished:
        assert FIELDS <= set(killed["runs"][name])  # complete records, written after each run
        assert f"{name}: stored in" in stdout and f"{name}: running" not in stdout
    for name in ALL_RUNS[len(finished):]:
        assert f"{name}: running" in stdout
    after = report(root)
    # the stored measurements are kept as they were (derived ratios are recomputed as runs are added)
    for name in finished:
        assert after["runs"][name]["images_per_second"] == killed["runs"][name]["images_per_second"]
        assert after["runs"][name]["fit_seconds"] == killed["runs"][name]["fit_seconds"]


def test_every_run_kind_reports_every_figure(bench):
    root = bench[0]
    runs = report(root)["runs"]
    assert list(runs) == ALL_RUNS
    assert {n: r["data_path"] for n, r in runs.items() if r["data_path"] != "memory"} == {
        "bare": "device", "lightly-byol": "stream", "byol-full-stream": "stream", "rela-20-stream": "stream"}
    bare, peer = runs["bare"]["images_per_second"], runs["lightly-byol"]["images_per_second"]
    for name, run in runs.items():
        assert FIELDS <= set(run), name
        assert run["images_per_second"] > 0 and run["steps"] > 0 and run["flops_per_image"] > 0
        assert run["bare_share"] == pytest.approx(run["images_per_second"] / bare)
        assert run["lightly_ratio"] == pytest.approx(run["images_per_second"] / peer)
        assert run["tflops_per_second"] == pytest.approx(run["flops_per_image"] * run["images_per_second"] / 1e12)
        assert 0 <= run["data_wait_fraction"] < 1
        for cuda_only in ("gpu_busy_fraction", "kernels_per_step", "host_syncs_per_step", "peak_gpu_memory_gb"):
            assert run[cuda_only] is None  # CPU: not measured
        assert run["precision"] == "32-true"
        if name == "bare":  # trains on one fixed batch: no accuracy, no training cost
            assert [run[k] for k in ("knn_top1", "linear_top1", "cost_seconds", "cost_flops")] == [None] * 4
            continue
        assert 0 <= run["knn_top1"] <= 1 and 0 <= run["linear_top1"] <= 1
        assert run["cost_seconds"] >= run["fit_seconds"] > 0 and run["cost_flops"] > 0
    assert runs["byol-full"]["cost_seconds_ratio"] == 1.0 and runs["byol-full"]["cost_flops_ratio"] == 1.0
    rate = {name: run["images_per_second"] for name, run in runs.items()}
    assert runs["rela-20"]["byol_ratio"] == pytest.approx(rate["rela-20"] / rate["byol-full"])
    assert runs["rela-20-stream"]["byol_ratio"] == pytest.approx(rate["rela-20-stream"] / rate["byol-full-stream"])
    assert runs["rela-20-stream"]["memory_ratio"] == pytest.approx(rate["rela-20-stream"] / rate["rela-20"])
    assert runs["bare"]["byol_ratio"] is runs["lightly-byol"]["byol_ratio"] is runs["rela-20"]["memory_ratio"] is None
    # ReLA at 10 % trains on a tenth of the images per epoch, plus a bank: well under BYOL-full's FLOPs
    assert runs["rela-10"]["cost_flops_ratio"] < 0.5 and runs["rela-10"]["bank_flops"] > 0
    for name in ("rela-10", "rela-20", "rela-50", "rela-20-stream"):
        assert runs[name]["bank_seconds"] > 0 and runs[name]["bank_cache_hit"] is False  # each run extracts its bank
    # lightly's recipe: the same images per epoch as BYOL-full, its own (SGD) step, read from the PNG files
    assert runs["lightly-byol"]["images_seen"] == runs["byol-full"]["images_seen"] == 320
    assert (root / "runs" / "lightly-byol" / "backbone.pt").is_file()  # evaluated through rela.evaluate
    pngs = sorted((root / "runs").glob("fmnist-rgb32-png-*/train/*/*.png"))
    assert len(pngs) == 320 and not list((root / "runs").glob("*.partial-*"))
    md = (root / "out" / "gpu_smoke-cpu.md").read_text()
    assert all(f"| {name} |" in md for name in ALL_RUNS)


def test_fresh_discards_the_stored_runs_and_other_settings_are_refused(bench):
    root = bench[0]
    other = subprocess.run(command(root, "--profile-steps", "5", "--runs", "bare"), capture_output=True, text=True,
                           timeout=300)
    assert other.returncode != 0 and "other settings" in other.stderr
    assert list(report(root)["runs"]) == ALL_RUNS  # untouched
    done = subprocess.run(command(root, "--fresh", "--runs", "bare"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(report(root)["runs"]) == ["bare"] and "bare: running" in done.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_meter_counts_kernels_and_host_syncs_on_cuda(monkeypatch):
    """What the GPU figures rest on: a loop with an ``.item()`` per step shows one host sync per step more."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from gpu import Meter

    x = torch.randn(256, 256, device="cuda")

    def loop(sync: bool) -> dict:
        meter, y = Meter("cuda", warmup=2, profile_steps=3, sync_steps=4), x
        meter.start(12)
        for step in range(12):
            meter.before_step(step, 64 * step)
            y = (y @ x).tanh()
            if sync:
                y.sum().item()
            meter.after_step(step + 1)
        meter.finish(64 * 12, 12)
        return meter.record()

    free, synced = loop(False), loop(True)
    assert free["host_syncs_per_step"] == 0 and synced["host_syncs_per_step"] >= 1
    assert free["kernels_per_step"] >= 2 and 0 < free["gpu_busy_fraction"] <= 1 and free["peak_gpu_memory_gb"] > 0
    assert free["timed_images"] == 64 * 10 and free["images_per_second"] > 0
