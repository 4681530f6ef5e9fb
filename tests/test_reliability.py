"""Reliability: a run killed anywhere resumes to the same result; bad input and a failing disk are user errors.

The reference for every resume test is the session's ``random_run`` (TINY, random prior, seed 0):
2 epochs of 4 steps. With ``--checkpoint-every 3`` a run also writes checkpoints after steps 3 and 6,
so a crash at step 7 resumes mid-epoch (epoch 1, one batch in) from step 6.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_STEPS, backbone_state, read_metrics, run_ok, train_module
from test_cli import expect_user_error
from test_data import make_image_folder

from rela.accelerator import LAG
from rela.cli import main
from rela.data import DynamicSubsetSampler
from rela.errors import RelaError

CHECKPOINT_EVERY = 3


def reference_args(out: Path, cache: Path, *extra: str) -> list[str]:
    """The arguments of ``random_run``, with a different output folder."""
    return ["train", *TINY, "--out", str(out), "--cache-dir", str(cache), "--prior", "random",
            "--probe-every", "1", "--seed", "0", *extra]


def assert_same_run(run: Path, reference: Path) -> None:
    m, ref = read_metrics(run), read_metrics(reference)
    for key in ("steps", "images_seen", "switch_step", "rela_steps"):
        assert m[key] == ref[key], key
    assert [h["probe_knn_top1"] for h in m["history"]] == [h["probe_knn_top1"] for h in ref["history"]]
    a, b = backbone_state(run), backbone_state(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoint_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]


def test_sampler_resumes_the_rest_of_its_epoch():
    full = DynamicSubsetSampler(100, 0.5, seed=3)
    full.set_epoch(2)
    order = list(full)
    it = iter(full)
    head = [next(it) for _ in range(20)]
    state = full.state_dict()
    assert head == order[:20] and state["consumed"] == 20 and state["epoch"] == 2
    resumed = DynamicSubsetSampler(100, 0.5, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert list(resumed) == order[20:]
    assert list(resumed) == order  # the skip applies to the resumed pass only
    other = DynamicSubsetSampler(100, 0.5, seed=4)
    with pytest.raises(RelaError, match="--seed 3"):
        other.load_state_dict(state)


class SimulatedKill(BaseException):
    """Not an Exception: nothing on the way up may catch it, as with a real kill."""


def test_crash_mid_epoch_resumes_to_identical_weights(random_run, tmp_path, monkeypatch):
    step_fn = train_module.ReLAModule.training_step

    def dying_step(self, index, batch_idx):
        if self.global_step == TINY_STEPS - 1:
            raise SimulatedKill
        return step_fn(self, index, batch_idx)

    out = tmp_path / "run"
    args = reference_args(out, tmp_path / "cache", "--checkpoint-every", str(CHECKPOINT_EVERY))
    monkeypatch.setattr(train_module.ReLAModule, "training_step", dying_step)
    with pytest.raises(SimulatedKill):
        main(args)
    monkeypatch.undo()
    assert checkpoint_step(out) == 6 and not (out / "metrics.json").exists()  # mid-epoch 1, one batch in
    run_ok([*args, "--resume"])
    assert_same_run(out, random_run)


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(random_run, tmp_path):
    """A real SIGKILL while the last checkpoint (step 8) is half written: the step-6 one survives."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = reference_args(out, cache, "--checkpoint-every", str(CHECKPOINT_EVERY))
    env = {**os.environ, train_module.CHECKPOINT_DELAY_ENV: "0.4"}
    proc = subprocess.Popen([sys.executable, "-m", "rela", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    writes, seen, deadline = 0, None, time.monotonic() + 900
    try:
        while writes < 4 and proc.poll() is None and time.monotonic() < deadline:
            temps = list((out / "checkpoints").glob(".last.ckpt.*.tmp"))
            if temps and temps[0] != seen:
                seen, writes = temps[0], writes + 1  # checkpoints after steps 3, 4, 6 and 8
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert writes == 4, "the run ended before its last checkpoint write"
    assert seen.exists()  # the kill landed inside the write
    assert checkpoint_step(out) == 6 and not (out / "metrics.json").exists()
    run_ok([*args, "--resume"])
    assert not list((out / "checkpoints").glob("*.tmp"))  # the stale temporary file is gone
    assert_same_run(out, random_run)


# --- bad input ------------------------------------------------------------------------


def cli_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", *TINY, "--probe-every", "0", "--out", str(out), "--cache-dir", str(cache), *extra]


def test_truncated_image_is_named_or_skipped(capsys, tmp_path):
    root = make_image_folder(tmp_path / "pics", splits=("train",), per_class=4, size=(24, 24))
    bad = root / "train" / "red" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # header intact, pixel data cut off
    args = ["train", "--dataset", f"imagefolder:{root}", "--image-size", "16", "--batch-size", "4",
            "--epochs", "1", "--probe-every", "0", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "out"
    err = expect_user_error(capsys, [*args, "--out", str(out)], str(bad))
    assert "--skip-bad-images" in err and not out.exists()
    run_ok([*args, "--out", str(out), "--skip-bad-images"])
    warned = [line for line in capsys.readouterr().err.splitlines() if "skipped 1 image" in line]
    assert len(warned) == 1 and warned[0].startswith("rela: warning: ") and str(bad) in warned[0]
    m = read_metrics(out)
    assert m["skipped_images"] == 1 and m["images_seen"] == 4  # 7 images left: one batch of 4


def test_empty_class_folder(capsys, tmp_path):
    root = make_image_folder(tmp_path / "pics", splits=("train",), per_class=2)
    (root / "train" / "green").mkdir()
    out = tmp_path / "out"
    expect_user_error(capsys, cli_args(out, tmp_path / "cache", "--dataset", f"imagefolder:{root}"), "green")
    assert not out.exists()


def test_resume_with_another_architecture(capsys, random_run, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints" / "last.ckpt"
    checkpoint.write_bytes((random_run / "checkpoints" / "last.ckpt").read_bytes())
    before = checkpoint.read_bytes()
    err = expect_user_error(capsys, cli_args(run, tmp_path / "cache", "--prior", "none", "--backbone",
                                             "resnet-narrow", "--resume"), str(checkpoint), "resnet-narrow")
    assert "mismatches" in err
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(capsys, tmp_path, monkeypatch):
    out, cache = tmp_path / "run", tmp_path / "cache"
    run_ok(cli_args(out, cache, "--prior", "random", "--epochs", "1"))
    checkpoint, metrics = (out / "checkpoints" / "last.ckpt").read_bytes(), (out / "metrics.json").read_bytes()
    # the ReLA loss of the first step of epoch 2 turns into NaN, as a diverging run's would
    monkeypatch.setattr("rela.accelerator.rela_loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    err = expect_user_error(capsys, cli_args(out, cache, "--prior", "random", "--epochs", "2", "--resume"),
                            "nan", f"step {TINY_STEPS // 2}")
    assert "--lr" in err
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == checkpoint
    assert (out / "metrics.json").read_bytes() == metrics


def _fail_writes(monkeypatch, code: int, where: str) -> None:
    """Make every fsync of a file whose path contains ``where`` fail with ``code`` (as a full disk does)."""
    fsync = os.fsync

    def failing(fd):
        if where in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(code, os.strerror(code))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell files apart")
def test_full_disk_during_checkpoint_keeps_the_previous_one(capsys, tmp_path, monkeypatch):
    out, cache = tmp_path / "run", tmp_path / "cache"
    run_ok(cli_args(out, cache, "--epochs", "1"))
    checkpoint, metrics = (out / "checkpoints" / "last.ckpt").read_bytes(), (out / "metrics.json").read_bytes()
    _fail_writes(monkeypatch, errno.ENOSPC, "last.ckpt")
    expect_user_error(capsys, cli_args(out, cache, "--epochs", "2", "--resume"), "last.ckpt", os.strerror(errno.ENOSPC))
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == checkpoint
    assert (out / "metrics.json").read_bytes() == metrics
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@contextlib.contextmanager
def refusing_writes(folder: Path):
    """Make ``folder`` refuse new files for real: no write permission, and for root (who ignores
    permission bits) the ext4 immutable attribute; skips when neither can be had here."""
    folder.chmod(0o555)
    immutable = False
    try:
        if os.access(folder, os.W_OK):
            chattr = shutil.which("chattr")
            if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode:
                pytest.skip("running as root on a file system without chattr +i: a folder cannot be made unwritable")
            immutable = True
        yield
    finally:
        if immutable:
            subprocess.run([shutil.which("chattr"), "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_read_only_output_folder(capsys, tmp_path):
    out = tmp_path / "read-only"
    out.mkdir()
    with refusing_writes(out):
        with pytest.raises(OSError):  # the folder really refuses files, with the write probe left as it is
            (out / "probe").write_bytes(b"")
        expect_user_error(capsys, cli_args(out, tmp_path / "cache"), str(out), "not writable")
    assert list(out.iterdir()) == []
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_bad_checkpoint_every(capsys, tmp_path):
    out = tmp_path / "out"
    expect_user_error(capsys, cli_args(out, tmp_path / "cache", "--checkpoint-every", "-1"), "checkpoint_every")
    assert not out.exists()


# --- a SIGKILL after the switch ----------------------------------------------------------------

KILL_DRIVER = """
import os, signal, sys

from rela.cli import main
from rela.train import ReLAModule

training_step = ReLAModule.training_step


def dying_step(self, index, batch_idx):
    if self.global_step == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return training_step(self, index, batch_idx)


ReLAModule.training_step = dying_step
sys.exit(main(sys.argv[1:]))
"""
# The adaptive rule (test_accelerator.reference_switch_step) on TINY's ReLA losses (~1) reaches
# rho >= 0.377 at its 4th update (step 3): the host learns it LAG steps late, so ReLA for steps 0-3 + LAG,
# the base method from step 4 + LAG on (the hand-over).
EARLY_SWITCH, SWITCH_STEP = "adaptive:0.377", 4 + LAG


def test_sigkill_after_the_switch_resumes_to_identical_weights(tmp_path):
    """Killed at step 7, after the switch (step 5) and the step-6 checkpoint: the resumed run must
    go on with the base method alone and end as the uninterrupted run does."""
    reference = tmp_path / "reference"
    run_ok(reference_args(reference, tmp_path / "cache", "--switch", EARLY_SWITCH))
    assert read_metrics(reference)["switch_step"] == SWITCH_STEP
    out = tmp_path / "run"
    args = reference_args(out, tmp_path / "cache", "--switch", EARLY_SWITCH,
                          "--checkpoint-every", str(CHECKPOINT_EVERY))
    driver = tmp_path / "driver.py"
    driver.write_text(f"KILL_AT = {TINY_STEPS - 1}\n" + KILL_DRIVER)
    proc = subprocess.run([sys.executable, str(driver), *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 6 and not (out / "metrics.json").exists()
    assert bool(state["state_dict"]["rela.switch.switched"])  # the checkpoint holds the switched state
    assert int(state["state_dict"]["rela.switch.switch_step"]) == SWITCH_STEP
    run_ok([*args, "--resume"])
    assert_same_run(out, reference)  # steps, switch_step, rela_steps, probe history, weights
    assert read_metrics(out)["switch_step"] == SWITCH_STEP
