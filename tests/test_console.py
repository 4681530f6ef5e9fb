"""A clean console: rela's messages one line each, third-party warnings that do not apply silenced for
rela's calls only (no process-wide filter), progress bars for slow steps."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import TINY, run_ok
from PIL import Image

from rela import console
from rela.config import TrainConfig
from rela.console import console_scope
from rela.train import train


def pictures(root: Path, per_class: int = 8) -> Path:
    """Two class folders of PNGs, one of them truncated: a run with --skip-bad-images warns about it."""
    for c, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), tuple(min(255, v + 7 * i) for v in colour)).save(root / f"c{c}" / f"{i}.png")
    bad = root / "c0" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])
    return root


def test_cli_stderr_holds_one_line_messages_only(tmp_path):
    root = pictures(tmp_path / "pics")
    proc = subprocess.run(
        [sys.executable, "-m", "rela", "train", "--dataset", f"imagefolder:{root}", "--image-size", "16",
         "--batch-size", "4", "--epochs", "1", "--prior", "random", "--skip-bad-images", "--no-progress",
         "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    for noise in ("UserWarning", "Warning:", "_pytree", "LeafSpec", "warnings.warn", ".py:"):
        assert noise not in err, err
    lines = err.strip().splitlines()
    assert all(line.startswith("rela: warning: ") for line in lines), err
    skipped = [line for line in lines if "skipped 1 image(s)" in line]
    assert len(skipped) == 1 and str(root / "c0" / "3.png") in skipped[0], err


def test_a_resumed_run_says_nothing_of_deleted_logs(tmp_path):
    # Lightning warns that the logs folder's files "will be deleted"; rela keeps them (metrics.1.csv)
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = [sys.executable, "-m", "rela", "train", *TINY, "--probe-every", "0", "--log-every", "1",
              "--out", str(out), "--cache-dir", str(cache)]
    first = subprocess.run([*common, "--epochs", "1"], capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr
    resumed = subprocess.run([*common, "--epochs", "2", "--resume"], capture_output=True, text=True, timeout=300,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "exists and is not empty" not in resumed.stderr, resumed.stderr
    assert (out / "logs" / "metrics.1.csv").read_text().startswith("epoch,")  # the first part's log, kept


def test_no_process_wide_filter_is_left_behind(tmp_path, capsys):
    before, show = list(warnings.filters), warnings.showwarning
    run_ok(["train", *TINY, "--epochs", "1", "--probe-every", "0", "--out", str(tmp_path / "cli"),
            "--cache-dir", str(tmp_path / "cache")])
    assert warnings.filters == before and warnings.showwarning is show
    train(TrainConfig(dataset="synthetic", backbone="convnet", batch_size=32, ratio=0.3, epochs=1, probe_every=0,
                      progress=False, out=str(tmp_path / "api"), cache_dir=str(tmp_path / "cache")))
    assert warnings.filters == before and warnings.showwarning is show
    # the program's own warnings still reach it, as it configured them
    with pytest.warns(DeprecationWarning, match="LeafSpec"):
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", DeprecationWarning)


def test_scope_silences_what_does_not_apply_and_shortens_the_rest(capsys):
    # RuntimeWarning throughout: pytest's configuration ignores UserWarning and DeprecationWarning
    with console_scope():
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", RuntimeWarning)
        warnings.warn("The dataloader, train_dataloader, does not have many workers which may be a bottleneck.",
                      RuntimeWarning)
        warnings.warn("something else\nover two lines", RuntimeWarning)
        warnings.warn("something else\nover two lines", RuntimeWarning)  # said once
        with console_scope():  # nested: the same scope
            console.warn("rela's own message")
        console.warn("rela's own message")
    err = capsys.readouterr().err.splitlines()
    assert err == ["rela: warning: something else over two lines (RuntimeWarning from test_console)",
                   "rela: warning: rela's own message"]


def test_progress_bar_shows_for_slow_steps_only(capsys):
    list(console.bar(range(3), desc="quick", delay=60))
    assert "quick" not in capsys.readouterr().err
    list(console.bar(range(3), desc="slow step", delay=0))
    assert "slow step" in capsys.readouterr().err
    list(console.bar(range(3), desc="off", delay=0, enabled=False))
    assert "off" not in capsys.readouterr().err
