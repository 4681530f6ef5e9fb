"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import tempfile
from pathlib import Path
from typing import Callable, IO

import torch
import yaml

from rela.errors import RelaError


TEMP_SUFFIX = ".tmp"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary sibling, fsync it, then rename it over ``path``.

    A full disk or a read-only folder becomes a :class:`RelaError` naming the
    file; the old file, if any, is left as it was.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        candidate = path.parent / f"{_temp_prefix(path)}{secrets.token_hex(8)}{TEMP_SUFFIX}"
        # Created like open() creates files: mode 0666 less the umask (mkstemp would make it owner-only).
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        tmp = candidate  # ours from here on: removed if anything below fails
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise RelaError(f"cannot write {path}: {e.strerror or e} (errno {e.errno}); "
                            "check that the folder is writable and the disk has room") from None
        raise


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder`` (only for folders one run owns)."""
    folder = Path(folder)
    stale = [p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file()] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, before any work, when ``path`` (or the folder it would be made in) cannot be written."""
    base = Path(path)
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise RelaError(f"output folder {path} is not writable ({base}: {e.strerror or e})") from None


def save_torch(obj, path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save_text(text: str, path) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save_json(obj, path) -> None:
    save_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def save_yaml(obj, path) -> None:
    save_text(yaml.safe_dump(obj, sort_keys=False), path)


def load_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def load_torch(path: str | os.PathLike, what: str = "file") -> object:
    """A torch file read with ``weights_only=True``: tensors, numbers, strings and containers only.

    rela stores nothing else (checkpoints, backbones, banks' metadata are plain dicts), so a file
    that needs any other class unpickled is refused, before that class's code runs: a run folder or
    checkpoint from someone else must not be able to execute code. Any failure is one
    :class:`RelaError` line naming the file.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph of advice to load it unsafely; keep the one fact that matters
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        culprit = f" ({found.group(1)})" if found else ""
        raise RelaError(f"refusing to load {what} {path}: it holds Python objects{culprit} beyond tensors and "
                        "plain values, which rela never writes and which could run code when loaded") from None
    except FileNotFoundError:
        raise RelaError(f"{what} {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, ...: the same to the user
        reason = str(e).splitlines()[0] if str(e) else ""
        raise RelaError(f"cannot read {what} {path}: {type(e).__name__}{': ' + reason if reason else ''}") from None
