"""Prior models: any network whose outputs become ReLA's targets.

A :class:`Prior` is a module plus what it needs to see the data the way it was
trained: its input size, normalisation and channel count. Names:

- ``none``: no prior, plain training (the baseline);
- ``random`` / ``random:<arch>``: a randomly initialised backbone (own seed);
  ``random`` alone means the learner's own architecture;
- ``learner-init``: a frozen copy of the learner's own backbone before training (the authors'
  "rand" prior); only where a learner exists (``rela train``: the ``learner`` option);
- ``checkpoint:PATH``: a backbone saved by ``rela train`` (``backbone.pt``);
- ``torchvision:<name>`` / ``timm:<name>``: the library's pretrained weights by
  name when online, or a local state_dict file given as ``weights``;
- ``open_clip:<arch>/<pretrained>``: an OpenCLIP image tower (extra ``rela[open_clip]``),
  its pretrained tag when online, or ``open_clip:<arch>`` plus a local checkpoint
  (the whole CLIP model's state_dict or the visual tower's) given as ``weights``;
- ``hf:<model-id>``: a Hugging Face ``transformers`` vision model (extra ``rela[hf]``)
  by hub id when online, or a local directory written by ``save_pretrained``.

Any other ``torch.nn.Module`` becomes a prior with :meth:`Prior.from_module`.
The names are registered in :data:`rela.registry.PRIORS`; every factory takes the
learner's data description as keyword options (``learner_arch``, ``channels``,
``image_size``, ``mean``, ``std``, ``seed``, ``weights``, ``learner``) and uses what it needs.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rela.backbones import build_backbone, strip_classifier
from rela.data.augment import Normalize, resize_center
from rela.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from rela.errors import RelaError
from rela.io import load_torch
from rela.registry import BACKBONES, PRIORS

BACKBONE_FILE_FORMAT = "rela-backbone-v1"


@dataclass
class Prior:
    name: str
    model: nn.Module
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3

    @classmethod
    def from_module(cls, model: nn.Module, *, input_size: int, mean, std, channels: int = 3,
                    name: str | None = None) -> "Prior":
        """Any module mapping N x channels x input_size x input_size images to features.

        ``mean``/``std`` are the normalisation the model was trained with, per channel
        (a single number applies to every channel). The module is frozen in eval mode.
        """
        mean, std = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
        if not isinstance(input_size, int) or input_size < 1:
            raise RelaError(f"prior input_size must be a positive integer, got {input_size!r}")
        if any(s <= 0 for s in std):
            raise RelaError(f"prior std must be positive, got {std}")
        return cls(name or f"module:{type(model).__name__}", model, input_size, mean, std, channels)

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
                mean, std, seed: int = 0, weights: str | None = None, learner: nn.Module | None = None) -> Prior | None:
    """Turn a prior name into a :class:`Prior` (``None`` for ``none``); ``learner``: the untrained learner backbone."""
    return PRIORS.create(spec, learner_arch=learner_arch, channels=channels, image_size=image_size,
                         mean=mean, std=std, seed=seed, weights=weights, learner=learner)


@PRIORS.register("none", help="no prior: the plain base method")
def _no_prior(**_) -> None:
    return None


def _backbone_name(arch: str) -> str:
    BACKBONES.check(arch)
    return arch


@PRIORS.register("random", arg="ARCH", arg_optional=True, parse=_backbone_name,
                 help="random init of ARCH, default the learner's architecture")
def _random_prior(arch: str | None, *, learner_arch: str, channels: int, image_size: int, mean, std,
                  seed: int, **_) -> Prior:
    arch = arch or learner_arch
    with torch.random.fork_rng(devices=[]):  # the prior's own seed, without moving the learner's RNG
        torch.manual_seed(seed)
        model, _ = build_backbone(arch, channels, image_size)
    return Prior(f"random:{arch}:seed{seed}", model, image_size, tuple(mean), tuple(std), channels)


@PRIORS.register("learner-init", help="a copy of the learner's own initial weights (the authors' random prior)")
def _learner_init_prior(*, learner: nn.Module | None = None, learner_arch: str, channels: int, image_size: int,
                        mean, std, **_) -> Prior:
    if learner is None:
        raise RelaError("prior 'learner-init' copies the learner of a training run; here there is none "
                        "(use random[:ARCH] for a random network)")
    return Prior(f"learner-init:{learner_arch}", copy.deepcopy(learner), image_size, tuple(mean), tuple(std), channels)


def load_backbone_file(path: str | Path) -> dict:
    """Read and check a ``backbone.pt`` written by ``rela train``."""
    path = Path(path)
    if path.is_dir():
        path = path / "backbone.pt"
    if not path.is_file():
        raise RelaError(f"checkpoint {path} does not exist")
    blob = load_torch(path, "checkpoint")  # weights_only: a planted object in it is refused, never run
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


@PRIORS.register("checkpoint", arg="PATH", help="a run folder or backbone.pt of 'rela train'")
def _checkpoint_prior(path: str, **_) -> Prior:
    return load_backbone_prior(path)


def load_backbone_prior(path: str) -> Prior:
    blob = load_backbone_file(path)
    return Prior(f"checkpoint:{blob['arch']}", build_saved_backbone(blob), blob["image_size"],
                 tuple(blob["mean"]), tuple(blob["std"]), blob["channels"])


CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "heads.")


def _per_channel(value, channels: int, what: str) -> tuple[float, ...]:
    values = (float(value),) * channels if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if len(values) != channels:
        raise RelaError(f"prior {what} has {len(values)} values for {channels} channels")
    return values


def _read_state_dict(weights: str) -> dict[str, torch.Tensor]:
    """A state_dict from a torch file (``.pt``/``.pth``/``.bin``) or a ``.safetensors`` file."""
    path = Path(weights)
    if not path.is_file():
        raise RelaError(f"prior weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = load_torch(path, "prior weights")  # weights_only, one-line errors
    except RelaError:
        raise
    except Exception as e:  # noqa: BLE001
        raise RelaError(f"cannot read prior weights {path}: {type(e).__name__}: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RelaError(f"prior weights {path} must hold a state_dict (a mapping of names to tensors)")
    return state


def _load_state_dict(model: nn.Module, weights: str, what: str, state: dict | None = None,
                     ignore: tuple[str, ...] = CLASSIFIER_PREFIXES) -> None:
    path = Path(weights)
    state = _read_state_dict(weights) if state is None else state
    # The file may carry parts we do not use (the classifier we removed); any other extra or
    # missing key means another model.
    extra = [k for k in state if k not in model.state_dict() and not k.startswith(ignore)]
    try:
        missing, _ = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise RelaError(f"prior weights {path} do not fit {what}: {e}") from None
    if missing or extra:
        raise RelaError(f"prior weights {path} do not fit {what}: missing {missing[:5]}, unexpected {extra[:5]}")


@PRIORS.register("torchvision", arg="NAME", help="pretrained weights by name, or --prior-weights FILE offline")
def _torchvision_prior(name: str, weights: str | None = None, **_) -> Prior:
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


@PRIORS.register("timm", arg="NAME", help="pretrained weights by name, or --prior-weights FILE offline")
def _timm_prior(name: str, weights: str | None = None, **_) -> Prior:
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


def _optional(module: str, extra: str, spec: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RelaError(f"prior '{spec}:...' needs the optional package {module}: "
                        f"pip install 'rela[{extra}]'") from None


@PRIORS.register("open_clip", arg="ARCH/TAG", help="an OpenCLIP image tower, rela[open_clip]; offline "
                                                     "open_clip:ARCH --prior-weights FILE")
def _open_clip_prior(arg: str, weights: str | None = None, **_) -> Prior:
    open_clip = _optional("open_clip", "open_clip", "open_clip")
    arch, _, tag = arg.partition("/")
    if arch not in open_clip.list_models():
        raise RelaError(f"unknown open_clip model {arch!r}; see open_clip.list_models()")
    if tag and tag not in open_clip.list_pretrained_tags_by_model(arch):
        raise RelaError(f"unknown pretrained tag {tag!r} for open_clip:{arch}; valid choices: "
                        f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}")
    if not tag and not weights:
        raise RelaError(f"open_clip:{arch} needs a pretrained tag (open_clip:{arch}/TAG, see "
                        "open_clip.list_pretrained()) or a local checkpoint with --prior-weights FILE")
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    try:
        # A tag's weights may need its activation (OpenAI's QuickGELU) also when loaded from a file.
        model = open_clip.create_model(arch, pretrained=None if weights else tag,
                                       force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
    except Exception as e:  # noqa: BLE001 - offline: download errors of several kinds
        raise RelaError(f"cannot download weights for open_clip:{arch}/{tag} ({e}); "
                        "pass a local checkpoint with --prior-weights FILE") from None
    if weights:
        state = _read_state_dict(weights)
        if any(k.startswith("visual.") for k in state):  # a whole CLIP checkpoint: keep its image tower
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        _load_state_dict(model.visual, weights, f"open_clip:{arch} (visual tower)", state, ignore=())
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    size = size[-1] if isinstance(size, (list, tuple)) else size
    mean, std = tag_cfg.get("mean", cfg["mean"]), tag_cfg.get("std", cfg["std"])
    name = f"open_clip:{arch}" + (f"/{tag}" if tag else "")
    return Prior(name, model.visual, int(size), tuple(mean), tuple(std), 3)


class HFImageEncoder(nn.Module):
    """A ``transformers`` vision model as a plain images -> features module.

    Image-text models (CLIP, SigLIP) give their projected image embedding; vision
    models their pooled output, or the mean of the last hidden states (tokens or
    spatial positions) where they have no pooler.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=x)
        else:
            out = self.model(pixel_values=x)
        if isinstance(out, torch.Tensor):
            return out
        if getattr(out, "pooler_output", None) is not None:
            return out.pooler_output.flatten(1)
        hidden = out.last_hidden_state
        return hidden.mean(1) if hidden.ndim == 3 else hidden.flatten(2).mean(2)


