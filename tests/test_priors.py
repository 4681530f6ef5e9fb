"""Prior models: random, a saved rela backbone, torchvision and timm models from local weight files."""

from __future__ import annotations

import pytest
import torch
from conftest import backbone_state

from rela.backbones import build_backbone
from rela.data import load_dataset
from rela.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from rela.errors import RelaError
from rela.priors import Prior, build_prior


def _random(seed, arch="convnet", channels=3, size=16):
    return build_prior(f"random:{arch}", learner_arch="resnet18", channels=channels, image_size=size,
                       mean=(0.5,) * channels, std=(0.25,) * channels, seed=seed)


def test_none_prior():
    assert build_prior("none", learner_arch="convnet", channels=3, image_size=16, mean=(0.5,) * 3,
                       std=(0.25,) * 3) is None


def test_random_prior_is_deterministic_per_seed():
    a, b, c = _random(3), _random(3), _random(4)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert a.identity() == b.identity() != c.identity()
    x = load_dataset("synthetic:20").images
    assert torch.equal(a(x), b(x))
    assert not torch.allclose(a(x), c(x))


def test_random_prior_does_not_consume_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _random(0)
    assert torch.equal(torch.rand(3), expected)


def test_random_prior_defaults_to_learner_arch_and_is_frozen():
    prior = build_prior("random", learner_arch="resnet-narrow", channels=1, image_size=16, mean=(0.5,),
                        std=(0.25,), seed=0)
    assert prior.name == "random:resnet-narrow:seed0"
    assert not prior.model.training
    assert not any(p.requires_grad for p in prior.model.parameters())
    feats = prior(torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8))
    assert feats.shape == (4, 128) and feats.dtype == torch.float32 and not feats.requires_grad


def test_random_prior_features_are_the_backbone_on_normalised_input():
    prior = _random(5)
    torch.manual_seed(5)
    model, _ = build_backbone("convnet", 3, 16)
    model.eval()
    x = load_dataset("synthetic:20").images
    with torch.no_grad():
        expected = model((x.float() / 255 - 0.5) / 0.25)
    torch.testing.assert_close(prior(x), expected)


def test_unknown_random_arch():
    with pytest.raises(RelaError, match="'alexnet-ish'"):
        _random(0, arch="alexnet-ish")


# --- checkpoint:PATH ------------------------------------------------------------------


