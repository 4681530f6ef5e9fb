"""rela export: the backbone as safetensors or TorchScript, loaded where rela cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import backbone_state, run_ok, saved_backbone_features

from rela.cli import main
from rela.data import load_dataset

safetensors = pytest.importorskip("safetensors.torch")

TINY_RUN = ["--dataset", "synthetic", "--train-limit", "64", "--batch-size", "16", "--epochs", "1", "--prior", "none",
            "--probe-every", "0", "--no-progress"]
TIMM_MODEL = "test_resnet"  # one of timm's own tiny test models

# Prepended to every script run below: any import of rela fails, so the script shows what a user
# without rela can do.
NO_RELA = textwrap.dedent("""
    import sys

    class NoRela:
        def find_spec(self, name, path=None, target=None):
            if name == "rela" or name.startswith("rela."):
                raise ImportError("rela is not importable here")

    sys.meta_path.insert(0, NoRela())
    try:
        import rela
    except ImportError:
        pass
    else:
        raise SystemExit("rela was importable")
""")

# What docs/usage.md shows: the TorchScript file with plain torch, features of images in [0, 1].
LOAD_TORCHSCRIPT = NO_RELA + textwrap.dedent("""
    import json
    import torch

    model_file, images_file, out_file = sys.argv[1:]
    extra = {"rela.json": ""}
    backbone = torch.jit.load(model_file, _extra_files=extra)
    meta = json.loads(extra["rela.json"])
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    images = torch.load(images_file).float() / 255
    assert backbone.training  # ready for fine-tuning
    with torch.no_grad():
        features = backbone.eval()((images - mean) / std)
    # fine-tuning: a head on top, gradients reach the backbone
    head = torch.nn.Linear(meta["feature_dim"], 10)
    backbone.train()
    head(backbone((images[:4] - mean) / std)).sum().backward()
    assert all(p.grad is not None for p in backbone.parameters())
    torch.save({"features": features, "meta": meta}, out_file)
""")

# What docs/usage.md shows: a timm backbone's safetensors file into timm's own model.
LOAD_TIMM_SAFETENSORS = NO_RELA + textwrap.dedent("""
    import json
    import timm
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights_file, images_file, out_file = sys.argv[1:]
    with safe_open(weights_file, "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    model = timm.create_model(meta["arch"].removeprefix("timm:"), num_classes=0, in_chans=meta["channels"])
    model.load_state_dict(load_file(weights_file))
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    images = torch.load(images_file).float() / 255
    with torch.no_grad():
        features = model.eval()((images - mean) / std)
    torch.save({"features": features, "meta": meta}, out_file)
""")


def load_without_rela(script: str, exported: Path, tmp_path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Run ``script`` on 64 test images in a process where rela cannot be imported; (images, features, metadata)."""
    images = load_dataset("synthetic", "test", limit=64).images
    torch.save(images, tmp_path / "images.pt")
    result = tmp_path / "features.pt"
    proc = subprocess.run([sys.executable, "-c", script, str(exported), str(tmp_path / "images.pt"), str(result)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(result)
    return images, out["features"], out["meta"]


@pytest.fixture(scope="module")
def convnet_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("export_run")
    run_ok(["train", *TINY_RUN, "--out", str(base / "run"), "--cache-dir", str(base / "cache")])
    return base / "run"


def test_torchscript_export_loads_with_plain_torch(convnet_run, tmp_path, capsys):
    run_ok(["export", str(convnet_run), "--format", "torchscript"])
    exported = convnet_run / "backbone.torchscript.pt"
    assert str(exported) in capsys.readouterr().out
    images, features, meta = load_without_rela(LOAD_TORCHSCRIPT, exported, tmp_path)
    (expected,) = saved_backbone_features(convnet_run, images)
    assert features.shape == (64, meta["feature_dim"]) == (64, 128)
    assert features.std(0).mean() > 1e-3  # a real output, not a constant
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    assert (meta["arch"], meta["channels"], meta["image_size"]) == ("convnet", 3, 16)


def test_safetensors_export_holds_the_weights_and_metadata(convnet_run, tmp_path):
    out = tmp_path / "mine.safetensors"
    run_ok(["export", str(convnet_run / "backbone.pt"), "--out", str(out)])
    saved, exported = backbone_state(convnet_run), safetensors.load_file(str(out))
    assert exported.keys() == saved.keys()
    assert all(torch.equal(exported[k], saved[k]) for k in saved)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    blob = torch.load(convnet_run / "backbone.pt", weights_only=True)
    assert {k: meta[k] for k in ("arch", "channels", "image_size", "mean", "std", "feature_dim")} == \
        {k: blob[k] for k in ("arch", "channels", "image_size", "mean", "std", "feature_dim")}


def test_timm_backbone_loads_into_timm_without_rela(tmp_path):
    timm = pytest.importorskip("timm")
    assert timm.is_model(TIMM_MODEL)
    run = tmp_path / "run"
    run_ok(["train", *TINY_RUN, "--backbone", f"timm:{TIMM_MODEL}", "--out", str(run),
            "--cache-dir", str(tmp_path / "cache")])
    run_ok(["export", str(run)])
    images, features, meta = load_without_rela(LOAD_TIMM_SAFETENSORS, run / "backbone.safetensors", tmp_path)
    (expected,) = saved_backbone_features(run, images)
    assert meta["arch"] == f"timm:{TIMM_MODEL}" and features.shape == expected.shape
    assert features.std(0).mean() > 1e-3
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_export_errors_are_one_line(capsys, tmp_path, convnet_run):
    assert main(["export", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"rela: error: checkpoint {tmp_path / 'backbone.pt'} does not exist"
    assert main(["export", str(convnet_run), "--format", "onnx"]) == 2
    assert capsys.readouterr().err.strip() == ("rela: error: unknown export format 'onnx'; valid choices: "
                                               "safetensors, torchscript")