@PRIORS.register("hf", arg="ID-OR-DIR", help="a Hugging Face vision model, rela[hf]; offline a "
                                               "save_pretrained folder")
def _hf_prior(model_id: str, weights: str | None = None, **_) -> Prior:
    transformers = _optional("transformers", "hf", "hf")
    if weights:
        raise RelaError("hf priors load offline from a local folder written by save_pretrained: "
                        "use hf:DIR instead of --prior-weights")
    local = Path(model_id).is_dir()
    try:
        model = transformers.AutoModel.from_pretrained(model_id, local_files_only=local)
    except Exception as e:  # noqa: BLE001 - hub errors, missing files, unknown architectures
        where = "folder" if local else "model"
        raise RelaError(f"cannot load hf {where} {model_id!r} ({type(e).__name__}: {e}); offline, "
                        "pass a folder written by save_pretrained as hf:DIR") from None
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(model_id, local_files_only=local)
    except Exception:  # noqa: BLE001 - no preprocessor_config.json: fall back on the model config
        processor = None
    config = getattr(model.config, "vision_config", None) or model.config
    size = getattr(config, "image_size", 224)
    mean, std = IMAGENET_MEAN, IMAGENET_STD  # transformers' own default for vision models
    if processor is not None:
        mean = getattr(processor, "image_mean", None) or mean
        std = getattr(processor, "image_std", None) or std
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
        dims = crop or getattr(processor, "size", None) or {}
        # a dict in older transformers, a SizeDict with attributes in newer ones
        side = {k: dims.get(k) if isinstance(dims, dict) else getattr(dims, k, None)
                for k in ("height", "shortest_edge")}
        size = side["height"] or side["shortest_edge"] or size
    size = size[-1] if isinstance(size, (list, tuple)) else size
    channels = int(getattr(config, "num_channels", 3))
    return Prior(f"hf:{model_id}", HFImageEncoder(model), int(size), tuple(mean), tuple(std), channels)
