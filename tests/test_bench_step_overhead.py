"""``benchmarks/step_overhead.py`` in a smoke run: both phases measured, the JSON and the report written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_overhead.py"


def test_step_overhead_smoke_writes_both_phases(tmp_path):
    # A script run, as a user makes it: the backbone it registers stays in its process.
    args = [sys.executable, str(SCRIPT), "--warmup", "2", "--steps", "4", "--profile-steps", "4",
            "--results", str(tmp_path), "--label", "smoke"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "step_overhead.json").read_text())
    assert [(r["label"], r["phase"]) for r in report["runs"]] == [("smoke", "rela"), ("smoke", "byol")]
    for run in report["runs"]:
        assert run["ms"] > 0 and run["bare_ms"] > 0 and run["ratio"] == run["ms"] / run["bare_ms"]
        assert run["timed_steps"] == 4 and run["profiled_steps"] >= 2  # profiled steps 6..9: 9 logs (--log-every 10)
        assert run["syncs"] == 0 and run["ops"] > 100  # the step reads nothing back from the device
    assert "| smoke | rela |" in (tmp_path / "step_overhead.md").read_text()
