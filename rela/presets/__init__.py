"""Shipped configurations by name: ``rela train --preset NAME``, ``TrainConfig.from_preset(NAME)``.

A preset is a YAML file of :class:`rela.config.TrainConfig` fields in this folder; its name is the
file's stem and its first line (a comment) is its ``--help`` text. Fields given with the preset (a
``--config`` file, flags, keyword arguments) override the preset's.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from rela.config import read_yaml
from rela.registry import PRESETS

HERE = Path(__file__).parent


def preset_file(name: str) -> Path:
    """The YAML file of the preset ``name`` (checked against the registry)."""
    PRESETS.check(name)
    return HERE / f"{name}.yaml"


for _path in sorted(HERE.glob("*.yaml")):
    _help = _path.read_text().splitlines()[0].lstrip("#").strip()
    PRESETS.register(_path.stem, help=_help)(partial(read_yaml, _path))
