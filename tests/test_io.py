"""Atomic writes: result files get the permissions open() would give them (0666 less the umask)."""

from __future__ import annotations

import os

import pytest

from rela.io import save_json


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save_json({"a": 1}, tmp_path / "m.json")
    finally:
        os.umask(previous)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary file left
