"""The CLI reference page, generated from the argparse parser and the registries (so it cannot drift).

    python docs/gen_cli.py          # print the page's generated markdown
    (docs/hooks.py puts it into docs/cli.md at every `mkdocs build`)

Three blocks: every name a user can type (one table per registry, from ``Registry.entries()``), why each
default is what it is (:data:`rela.config.DEFAULT_WHY`), and every sub-command with every option, its
help and its default, read from :func:`rela.cli.build_parser`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout's rela, whatever is installed
    sys.path.insert(0, str(ROOT))

from rela import config as rela_config  # noqa: E402
from rela import registry  # noqa: E402
from rela.cli import build_parser  # noqa: E402
from rela.config import DEFAULT_WHY, TrainConfig  # noqa: E402

# train flag -> registry; the order is the table's
REGISTRIES = {
    "--dataset": registry.DATASETS, "--backbone": registry.BACKBONES, "--method": registry.METHODS,
    "--prior": registry.PRIORS, "--switch": registry.SWITCHES, "--subset": registry.SUBSETS,
    "--bank-dtype": registry.BANK_DTYPES, "--lr-schedule": registry.LR_SCHEDULES,
    "--momentum-schedule": registry.MOMENTUM_SCHEDULES, "--preset": registry.PRESETS, "--logger": registry.LOGGERS,
}
# train flag -> the fixed choices rela.config checks (no registry: nothing else can be added to them)
CHOICES = {
    "--transfer-head": rela_config.TRANSFER_HEADS, "--switch-aug-at": rela_config.SWITCH_AUG_AT,
    "--rela-augment": rela_config.RELA_AUGMENTS, "--momentum-after-switch": rela_config.MOMENTUM_AFTER_SWITCH,
    "--data-mode": rela_config.DATA_MODES, "--augment-on": rela_config.AUGMENT_ON,
    "--accelerator": rela_config.ACCELERATORS, "--precision": rela_config.PRECISIONS, "--labels": rela_config.LABELS,
}


def cell(text: object) -> str:
    """Text that stays inside one markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")


def field_of(flag: str) -> str:
    return flag[2:].replace("-", "_")


def default_of(flag: str) -> str:
    name = field_of(flag)
    return f"`{getattr(TrainConfig(), name)}`" if hasattr(TrainConfig(), name) else "-"


def names_block() -> list[str]:
    lines = []
    for flag, reg in REGISTRIES.items():
        lines += [f"### `{flag}`", "", f"Default: {default_of(flag)}.", "", "| name | what |", "|---|---|"]
        lines += [f"| `{e.usage}` | {cell(e.help) or '-'} |" for e in reg.entries()]
        lines.append("")
    lines += ["### Fixed choices", "", "| option | choices | default |", "|---|---|---|"]
    lines += [f"| `{flag}` | {', '.join(f'`{c}`' for c in choices)} | {default_of(flag)} |"
              for flag, choices in CHOICES.items()]
    return lines


def defaults_block() -> list[str]:
    lines = ["| option | default | why |", "|---|---|---|"]
    lines += [f"| `--{field.replace('_', '-')}` | `{getattr(TrainConfig(), field)}` | {cell(why)} |"
              for field, why in DEFAULT_WHY.items()]
    return lines


def _option(action: argparse.Action) -> str:
    flags = ", ".join(f"`{f}`" for f in action.option_strings) or f"`{action.dest}`"
    if action.option_strings and action.nargs != 0:
        flags += f" `{action.metavar or action.dest.upper()}`"
    return flags


def commands_block() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    lines = []
    for name, p in sub.choices.items():
        lines += [f"### `rela {name}`", "", cell(helps.get(name, "")), "", "| option | help |", "|---|---|"]
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = (action.help or "").replace("%%", "%")
            if not action.option_strings:
                text = f"(positional) {text}"
            elif action.default not in (None, argparse.SUPPRESS, False) and "Default" not in text:
                text += f" (default: {action.default})"
            lines.append(f"| {_option(action)} | {cell(text)} |")
        lines.append("")
    return lines


BLOCKS = {"names": names_block, "defaults": defaults_block, "commands": commands_block}


def render(name: str) -> str:
    """The markdown of one block: ``names``, ``defaults`` or ``commands``."""
    return "\n".join(BLOCKS[name]()).rstrip() + "\n"


if __name__ == "__main__":
    for name in BLOCKS:
        print(render(name))
