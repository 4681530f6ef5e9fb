"""``rela export``: a run's learner backbone in a format that loads without rela.

- ``safetensors``: the backbone's weights, with the metadata needed to use them (architecture,
  channels, image size, normalisation, feature dim) in the file's string header. A ``timm:NAME``
  backbone's keys are timm's own, so ``timm.create_model(NAME, num_classes=0, in_chans=C)`` takes
  them; a ``torchvision:NAME`` one's are torchvision's with the classifier removed (trained on
  grayscale images, it saw them repeated to 3 channels: metadata ``repeat_gray_to_rgb``).
- ``torchscript``: the whole module (``torch.jit.script``), loadable with ``torch.jit.load`` alone,
  whatever the architecture; the same metadata rides along as the extra file ``rela.json``.
  Recent torch marks TorchScript as deprecated (a FutureWarning) but still loads and runs it.

Either way the backbone maps images scaled to [0, 1] and normalised with the metadata's ``mean``
and ``std`` (per channel) to ``feature_dim`` features, in train mode ready for fine-tuning.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rela.backbones import RepeatChannels, feature_dim
from rela.errors import RelaError, unknown
from rela.io import atomic_write
from rela.priors import build_saved_backbone, load_backbone_file

FORMATS = {"safetensors": ".safetensors", "torchscript": ".torchscript.pt"}
METADATA_FILE = "rela.json"  # the extra file of a TorchScript export


def export_backbone(run: str | Path, fmt: str = "safetensors", out: str | Path | None = None) -> Path:
    """Write the backbone of ``run`` (a run folder or its ``backbone.pt``) as ``fmt``; returns the file.

    Default file: ``backbone.safetensors`` or ``backbone.torchscript.pt`` beside ``backbone.pt``.
    """
    if fmt not in FORMATS:
        raise unknown("export format", fmt, FORMATS)
    blob = load_backbone_file(run)
    model = build_saved_backbone(blob)
    dim = blob.get("feature_dim") or feature_dim(model, blob["channels"], blob["image_size"])
    metadata = {"format": "rela-export-v1", "arch": blob["arch"], "channels": blob["channels"],
                "image_size": blob["image_size"], "mean": list(blob["mean"]), "std": list(blob["std"]),
                "feature_dim": dim, "input": "images in [0, 1], minus mean, over std"}
    out = Path(out) if out else Path(blob["path"]).with_name("backbone" + FORMATS[fmt])
    write = _safetensors_writer if fmt == "safetensors" else _torchscript_writer
    atomic_write(out, write(model, metadata))
    return out


def _safetensors_writer(model: nn.Module, metadata: dict):
    try:
        from safetensors.torch import save
    except ImportError:
        raise RelaError("export --format safetensors needs the package safetensors: "
                        "pip install 'rela[export]'") from None
    if isinstance(model, RepeatChannels):  # a 3-channel torchvision model fed grayscale: its own keys
        model, metadata = model.model, {**metadata, "repeat_gray_to_rgb": True}
    # Contiguous copies: channels-last weights and tensors sharing storage cannot be saved as they are.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    header = {k: json.dumps(v) for k, v in metadata.items()}
    return lambda f: f.write(save(tensors, metadata=header))


def _torchscript_writer(model: nn.Module, metadata: dict):
    model = model.cpu().to(memory_format=torch.contiguous_format).train()
    try:
        scripted = torch.jit.script(model)
    except Exception as e:  # noqa: BLE001 - TorchScript rejects many Python constructs
        raise RelaError(f"backbone {metadata['arch']!r} cannot be exported as TorchScript "
                        f"({type(e).__name__}: {str(e).splitlines()[0]}); use --format safetensors") from None
    return lambda f: torch.jit.save(scripted, f, _extra_files={METADATA_FILE: json.dumps(metadata)})
