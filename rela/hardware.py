"""Device-dependent choices in one place, so the CUDA path is the CPU path with other values.

No tensor or module is moved by its CUDA-only method: all go ``.to(device)``, and whether memory is pinned or a
copy is asynchronous follows from the device (pinning and ``non_blocking`` only help, and
pinning only works, with CUDA).
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch


def device_type(device: str | torch.device) -> str:
    return torch.device(device).type


def autocast_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 where it is fast and safe (CPU, CUDA from Ampere on), else float16 (older GPUs)."""
    if device_type(device) == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def to_device(batch: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Copy a host batch to ``device``: through pinned memory and asynchronously with CUDA, plainly otherwise."""
    if device_type(device) == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def keep_freed_memory() -> bool:
    """glibc only: keep freed activation memory in the process instead of returning it to the kernel.

    By default glibc serves blocks above 128 KiB with mmap and trims the heap, so every CPU training
    step page-faults its activations in again: benchmarks/step_cost.py measured 10-40% of a CPU step
    spent there. With no mmap for blocks below 32 MiB, no mmap at all and no trimming, the memory of
    one step is reused by the next. Peak memory is unchanged (the same blocks are live at the peak);
    the process just does not shrink between steps. Returns whether glibc accepted the settings
    (False elsewhere: macOS, musl, Windows).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
        return (bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
                and bool(libc.mallopt(m_mmap_max, 0)))
    except (OSError, AttributeError):
        return False


def release_freed_memory() -> bool:
    """glibc only: hand the free pages of the heap back to the kernel (``malloc_trim(0)``).

    With :func:`keep_freed_memory` the heap never shrinks by itself, and long-lived small blocks
    allocated between large short-lived ones (a chunk's features between batches of activations)
    leave holes that the heap grows past: resident memory then grows with the number of images.
    Trimming at a few points (after each bank chunk, before training) returns those holes; the
    steps in between keep their fast reuse. Returns whether anything was released.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def resident_bytes() -> int | None:
    """This process's resident memory (Linux: /proc/self/statm), None where that file does not exist."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapGuard:
    """Trims the heap when resident memory grows past its level after the first batch, plus ``slack``.

    With :func:`keep_freed_memory` a loop of equal batches should hold one batch's working set, and
    often does; but in some runs (same code, same data: it depends on timing) the heap fragments and
    grows: measured extracting a bank at 64 px with a convnet prior in batches of 128-512, +1 to +3 GB
    over a 16384-image chunk in about half the runs. Which allocation pins the holes is not known (one
    malloc arena, or one preallocated feature buffer per chunk, did not stop it). Trimming after every
    batch would page-fault every batch's activations in again (extraction 2.3x slower, measured), so
    this trims only when the growth shows: a loop that does not fragment never pays. Call
    :meth:`step` after each batch.
    """

    def __init__(self, slack: int = 512 * 2**20):
        self.slack, self.base, self.trims = slack, None, 0

    def step(self) -> bool:
        """Trim if resident memory exceeds the first reading by more than ``slack``; returns whether it trimmed."""
        now = resident_bytes()
        if now is None:
            return False
        if self.base is None:
            self.base = now
            return False
        if now <= self.base + self.slack:
            return False
        self.trims += 1
        return release_freed_memory()
