"""The one exception type users see.

Anything that is the user's fault (a bad name, a missing file, a value out of
range) raises :class:`RelaError`. The CLI prints its message and exits with
code 2, without a traceback; bugs keep their traceback.
"""

from __future__ import annotations

from typing import Iterable


class RelaError(Exception):
    """A problem with the user's input, explained in one sentence."""


def unknown(kind: str, value: str, choices: Iterable[str]) -> RelaError:
    """The error for a name that is not one of ``choices`` (listed in the order given)."""
    return RelaError(f"unknown {kind} {value!r}; valid choices: {', '.join(choices)}")
