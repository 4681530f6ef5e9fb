"""rela's console: its own messages one line each, progress bars for slow steps, and quiet third parties.

- :func:`warn` prints ``rela: warning: MESSAGE`` to stderr, once per message (per rela call),
  on the first process only: no Python source line, no repeats from every rank.
- :class:`console_scope` wraps rela's entry points (``train``, ``evaluate_run``, ``diagnose``,
  ``rank_priors``, ``write_shards``, the CLI). For the duration of the call only, it silences the
  third-party warnings listed in :data:`NOT_APPLICABLE` (each with why it does not apply), turns any
  other warning -- rela's own ``warnings.warn`` included -- into one ``rela: warning:`` line, and
  restores everything on the way out: nothing is filtered process-wide, so a program that
  imports rela keeps its own warning settings.
- :func:`bar` is the progress bar of a step that may take more than a few seconds (decoding an
  image folder, bank extraction, sharding, evaluation); it appears only after ``delay`` seconds, so
  quick steps leave no trace.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from pathlib import Path

from tqdm.auto import tqdm

PREFIX = "rela: warning: "
_RELA_DIR = str(Path(__file__).resolve().parent)

# (message regex, why it does not apply): silenced inside console_scope only.
NOT_APPLICABLE = (
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated",
     "Lightning's own use of a torch API it has yet to update; nothing in a rela run can change it"),
    (r".*does not have many workers",
     "memory mode's batches are index tensors into images already on the device: workers would only copy"),
    (r".*`training_step` returned `None`",
     "a batch whose every image failed to decode (--skip-bad-images) is skipped on purpose"),
    (r".*resuming from a checkpoint that ended before the epoch ended",
     "handled: the subset sampler's position rides in the checkpoint (rela_sampler)"),
    (r".*Experiment logs directory .* exists and is not empty",
     "a run into a folder an earlier run wrote (a resume, or a retry of one killed before its first "
     "checkpoint): rela moved the earlier metrics.csv to metrics.N.csv first (train._keep_previous_log)"),
    (r".*Checkpoint directory .* exists and is not empty",
     "only a resumed run gets here (a new run into a folder with checkpoints stops first): it continues "
     "its own last.ckpt"),
)

# Third-party warnings that do apply, said in rela's terms (its flags) instead of the library's API.
REPHRASE = (
    (re.compile(r"The number of training batches \((\d+)\) is smaller than the logging interval "
                r"Trainer\(log_every_n_steps=(\d+)\)"),
     r"an epoch has \1 steps, fewer than --log-every \2: per-step rows are logged every \2 steps across "
     r"epochs; lower --log-every for more"),
)

_seen: set[str] = set()
_depth = 0


def _first_process() -> bool:
    """Rank 0, or no distributed run: the only process that speaks (every rank would repeat it)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0 and \
        int(os.environ.get("NODE_RANK", "0") or 0) == 0


def warn(message: str) -> None:
    """``rela: warning: message`` on stderr, once per message (within one rela call), first process only."""
    message = " ".join(str(message).split())  # one line, whatever the message held
    if message in _seen or not _first_process():
        return
    _seen.add(message)
    print(PREFIX + message, file=sys.stderr, flush=True)


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` inside a console scope: every warning as one ``rela: warning:`` line,
    a third party's with the package it came from."""
    text = str(message)
    for pattern, replacement in REPHRASE:
        if pattern.search(text):
            text = pattern.sub(replacement, text).split(". ")[0]
            break
    else:
        if not str(Path(filename).resolve()).startswith(_RELA_DIR):
            package = Path(filename).resolve().parts
            name = next((p for p in ("lightning", "torch", "torchvision", "lightly", "timm", "PIL", "numpy")
                         if p in package), Path(filename).stem)
            text = f"{text} ({category.__name__} from {name})"
    warn(text)


class console_scope(contextlib.ContextDecorator):
    """For the duration of a rela call: third-party warnings that do not apply silenced, every other
    warning one line; all restored on exit (``warnings.catch_warnings``). Nested scopes are one scope."""

    def __enter__(self):
        global _depth
        _depth += 1
        self._catch = None
        if _depth == 1:
            _seen.clear()  # "once" is per call: a second run in the same process says it again
            self._catch = warnings.catch_warnings()
            self._catch.__enter__()
            for pattern, _why in NOT_APPLICABLE:
                warnings.filterwarnings("ignore", message=pattern)
            warnings.showwarning = _one_line
        return self

    def __exit__(self, *exc):
        global _depth
        _depth -= 1
        if self._catch is not None:
            self._catch.__exit__(*exc)
        return False


def bar(iterable=None, *, desc: str, enabled: bool = True, total: int | None = None, delay: float = 2.0, **kw):
    """A tqdm progress bar on stderr, shown once the step has run ``delay`` seconds, cleared when done."""
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False, delay=delay, **kw)
