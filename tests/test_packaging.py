"""The wheel: built from the source tree, installed into a fresh virtual environment, ``rela`` runs from it.

Nothing downloads: the wheel is built without build isolation (the test environment's setuptools)
and installed with ``--no-deps --no-index``; the fresh environment sees the test environment's
packages (torch, lightning, ...) through a ``.pth`` file, but ``rela`` itself only from the wheel.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import rela

REPO = Path(__file__).resolve().parents[1]


def _run(*cmd, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=600, **kw)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # A copy of the checkout with benchmarks/ and tests/ in it, so the test sees that they stay out.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "results", "*.png")
    for name in ("rela", "benchmarks", "tests"):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    dist = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", dist, src, cwd=src)
    (whl,) = dist.glob("rela-*.whl")
    return whl


def test_wheel_holds_the_package_and_license_but_no_benchmark_or_test(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"rela", f"rela-{rela.__version__}.dist-info"}, top
    assert "rela/cli.py" in names and "rela/methods/__init__.py" in names
    assert "rela/presets/authors.yaml" in names  # package data: rela train --preset authors works when installed
    assert not [n for n in names if "bench" in n or n.startswith("tests/")]
    assert f"rela-{rela.__version__}.dist-info/licenses/LICENSE" in names
    meta = zipfile.ZipFile(wheel).read(f"rela-{rela.__version__}.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in meta
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if "matplotlib" in r and "extra ==" not in r]  # plots is an extra
    for extra in ("plots", "digits", "timm", "clip", "hf", "shards", "all", "dev"):
        assert f"Provides-Extra: {extra}" in meta, extra


def _site_without(folder: Path, hidden: tuple[str, ...]) -> Path:
    """The test environment's packages as links in ``folder``, less the distributions named in ``hidden``."""
    folder.mkdir()
    for site in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}):
        for entry in Path(site).iterdir():
            if not entry.name.lower().startswith(hidden) and not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry)
    return folder


def test_wheel_installs_into_a_fresh_venv_and_runs_without_matplotlib(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    purelib = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # The test environment's dependencies (and pip) but neither its rela nor matplotlib (the plots extra);
    # a .pth line adds a plain folder, it does not run the editable-install hook of the test environment.
    deps = _site_without(tmp_path / "deps", ("rela", "__editable__", "matplotlib", "mpl_toolkits", "pylab"))
    (purelib / "test-env.pth").write_text(f"{deps}\n")
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    where = _run(python, "-c", "import rela; print(rela.__file__)", cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(env_dir), where
    assert _run(bin_dir / "rela", "--version", cwd=tmp_path).stdout.strip() == f"rela {rela.__version__}"
    helped = _run(bin_dir / "rela", "train", "--help", cwd=tmp_path).stdout
    assert "--prior" in helped and "--switch" in helped
    assert "bench" not in _run(bin_dir / "rela", "--help", cwd=tmp_path).stdout
    # without the plots extra, a command that ends with a figure stops first, saying how to install it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    demo = subprocess.run([bin_dir / "rela", "demo", "--out", tmp_path / "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 2 and "pip install 'rela[plots]'" in demo.stderr, demo.stderr[-2000:]
    assert not (tmp_path / "demo").exists()
