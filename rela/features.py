"""One no-grad pass of a model over images, batch by batch: an in-memory tensor, or a stream set's files."""

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


@torch.no_grad()
def embed_files(model: Callable[[torch.Tensor], torch.Tensor], data, *, batch_size: int = 512,
                device: str | torch.device = "cpu", workers: int = 0,
                desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`embed` for a :class:`rela.data.stream.StreamSet`: its files decoded batch by batch in
    ``workers`` DataLoader workers, so memory holds the features, never the decoded images.

    Returns the features and the dataset indices they belong to: a file that does not decode is a
    one-line error, or, when the set skips bad images, left out (with its index).
    """
    from rela.data.stream import decode_loader
    from rela.errors import RelaError

    batches = [list(range(s, min(s + batch_size, len(data)))) for s in range(0, len(data), batch_size)]
    loader = decode_loader(data, batches, workers, pin_memory=str(device).startswith("cuda"))
    out, index = [], []
    for batch in tqdm(loader, total=len(batches), desc=desc, disable=desc is None, leave=False):
        data.bad(batch["bad"])
        if len(batch["index"]):
            out.append(model(to_device(batch["image"], device)).flatten(1).float().cpu())
            index.append(batch["index"])
    if not out:
        raise RelaError(f"none of the images of {data.name} ({data.split}) decodes")
    return torch.cat(out), torch.cat(index)
