"""The registries: one source for names, --help, the docs' tables of names and 'unknown X' errors."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from rela.cli import TRAIN_FLAGS, main
from rela.config import TrainConfig
from rela.errors import RelaError
from rela.registry import (BACKBONES, BANK_DTYPES, DATASETS, LOGGERS, LR_SCHEDULES, METHODS, MOMENTUM_SCHEDULES,
                           PRIORS, SWITCHES, Registry)

ROOT = Path(__file__).resolve().parents[1]
# train flag -> (registry, TrainConfig field)
FLAGS = {"--dataset": (DATASETS, "dataset"), "--backbone": (BACKBONES, "backbone"), "--method": (METHODS, "method"),
         "--prior": (PRIORS, "prior"), "--switch": (SWITCHES, "switch"), "--bank-dtype": (BANK_DTYPES, "bank_dtype"),
         "--lr-schedule": (LR_SCHEDULES, "lr_schedule"),
         "--momentum-schedule": (MOMENTUM_SCHEDULES, "momentum_schedule"), "--logger": (LOGGERS, "logger")}


def train_help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    # argparse wraps lines, also after hyphens; undo that before looking for names
    return re.sub(r"\s+", " ", re.sub(r"-\n\s+", "-", text))


def help_of(flag: str, text: str) -> str:
    """The help entry of one train flag: from its 'FLAG METAVAR' to the next flag's."""
    options = text[text.index("options:"):]
    starts = sorted(options.index(f" {f} {f[2:].upper().replace('-', '_')} ") for f in TRAIN_FLAGS)
    start = options.index(f" {flag} {flag[2:].upper().replace('-', '_')} ")
    return options[start: next((s for s in starts if s > start), len(options))]


def names_section(flag: str) -> str:
    """The section of ``flag`` in the table of names docs/gen_cli.py generates (docs/usage.md, docs/cli.md)."""
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    gen_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_cli)
    text = gen_cli.render("names")
    start = text.index(f"### `{flag}`\n")
    end = text.find("\n### ", start + 1)
    return text[start:end if end >= 0 else len(text)]


@pytest.mark.parametrize("flag", FLAGS)
def test_every_registered_name_is_in_train_help(capsys, flag):
    registry, _ = FLAGS[flag]
    text = train_help(capsys)
    assert registry.names(), f"nothing registered for {flag}"
    entry = help_of(flag, text)
    for usage in registry.usages():
        assert usage in entry, f"{usage!r} missing from the help of {flag}: {entry}"


@pytest.mark.parametrize("flag", FLAGS)
def test_every_registered_name_is_in_the_docs_table(flag):
    registry, field = FLAGS[flag]
    section = names_section(flag)
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == registry.usages()  # every name, once, in registration order
    assert f"Default: `{getattr(TrainConfig(), field)}`" in section
    for row, entry in zip(rows, registry.entries()):
        assert entry.help.split()[0] in row  # with its description


@pytest.mark.parametrize("flag", FLAGS)
def test_unknown_name_error_lists_every_usage(flag):
    registry, field = FLAGS[flag]
    with pytest.raises(RelaError, match=f"unknown {registry.kind} 'no-such-name'") as err:
        TrainConfig(**{field: "no-such-name"}).validate()
    assert str(err.value).endswith("valid choices: " + ", ".join(registry.usages()))


def test_create_passes_the_parsed_argument_and_options():
    reg = Registry("widget", __name__)
    reg.register("plain")(lambda **options: ("plain", options))
    reg.register("sized", arg="N", arg_optional=True, parse=int)(lambda n, **options: ("sized", n, options))
    assert reg.create("plain", colour="red") == ("plain", {"colour": "red"})
    assert reg.create("sized:3", colour="red") == ("sized", 3, {"colour": "red"})
    assert reg.create("sized") == ("sized", None, {})
    assert reg.usages() == ["plain", "sized[:N]"]
    assert "sized:4" in reg and "plain:4" not in reg and "other" not in reg
    with pytest.raises(RelaError, match="bad widget 'sized:x'"):
        reg.create("sized:x")
    with pytest.raises(ValueError, match="twice"):
        reg.register("plain")(lambda: None)
