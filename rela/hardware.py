"""Device-dependent choices in one place, so the CUDA path is the CPU path with other values.

No tensor or module is moved by its CUDA-only method: all go ``.to(device)``, and whether memory is pinned or a
copy is asynchronous follows from the device (pinning and ``non_blocking`` only help, and
pinning only works, with CUDA).
"""

from __future__ import annotations

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