def test_checkpoint_prior_reproduces_saved_backbone(random_run):
    blob = torch.load(random_run / "backbone.pt", map_location="cpu", weights_only=True)
    assert blob["arch"] == "convnet" and blob["channels"] == 3 and blob["image_size"] == 16
    prior = build_prior(f"checkpoint:{random_run / 'backbone.pt'}", learner_arch="resnet18", channels=1,
                        image_size=28, mean=(0.1,), std=(0.2,))
    # the prior sees data the way the saved learner did, whatever the new learner is
    assert (prior.input_size, prior.channels) == (16, 3)
    assert prior.mean == tuple(blob["mean"]) and prior.std == tuple(blob["std"])

    model, _ = build_backbone("convnet", 3, 16)
    model.load_state_dict(backbone_state(random_run))
    model.eval()
    x = load_dataset("synthetic:32", "test").images
    mean, std = torch.tensor(blob["mean"]).view(1, 3, 1, 1), torch.tensor(blob["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model((x.float() / 255 - mean) / std)
    torch.testing.assert_close(prior(x), expected)
    # the run folder itself is accepted too
    by_dir = build_prior(f"checkpoint:{random_run}", learner_arch="convnet", channels=3, image_size=16,
                         mean=(0.5,) * 3, std=(0.25,) * 3)
    assert by_dir.identity() == prior.identity()


def test_checkpoint_prior_errors(tmp_path):
    kw = {"learner_arch": "convnet", "channels": 3, "image_size": 16, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    with pytest.raises(RelaError, match="missing.pt"):
        build_prior(f"checkpoint:{tmp_path / 'missing.pt'}", **kw)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(RelaError, match="garbage.pt"):
        build_prior(f"checkpoint:{garbage}", **kw)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(RelaError, match="not a backbone saved by 'rela train'"):
        build_prior(f"checkpoint:{foreign}", **kw)


def test_checkpoint_prior_with_wrong_arch(random_run, tmp_path):
    blob = torch.load(random_run / "backbone.pt", map_location="cpu", weights_only=True)
    blob["arch"] = "resnet-narrow"
    torch.save(blob, tmp_path / "backbone.pt")
    with pytest.raises(RelaError, match="does not fit architecture 'resnet-narrow'"):
        build_prior(f"checkpoint:{tmp_path}", learner_arch="convnet", channels=3, image_size=16,
                    mean=(0.5,) * 3, std=(0.25,) * 3)


# --- torchvision / timm from local weight files ----------------------------------------------

KW = {"learner_arch": "convnet", "channels": 1, "image_size": 28, "mean": (0.5,), "std": (0.25,)}


def _imagenet_input(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=g)


def _normalise(x):
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None)  # with its 1000-class head, as a downloaded file would have
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_torchvision_prior_from_local_weights(torchvision_weights):
    path, reference = torchvision_weights
    prior = build_prior("torchvision:resnet18", weights=str(path), **KW)
    assert prior.name == "torchvision:resnet18"
    assert prior.input_size == 224 and prior.channels == 3
    assert prior.mean == pytest.approx(IMAGENET_MEAN) and prior.std == pytest.approx(IMAGENET_STD)
    torch.testing.assert_close(prior.model.conv1.weight, reference.conv1.weight)
    x = _imagenet_input()
    reference.eval()
    reference.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = reference(_normalise(x))
    feats = prior(x)
    assert feats.shape == (2, 512)
    torch.testing.assert_close(feats, expected, atol=1e-4, rtol=1e-4)
    # small grayscale images are resized to 224 and given three channels
    small = prior(torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8))
    assert small.shape == (2, 512) and torch.isfinite(small).all()


def test_torchvision_prior_errors(tmp_path, torchvision_weights):
    with pytest.raises(RelaError, match="does not exist"):
        build_prior("torchvision:resnet18", weights=str(tmp_path / "nope.pth"), **KW)
    with pytest.raises(RelaError, match="'not_a_model'"):
        build_prior("torchvision:not_a_model", weights=str(torchvision_weights[0]), **KW)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(RelaError, match="junk.pth"):
        build_prior("torchvision:resnet18", weights=str(tmp_path / "junk.pth"), **KW)
    # weights of another architecture: trunk weights missing
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(RelaError, match="do not fit torchvision:resnet18"):
        build_prior("torchvision:resnet18", weights=str(tmp_path / "other.pth"), **KW)


@pytest.mark.parametrize("content", ["wrong-shape", "tensor"])
def test_torchvision_prior_rejects_unfitting_weights_as_user_error(tmp_path, torchvision_weights, content):
    state = torch.load(torchvision_weights[0], weights_only=True)
    if content == "wrong-shape":
        state["conv1.weight"] = torch.zeros(64, 3, 3, 3)  # every key present, one with the wrong shape
    else:
        state = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(RelaError, match="bad.pth"):
        build_prior("torchvision:resnet18", weights=str(tmp_path / "bad.pth"), **KW)


def test_timm_prior_from_local_weights(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False)  # with classifier
    path = tmp_path / "timm-resnet18.pth"
    torch.save(reference.state_dict(), path)
    prior = build_prior("timm:resnet18", weights=str(path), **KW)
    assert prior.name == "timm:resnet18"
    assert prior.input_size == 224 and prior.channels == 3
    assert prior.mean == pytest.approx(IMAGENET_MEAN) and prior.std == pytest.approx(IMAGENET_STD)
    reference.reset_classifier(0)
    reference.eval()
    x = _imagenet_input(seed=1)
    with torch.no_grad():
        expected = reference(_normalise(x))
    feats = prior(x)
    assert feats.shape == (2, 512)
    torch.testing.assert_close(feats, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(RelaError, match="'no_such_timm_model'"):
        build_prior("timm:no_such_timm_model", weights=str(path), **KW)


def test_prior_identity_tracks_weights_and_preprocessing():
    a = _random(0)
    before = a.identity()
    with torch.no_grad():
        next(a.model.parameters()).add_(1e-3)
    assert a.identity() != before
    b = _random(0)
    b.input_size = 32
    assert b.identity() != _random(0).identity()


# --- open_clip / Hugging Face from local files, any module via Prior.from_module ------------------

OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _normalised(x, size, mean, std):
    from rela.data.augment import resize_center

    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (resize_center(x, size) - mean) / std


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory):
    """A randomly initialised OpenCLIP ViT-S-32 saved the way OpenCLIP checkpoints are: the whole model."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    path = tmp_path_factory.mktemp("open_clip") / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return path, model


def test_open_clip_prior_from_local_checkpoint(open_clip_model, tmp_path):
    path, reference = open_clip_model
    prior = build_prior("open_clip:ViT-S-32", weights=str(path), **KW)
    assert prior.name == "open_clip:ViT-S-32"
    assert (prior.input_size, prior.channels) == (224, 3)
    assert prior.mean == pytest.approx(OPENAI_CLIP_MEAN) and prior.std == pytest.approx(OPENAI_CLIP_STD)
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = reference.encode_image(_normalised(x.expand(-1, 3, -1, -1), 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    feats = prior(x)
    assert feats.shape == (2, reference.visual.output_dim)
    torch.testing.assert_close(feats, expected, atol=1e-4, rtol=1e-4)
    # the visual tower's own state_dict works too, and gives the same prior
    torch.save(reference.visual.state_dict(), tmp_path / "visual.pt")
    assert build_prior("open_clip:ViT-S-32", weights=str(tmp_path / "visual.pt"), **KW).identity() == prior.identity()


def test_open_clip_prior_errors(open_clip_model, tmp_path):
    pytest.importorskip("open_clip")
    with pytest.raises(RelaError, match="'ViT-Nope'"):
        build_prior("open_clip:ViT-Nope/openai", **KW)
    with pytest.raises(RelaError, match="'no-such-tag'"):
        build_prior("open_clip:ViT-B-32/no-such-tag", **KW)
    with pytest.raises(RelaError, match="needs a pretrained tag"):
        build_prior("open_clip:ViT-S-32", **KW)
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "other.bin")
    with pytest.raises(RelaError, match="do not fit open_clip:ViT-S-32"):
        build_prior("open_clip:ViT-S-32", weights=str(tmp_path / "other.bin"), **KW)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny randomly initialised ViT saved with save_pretrained, with its image processor."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)
    model = transformers.ViTModel(config).eval()
    folder = tmp_path_factory.mktemp("hf") / "tiny-vit"
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3],
                                   image_std=[0.4, 0.5, 0.6]).save_pretrained(folder)
    return folder, model


def test_hf_prior_from_local_folder(hf_dir):
    folder, reference = hf_dir
    prior = build_prior(f"hf:{folder}", **KW)
    assert prior.name == f"hf:{folder}"
    assert (prior.input_size, prior.channels) == (32, 3)
    assert prior.mean == pytest.approx((0.1, 0.2, 0.3)) and prior.std == pytest.approx((0.4, 0.5, 0.6))
    x = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    with torch.no_grad():
        expected = reference(pixel_values=_normalised(x, 32, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))).pooler_output
    torch.testing.assert_close(prior(x), expected, atol=1e-5, rtol=1e-5)


def test_hf_prior_without_processor_uses_config_size(hf_dir, tmp_path):
    folder, reference = hf_dir
    reference.save_pretrained(tmp_path / "bare")  # no preprocessor_config.json
    prior = build_prior(f"hf:{tmp_path / 'bare'}", **KW)
    assert prior.input_size == 32 and prior.mean == pytest.approx(IMAGENET_MEAN)
    with pytest.raises(RelaError, match="save_pretrained"):
        build_prior(f"hf:{tmp_path / 'empty'}", **KW)  # neither a folder nor reachable offline
    with pytest.raises(RelaError, match="hf:DIR"):
        build_prior(f"hf:{folder}", weights=str(tmp_path / "x.pt"), **KW)


@pytest.mark.parametrize("spec, extra", [("open_clip:ViT-S-32", "open_clip"), ("hf:some/model", "hf")])
def test_missing_extra_names_the_install(monkeypatch, spec, extra):
    monkeypatch.setitem(__import__("sys").modules, "open_clip" if extra == "open_clip" else "transformers", None)
    with pytest.raises(RelaError, match=rf"pip install 'rela\[{extra}\]'"):
        build_prior(spec, **KW)


def test_prior_from_any_module_feeds_the_bank(tmp_path):
    from rela.bank import load_or_extract

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    prior = Prior.from_module(model, input_size=20, mean=0.5, std=(0.2, 0.3, 0.4))
    assert prior.name == "module:Sequential" and prior.mean == (0.5,) * 3 and not prior.model.training
    data = load_dataset("synthetic:24")
    feats, info = load_or_extract(prior, data, cache_dir=tmp_path, progress=False)
    with torch.no_grad():
        expected = model(_normalised(data.images, 20, (0.5,) * 3, (0.2, 0.3, 0.4)))
    # banks may be stored in half precision
    torch.testing.assert_close(feats.float(), expected, atol=2e-3, rtol=2e-3)
    assert load_or_extract(prior, data, cache_dir=tmp_path, progress=False)[1]["bank_cache_hit"]
    with pytest.raises(RelaError, match="2 values for 3 channels"):
        Prior.from_module(model, input_size=20, mean=(0.5, 0.5), std=0.2)
    with pytest.raises(RelaError, match="std must be positive"):
        Prior.from_module(model, input_size=20, mean=0.5, std=0.0)
