"""Kill ``rela train`` with SIGKILL at five moments, resume it, and compare with an uninterrupted run.

One small configuration (Fashion-MNIST, 512 training images, convnet, BYOL + ReLA with a random
prior, adaptive switch with a low threshold so it fires mid-run, 4 epochs of 16 steps of 32 images,
seed 0, a checkpoint every 4 steps; small because it ran niced next to a CPU-bound job). It is trained once without interruption; then, for each case, the
same command runs as a subprocess in a fresh folder, is killed with SIGKILL at the chosen moment,
and is rerun with ``--resume``. Both finished runs are evaluated (k-NN and linear probe on 500
test images) and compared: steps, switch step, top-1 accuracies and a SHA-256 of the final
backbone weights.

How each moment is found:

- ReLA phase, at the switch, SSL phase: by polling ``last.ckpt``: once it holds a step at or past a
  target chosen from the uninterrupted run's switch step (for "at the switch": the last checkpoint
  before it), the kill lands ``AFTER_CHECKPOINT`` seconds later, a few steps into the next stretch
  (Lightning's progress bar is no use here: through a pipe it prints only at the end);
- bank extraction: the bank's progress bar appears (and no bank file exists after the kill);
- checkpoint write: the run gets ``RELA_DEBUG_CHECKPOINT_DELAY`` (a pause inside every checkpoint
  write, after the temporary file is written and before it replaces ``last.ckpt``); the kill lands
  when a temporary checkpoint file appears after step 20 (and that file is still there after the kill).

Reported per case: the step of the checkpoint the resumed run started from and the files left.

Usage: ``python benchmarks/kill_resume.py [--work DIR] [--jobs N] [--results DIR]``; results in
``kill_resume.json`` under ``--results``. ``--jobs`` runs the cases side by side (they share nothing
but the CPU); a finished uninterrupted run of the same configuration in ``--work`` is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import REPO, RUNS, add_output_args
from rela.io import save_json

EVERY = 4  # --checkpoint-every
CONFIG = ["--dataset", "fashion-mnist", "--train-limit", "512", "--test-limit", "500", "--backbone", "convnet",
          "--method", "byol", "--prior", "random", "--switch", "adaptive:0.5", "--epochs", "4", "--batch-size", "32",
          "--seed", "0", "--checkpoint-every", str(EVERY), "--probe-every", "0"]
EVAL = ["--linear-epochs", "20", "--no-progress"]
CHECKPOINT_DELAY = "2"
AFTER_CHECKPOINT = 2.0


def rela(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rela", *args], cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def finish(*args: str) -> None:
    proc = rela(*args)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"rela {' '.join(args)} failed:\n{out.decode(errors='replace')[-3000:]}")


class Watch:
    """Follows a running ``rela train``: its output and the step of its latest checkpoint."""

    def __init__(self, proc: subprocess.Popen, run: Path):
        self.proc, self.run, self.text = proc, run, ""
        self._stamp, self._step = None, -1
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        buf = b""
        while chunk := self.proc.stdout.read1(4096):
            buf = (buf + chunk)[-20000:]
            self.text = buf.decode(errors="replace")

    @property
    def step(self) -> int:
        """global_step of last.ckpt (-1 before the first), reloaded only when the file changes."""
        try:
            st = (self.run / "checkpoints" / "last.ckpt").stat()
        except FileNotFoundError:
            return -1
        if (st.st_ino, st.st_mtime_ns) != self._stamp:
            self._stamp, self._step = (st.st_ino, st.st_mtime_ns), checkpoint_step(self.run)
        return self._step

    def kill_when(self, moment, timeout: float = 1800) -> float:
        deadline = time.monotonic() + timeout
        while not moment(self):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the run ended before the kill moment:\n{self.text[-3000:]}")
            time.sleep(0.01)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.thread.join()
        return time.monotonic()


def weights_hash(run: Path) -> str:
    state = torch.load(run / "backbone.pt", map_location="cpu", weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def summary(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    keys = ("steps", "images_seen", "switch_step", "knn_top1", "knn20_top1", "linear_top1")
    return {**{k: m[k] for k in keys}, "weights_sha256": weights_hash(run)}


def checkpoint_step(run: Path) -> int | None:
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    return torch.load(last, map_location="cpu", weights_only=False)["global_step"]


def train_args(work: Path, name: str) -> list[str]:
    return ["train", *CONFIG, "--out", str(work / name), "--cache-dir", str(work / name / "cache")]


def uninterrupted(work: Path) -> dict:
    """The reference run (reused when a finished one of the same configuration is in ``work``)."""
    done_marker = work / "uninterrupted.done"
    if not (done_marker.is_file() and done_marker.read_text() == " ".join(CONFIG + EVAL)):
        shutil.rmtree(work / "uninterrupted", ignore_errors=True)
        finish(*train_args(work, "uninterrupted"), "--no-progress")
        finish("eval", str(work / "uninterrupted"), *EVAL)
        done_marker.write_text(" ".join(CONFIG + EVAL))
    reference = summary(work / "uninterrupted")
    switch, total = reference["switch_step"], reference["steps"]
    if switch is None or not 8 < switch < total - 8:
        raise SystemExit(f"the switch fired at step {switch}; pick a threshold that fires mid-run")
    print(f"uninterrupted: {reference}", flush=True)
    return reference


def after_checkpoint(step: int):
    """The moment ``AFTER_CHECKPOINT`` seconds after ``last.ckpt`` first holds ``step`` or later."""
    seen = {}

    def moment(w: Watch) -> bool:
        if w.step >= step:
            seen.setdefault("at", time.monotonic())
        return "at" in seen and time.monotonic() - seen["at"] >= AFTER_CHECKPOINT
    return moment


def in_bank_extraction(w: Watch) -> bool:
    return "bank" in w.text and w.step < 0


def kill_moments(work: Path, reference: dict) -> dict:
    """case -> (when to kill, extra environment)."""
    switch, total = reference["switch_step"], reference["steps"]
    writing = work / "checkpoint_write" / "checkpoints"
    return {
        "rela_phase": (after_checkpoint(switch // 2), {}),
        "at_switch": (after_checkpoint(switch // EVERY * EVERY), {}),
        "ssl_phase": (after_checkpoint((switch + total) // 2), {}),
        "bank_extraction": (in_bank_extraction, {}),
        "checkpoint_write": (lambda w: w.step >= 20 and any(writing.glob(".last.ckpt.*.tmp")),
                             {"RELA_DEBUG_CHECKPOINT_DELAY": CHECKPOINT_DELAY}),
    }


def run_case(work: Path, name: str, moment, env: dict, reference: dict) -> dict:
    """Start the run, SIGKILL it at ``moment``, record what is left, resume, evaluate, compare."""
    run = work / name
    shutil.rmtree(run, ignore_errors=True)
    Watch(rela(*train_args(work, name), env=env), run).kill_when(moment)
    listing = {folder: sorted(p.name for p in (run / folder).glob(pattern)) if (run / folder).is_dir() else []
               for folder, pattern in (("cache", "*"), ("checkpoints", "*.tmp"))}
    killed = {"checkpoint_step_after_kill": checkpoint_step(run), "bank_cache_files_after_kill": listing["cache"],
              "temp_checkpoint_files_after_kill": listing["checkpoints"]}
    finish(*train_args(work, name), "--no-progress", "--resume")
    finish("eval", str(run), *EVAL)
    resumed = summary(run)
    equal = resumed == reference
    print(f"{name}: killed {killed}; resumed run equal to uninterrupted: {equal}", flush=True)
    return {"kill": killed, "equal": equal, "metrics": resumed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(RUNS / "kill_resume"), help="scratch folder")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at the same time")
    add_output_args(parser)
    args = parser.parse_args()
    work = Path(args.work)
    start = time.perf_counter()
    reference = uninterrupted(work)
    cases = kill_moments(work, reference)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(zip(cases, pool.map(lambda name: run_case(work, name, *cases[name], reference), cases)))
    report = {
        "command": "python benchmarks/kill_resume.py",
        "config": " ".join(CONFIG),
        "eval": " ".join(EVAL),
        "checkpoint_write_hook": f"RELA_DEBUG_CHECKPOINT_DELAY={CHECKPOINT_DELAY} (seconds paused inside each "
                                 "checkpoint write, before the rename)",
        "kill_after_checkpoint_seconds": AFTER_CHECKPOINT,
        "uninterrupted": reference,
        "cases": results,
        "all_equal": all(r["equal"] for r in results.values()),
        "torch": torch.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    save_json(report, args.results / "kill_resume.json")
    print(f"all equal: {report['all_equal']}; results in {args.results / 'kill_resume.json'}")


if __name__ == "__main__":
    main()
