"""Every name a user can type, in one kind of table (in the style of timm's ``register_model``).

A :class:`Registry` maps names to factories. Each component module registers its own
entries where they are defined::

    @METHODS.register("byol", help="predicts a momentum network")
    class BYOL(Method): ...

A name may take an argument after a colon (``random:ARCH``, ``constant:FRACTION``);
``create("constant:0.3", epochs=10)`` calls the factory with the parsed argument first,
then the options. The CLI's ``--help`` text, config validation and every
"unknown X 'foo'; valid choices: ..." error come from these tables, so they cannot drift.

The registries are declared here, with the module whose import fills each one; a lookup
imports that module first, so :mod:`rela.config` can check names without importing the
components itself.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from rela.errors import RelaError, unknown


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    help: str = ""
    arg: str | None = None  # placeholder of the argument after the colon, e.g. "PATH"
    arg_optional: bool = False
    parse: Callable[[str], Any] = str  # checks and converts the argument; raises RelaError or ValueError

    @property
    def usage(self) -> str:
        if self.arg is None:
            return self.name
        return f"{self.name}[:{self.arg}]" if self.arg_optional else f"{self.name}:{self.arg}"


class Registry:
    def __init__(self, kind: str, home: str):
        self.kind, self.home = kind, home
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, *, help: str = "", arg: str | None = None, arg_optional: bool = False,
                 parse: Callable[[str], Any] = str):
        """Decorator: register the decorated class or function under ``name``; returns it unchanged."""
        def add(factory):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, factory, help, arg, arg_optional, parse)
            return factory
        return add

    # --- lookup ---------------------------------------------------------------------------
    def _all(self) -> dict[str, Entry]:
        if not self._loaded:
            importlib.import_module(self.home)  # its import registers the entries
            self._loaded = True
        return self._entries

    def _resolve(self, spec: str) -> tuple[Entry, tuple]:
        """The entry ``spec`` names and the factory's leading arguments: (), or (parsed argument,).

        An optional argument that is absent is passed as ``None``, so a factory's signature
        does not depend on how its name was written.
        """
        name, colon, arg = str(spec).partition(":")
        entry = self._all().get(name)
        if entry is None or (colon and entry.arg is None) or (not colon and entry.arg and not entry.arg_optional):
            raise unknown(self.kind, spec, self.usages())
        if entry.arg is None:
            return entry, ()
        if not colon:
            return entry, (None,)
        try:
            return entry, (entry.parse(arg),)
        except ValueError as e:  # the parser's message says what the argument must be
            raise RelaError(f"bad {self.kind} {spec!r}: {e}") from None

    def check(self, spec: str) -> None:
        """Raise :class:`RelaError` unless ``spec`` names an entry with a valid argument; builds nothing."""
        self._resolve(spec)

    def create(self, spec: str, *args, **options):
        """Build what ``spec`` names: ``factory([argument,] *args, **options)``."""
        entry, arg = self._resolve(spec)
        return entry.factory(*arg, *args, **options)

    # --- listings ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._all())

    def entries(self) -> list[Entry]:
        """Every entry, in registration order (the docs' table of names is generated from these)."""
        return list(self._all().values())

    def usages(self) -> list[str]:
        """How each name is written, with its argument: ``random[:ARCH]``, ``checkpoint:PATH``."""
        return [e.usage for e in self._all().values()]

    def choices_help(self) -> str:
        """The ``--help`` text: every usage with its short description."""
        return "; ".join(f"{e.usage} ({e.help})" if e.help else e.usage for e in self._all().values())

    def __contains__(self, spec: str) -> bool:
        try:
            self._resolve(spec)
        except RelaError:
            return False
        return True

    def __iter__(self):
        return iter(self.names())

    def __getitem__(self, name: str):
        """The factory registered under ``name`` (e.g. a method's class)."""
        entry = self._all().get(name)
        if entry is None:
            raise unknown(self.kind, name, self.usages())
        return entry.factory


DATASETS = Registry("dataset", "rela.data.datasets")
BACKBONES = Registry("backbone", "rela.backbones")
PRIORS = Registry("prior", "rela.priors")
METHODS = Registry("method", "rela.methods")
SWITCHES = Registry("switch", "rela.accelerator")
SUBSETS = Registry("subset rule", "rela.data.subset")
BANK_DTYPES = Registry("bank dtype", "rela.bank")
LR_SCHEDULES = Registry("lr schedule", "rela.schedules")
MOMENTUM_SCHEDULES = Registry("momentum schedule", "rela.schedules")
PRESETS = Registry("preset", "rela.presets")
LOGGERS = Registry("logger", "rela.loggers")
