"""Prior models: random, a saved rela backbone, torchvision and timm models from local weight files."""

from __future__ import annotations

import pytest
import torch
from conftest import backbone_state

from rela.backbones import build_backbone
from rela.data import load_dataset
from rela.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from rela.errors import RelaError
from rela.priors import build_prior


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
