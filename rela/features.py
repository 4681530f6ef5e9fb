"""One no-grad pass of a model over an in-memory image tensor, batch by batch."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from rela.hardware import to_device


@torch.no_grad()
def embed(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *, batch_size: int = 512,
          device: str | torch.device = "cpu", desc: str | None = None) -> torch.Tensor:
    """``model`` maps a uint8 batch (moved to ``device``) to features; returns N x k float32 on CPU."""
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=desc is None, leave=False):
        batch = to_device(images[start: start + batch_size], device)
        out.append(model(batch).flatten(1).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)
