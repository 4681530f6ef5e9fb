"""rela.hardware's heap housekeeping, in a fresh process (the glibc settings are process-wide)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import torch
from rela.hardware import HeapGuard, keep_freed_memory, resident_bytes
assert keep_freed_memory()
guard = HeapGuard(slack=256 * 2**20)
assert guard.step() is False                    # the first reading is the base
small = torch.ones(16 * 2**20 // 4); del small  # growth within the slack: nothing to do
assert guard.step() is False
big = torch.ones(768 * 2**20 // 4)              # freed, but kept resident by keep_freed_memory
del big
held = resident_bytes()
assert guard.step() is True and guard.trims == 1
released = held - resident_bytes()
assert released > 512 * 2**20, released
assert guard.step() is False                    # back under base + slack
print("ok", released // 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap settings")
def test_heap_guard_trims_only_past_its_slack():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")
