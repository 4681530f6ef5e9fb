"""Prior models: any network whose outputs become ReLA's targets.

A :class:`Prior` is a module plus what it needs to see the data the way it was
trained: its input size, normalisation and channel count. Names:

- ``none``: no prior, plain training (the baseline);
- ``random`` / ``random:<arch>``: a randomly initialised backbone (own seed);
  ``random`` alone means the learner's own architecture;
- ``checkpoint:PATH``: a backbone saved by ``rela train`` (``backbone.pt``);
- ``torchvision:<name>`` / ``timm:<name>``: the library's pretrained weights by
  name when online, or a local state_dict file given as ``weights``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rela.backbones import build_backbone, strip_classifier
from rela.data.augment import Normalize, resize_center
from rela.errors import RelaError

PRIOR_CHOICES = ("none", "random", "random:<arch>", "checkpoint:PATH", "torchvision:<name>", "timm:<name>")
BACKBONE_FILE_FORMAT = "rela-backbone-v1"


@dataclass
class Prior:
    name: str
    model: nn.Module
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3

    def __post_init__(self):
        self.model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.normalize = Normalize(self.mean, self.std, self.channels)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """T_eval: resize/center-crop to the prior's input size, its normalisation."""
        return self.normalize.to(images.device)(resize_center(images, self.input_size))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(images)).flatten(1).float()

    def identity(self) -> str:
        """What the prior computes: name, preprocessing and a hash of every weight."""
        h = hashlib.sha256(f"{self.name}|{self.input_size}|{self.mean}|{self.std}|{self.channels}".encode())
        for key, tensor in sorted(self.model.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def build_prior(spec: str, *, learner_arch: str, channels: int, image_size: int,
                mean, std, seed: int = 0, weights: str | None = None) -> Prior | None:
    """Turn a prior name into a :class:`Prior` (``None`` for ``none``)."""
    kind, _, arg = spec.partition(":")
    if spec == "none":
        return None
    if kind == "random":
        arch = arg or learner_arch
        with torch.random.fork_rng(devices=[]):  # the prior's own seed, without moving the learner's RNG
            torch.manual_seed(seed)
            model, _ = build_backbone(arch, channels, image_size)
        return Prior(f"random:{arch}:seed{seed}", model, image_size, tuple(mean), tuple(std), channels)
    if kind == "checkpoint":
        return load_backbone_prior(arg)
    if kind == "torchvision":
        return _torchvision_prior(arg, weights)
    if kind == "timm":
        return _timm_prior(arg, weights)
    raise RelaError(f"unknown prior {spec!r}; valid choices: {', '.join(PRIOR_CHOICES)}")


def load_backbone_file(path: str | Path) -> dict:
    """Read and check a ``backbone.pt`` written by ``rela train``."""
    path = Path(path)
    if path.is_dir():
        path = path / "backbone.pt"
    if not path.is_file():
        raise RelaError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise RelaError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(blob, dict) or blob.get("format") != BACKBONE_FILE_FORMAT:
        raise RelaError(f"{path} is not a backbone saved by 'rela train' (format {BACKBONE_FILE_FORMAT})")
    blob["path"] = str(path)
    return blob


def build_saved_backbone(blob: dict) -> nn.Module:
    model, _ = build_backbone(blob["arch"], blob["channels"], blob["image_size"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise RelaError(f"checkpoint {blob['path']} does not fit architecture {blob['arch']!r}: {e}") from None
    return model


def load_backbone_prior(path: str) -> Prior:
    blob = load_backbone_file(path)
    return Prior(f"checkpoint:{blob['arch']}", build_saved_backbone(blob), blob["image_size"],
                 tuple(blob["mean"]), tuple(blob["std"]), blob["channels"])


CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "heads.")


def _load_state_dict(model: nn.Module, weights: str, what: str) -> None:
    path = Path(weights)
    if not path.is_file():
        raise RelaError(f"prior weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise RelaError(f"cannot read prior weights {path}: {type(e).__name__}: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RelaError(f"prior weights {path} must hold a state_dict (a mapping of names to tensors)")
    # The file may carry the classifier we removed; any other extra or missing key means another model.
    extra = [k for k in state if k not in model.state_dict() and not k.startswith(CLASSIFIER_PREFIXES)]
    try:
        missing, _ = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise RelaError(f"prior weights {path} do not fit {what}: {e}") from None
    if missing or extra:
        raise RelaError(f"prior weights {path} do not fit {what}: missing {missing[:5]}, unexpected {extra[:5]}")


def _torchvision_prior(name: str, weights: str | None) -> Prior:
    from torchvision import models

    try:
        builder_weights = models.get_model_weights(name).DEFAULT
    except ValueError:
        raise RelaError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()") from None
    if weights:
        model = models.get_model(name, weights=None)
        strip_classifier(model)
        _load_state_dict(model, weights, f"torchvision:{name}")
    else:
        try:
            model = models.get_model(name, weights=builder_weights)
        except Exception as e:  # noqa: BLE001 - offline: URLError, OSError, ...
            raise RelaError(f"cannot download weights for torchvision:{name} ({e}); "
                            "pass a local state_dict with --prior-weights FILE") from None
        strip_classifier(model)
    preset = builder_weights.transforms()
    size = preset.crop_size[0] if isinstance(preset.crop_size, (list, tuple)) else preset.crop_size
    return Prior(f"torchvision:{name}", model, int(size), tuple(preset.mean), tuple(preset.std), 3)


def _timm_prior(name: str, weights: str | None) -> Prior:
    try:
        import timm
    except ImportError:
        raise RelaError("prior 'timm:...' needs the optional package timm: pip install 'rela[timm]'") from None
    if not timm.is_model(name):
        raise RelaError(f"unknown timm model {name!r}; see timm.list_models()")
    try:
        model = timm.create_model(name, pretrained=not weights, num_classes=0)
    except Exception as e:  # noqa: BLE001
        raise RelaError(f"cannot download weights for timm:{name} ({e}); "
                        "pass a local state_dict with --prior-weights FILE") from None
    if weights:
        _load_state_dict(model, weights, f"timm:{name}")
    cfg = model.pretrained_cfg
    return Prior(f"timm:{name}", model, int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]),
                 int(cfg["input_size"][0]))
