"""GPU hygiene checked on CPU: no hard-wired CUDA calls, device-chosen dtypes and copies, bf16 autocast steps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, TINY_STEPS, run_ok, train_module

from rela.hardware import autocast_dtype, to_device

REPO = Path(__file__).resolve().parents[1]


def test_no_unconditional_cuda_calls():
    offenders = [f"{p.relative_to(REPO)}:{i}" for folder in ("rela", "benchmarks") for p in (REPO / folder).rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\.cuda\(\s*\)", line)]
    assert offenders == []  # tensors and modules go .to(device)


def test_autocast_dtype_and_copies_follow_the_device():
    assert autocast_dtype("cpu") == torch.bfloat16
    batch = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    moved = to_device(batch, "cpu")
    assert moved.data_ptr() == batch.data_ptr() and not moved.is_pinned()  # no pinning, no copy without CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copies_are_pinned_and_asynchronous_and_autocast_is_bf16():
    assert autocast_dtype("cuda") == torch.bfloat16
    batch = torch.arange(4 * 3 * 8 * 8, dtype=torch.int64).to(torch.uint8).view(4, 3, 8, 8)
    torch.cuda.set_sync_debug_mode("error")  # a pageable host-to-device copy would synchronise and raise
    try:
        moved = to_device(batch, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), batch)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_trains_in_bf16_by_default(tmp_path):
    out = tmp_path / "run"
    run_ok(["train", *[a for a in TINY if a not in ("--accelerator", "cpu")], "--prior", "random",
            "--switch", "constant:0.5", "--accelerator", "gpu", "--probe-every", "0",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["accelerator"] == "gpu" and saved["precision"] in ("auto", "bf16-mixed")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == "bf16-mixed" and metrics["steps"] == TINY_STEPS


def test_rela_and_byol_steps_run_under_cpu_bf16_autocast(tmp_path, monkeypatch):
    """``--precision bf16-mixed`` on CPU: Lightning runs each step under torch.autocast("cpu", bfloat16)."""
    seen = []
    step = train_module.ReLAModule.training_step

    def recording_step(self, index, batch_idx):
        outputs = []
        hook = self.method.backbone.register_forward_hook(lambda m, i, o: outputs.append(o.dtype))
        try:
            loss = step(self, index, batch_idx)
        finally:
            hook.remove()
        seen.append({"lambda": self.rela.switch.weight(self.progress()), "loss": float(loss),
                     "autocast": torch.is_autocast_enabled("cpu"), "dtype": torch.get_autocast_dtype("cpu"),
                     "backbone_out": set(outputs)})
        return loss

    monkeypatch.setattr(train_module.ReLAModule, "training_step", recording_step)
    run_ok(["train", *TINY, "--prior", "random", "--switch", "constant:0.5", "--method", "byol",
            "--precision", "bf16-mixed", "--accelerator", "cpu", "--probe-every", "0",
            "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    assert {s["lambda"] for s in seen} == {1.0, 0.0}  # ReLA steps, then BYOL steps
    assert all(s["autocast"] and s["dtype"] == torch.bfloat16 for s in seen)
    assert all(s["backbone_out"] == {torch.bfloat16} for s in seen)  # the convolutions really ran in bf16
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in seen)
