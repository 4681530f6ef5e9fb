"""Safe resume: every checkpoint rela reads is loaded with ``weights_only=True``, so a planted pickle
payload in a run folder is refused before it runs, with one line naming the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import TINY, read_metrics, run_ok

from rela.cli import main
from rela.errors import RelaError
from rela.priors import load_backbone_file
from rela.train import AtomicCheckpointIO


class Payload:
    """What an attacker would plant: unpickling it calls ``open(marker, "w")``, creating the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path) -> None:
    """Rewrite the torch file at ``path`` with the payload added beside its real content."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    blob["extra"] = Payload(marker)
    torch.save(blob, path)


def tiny_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", *TINY, "--epochs", "1", "--probe-every", "0", "--out", str(out), "--cache-dir", str(cache),
            *extra]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("one_epoch")
    run_ok(tiny_args(base / "run", base / "cache"))
    return base


def copy_run(src: Path, dest: Path) -> Path:
    for f in src.rglob("*"):
        if f.is_file():
            target = dest / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
    return dest


def test_planted_payload_in_last_ckpt_is_refused_and_never_runs(one_epoch, tmp_path, capsys):
    run = copy_run(one_epoch / "run", tmp_path / "run")
    last, marker = run / "checkpoints" / "last.ckpt", tmp_path / "pwned"
    plant(last, marker)
    before = last.read_bytes()
    capsys.readouterr()
    assert main(tiny_args(run, one_epoch / "cache", "--epochs", "2", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(last) in err and "refusing to load" in err, err
    assert re.search(r"\((io|builtins)\.open\)", err)  # what it would have called
    assert not marker.exists()
    assert last.read_bytes() == before  # the evidence is left as it was

    # Lightning's own load of last.ckpt goes through rela's checkpoint IO: refused there too
    with pytest.raises(RelaError, match="refusing to load"):
        AtomicCheckpointIO().load_checkpoint(last)
    assert not marker.exists()


def test_planted_payload_in_a_checkpoint_prior_is_refused(one_epoch, tmp_path, capsys):
    run = copy_run(one_epoch / "run", tmp_path / "run")
    marker = tmp_path / "pwned"
    plant(run / "backbone.pt", marker)
    with pytest.raises(RelaError, match="refusing to load checkpoint .*backbone.pt"):
        load_backbone_file(run)
    out = tmp_path / "student"
    assert main(tiny_args(out, tmp_path / "cache", "--prior", f"checkpoint:{run}")) == 2
    assert "backbone.pt" in capsys.readouterr().err and not marker.exists()
    assert main(["eval", str(run), "--no-progress", "--linear-epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to load" in err and not marker.exists()


def test_a_normal_resume_loads_through_the_safe_path(one_epoch, tmp_path):
    run = copy_run(one_epoch / "run", tmp_path / "run")
    first = read_metrics(run)["steps"]
    run_ok(tiny_args(run, one_epoch / "cache", "--epochs", "2", "--resume"))
    assert read_metrics(run)["steps"] == 2 * first  # the second epoch continued the first
