"""Regenerate the README's measured blocks from committed benchmark results (``make readme-tables``).

    .venv/bin/python benchmarks/readme_tables.py           # rewrite the marked blocks of README.md
    .venv/bin/python benchmarks/readme_tables.py --check   # exit 1 if README.md is not up to date

A block is the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; each comes from one
results file. This is the only code that writes the README: the benchmark scripts write their
results under ``--results`` and nothing else, so a scratch run cannot change it.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

import byol_convergence
import methods
import table1
from common import REPO, RESULTS, ResultsFile
from rela.io import load_json, save_text


TABLE1 = "table1_e32"  # the grid the README reports (table1_e4: the earlier, unconverged grid)
# the investigations on the holdout: the default recipe, then the same grid with --set (LR schedule in full)
HOLDOUT = f"{TABLE1}_val10000"
RECIPES = (HOLDOUT, f"{HOLDOUT}_set-lr_scheduleconstant-warmup0.0")


def knob_files(results: Path) -> list[Path]:
    """Every --set grid on the holdout that has been committed (each an investigation of one knob)."""
    return sorted(results.glob(f"{HOLDOUT}_set-*.json"))


def sources(results: Path) -> list[str]:
    """Every results file a block reads."""
    return [f"{TABLE1}.json", "byol_convergence.json", "methods.json", "theory_gaussian.json",
            *(f"{n}.json" for n in RECIPES), *(p.name for p in knob_files(results))]


def table1_headline(results: Path, readme: Path) -> list[str]:
    runs = load_json(results / f"{TABLE1}.json")["runs"]
    budgets = table1.budgets_of(runs)
    link = os.path.relpath(results / f"{TABLE1}.md", readme.parent)
    return [f"Computed by `make readme-tables` from `{TABLE1}.json` (full table: [{TABLE1}.md]({Path(link).as_posix()})):",
            "", *[f"- {h}" for h in table1.headline(table1.summarise(runs, budgets), budgets)]]


def lr_schedule_comparison(results: Path, readme: Path) -> list[str]:
    base, other = (load_json(results / f"{name}.json") for name in RECIPES)
    return table1.recipe_comparison(base["runs"], other["runs"], table1.recipe_label(other["meta"]["overrides"]))


def knob_investigations(results: Path, readme: Path) -> list[str]:
    base = load_json(results / f"{HOLDOUT}.json")["runs"]
    recipes = [(table1.recipe_label(d["meta"]["overrides"]), d["runs"]) for d in map(load_json, knob_files(results))]
    return table1.knob_summary(base, recipes)


def byol_convergence_table(results: Path, readme: Path) -> list[str]:
    path = results / "byol_convergence.json"
    if not path.is_file():
        raise FileNotFoundError(2, "missing", str(path))
    return byol_convergence.table_lines(ResultsFile(path))


def methods_table(results: Path, readme: Path) -> list[str]:
    return methods.table_lines(load_json(results / "methods.json")["runs"])


def theory_summary(results: Path, readme: Path) -> list[str]:
    summary = load_json(results / "theory_gaussian.json")["summary"]
    return textwrap.wrap(summary, width=104, initial_indent="> ", subsequent_indent="> ", break_on_hyphens=False)


BLOCKS = {"table1-headline": table1_headline, "byol-convergence": byol_convergence_table, "methods-table": methods_table,
          "theory-gaussian-summary": theory_summary, "lr-schedule-holdout": lr_schedule_comparison,
          "knob-investigations": knob_investigations}


def replace_block(text: str, name: str, lines: list[str], readme: Path) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"{readme}: needs exactly one '{start}' ... '{end}' block")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return head + "\n".join([start, *lines, end]) + tail


def render(readme: Path, results: Path) -> str:
    text = readme.read_text()
    for name, block in BLOCKS.items():
        try:
            lines = block(results, readme)
        except FileNotFoundError as e:
            raise SystemExit(f"{name}: results file missing: {e.filename}") from None
        text = replace_block(text, name, lines, readme)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the committed result files")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if the README is out of date")
    args = p.parse_args(argv)
    text = render(args.readme, args.results)
    if text == args.readme.read_text():
        print(f"{args.readme}: up to date")
        return 0
    if args.check:
        print(f"{args.readme}: out of date; run make readme-tables", file=sys.stderr)
        return 1
    save_text(text, args.readme)
    print(f"{args.readme}: blocks {', '.join(BLOCKS)} regenerated from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
