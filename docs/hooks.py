"""MkDocs hooks (mkdocs.yml ``hooks:``): what keeps the site from drifting from the code and the results.

- Before the build: the measured blocks of README.md and docs/*.md must equal what the committed
  benchmarks/results/*.json give (``benchmarks/readme_tables.py --check``); a stale block stops the build.
- The CLI reference (docs/cli.md) is filled at build time from the argparse parser and the registries
  (docs/gen_cli.py), so it cannot be stale.
- benchmarks/results/*.md and *.png join the site, so the pages link to the reports they cite, and
  ``mkdocs build --strict`` fails on a link to a report that does not exist. The pages link to them as
  ``../benchmarks/results/...`` (right on GitHub, where docs/ is a folder of the checkout); the site has
  them at ``benchmarks/results/...`` beside the pages, so those links are rewritten for the build.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"<!-- gen_cli:(\w+) -->")


def _module(name: str, path: Path):
    """Import a script of the checkout by path (the benchmarks import each other by plain name)."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_pre_build(config, **kwargs) -> None:
    tables = _module("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    try:
        stale = tables.stale(ROOT, RESULTS)
    except SystemExit as e:  # a block missing or doubled: readme_tables names it
        raise PluginError(str(e)) from None
    if stale:
        raise PluginError(f"measured blocks out of date in {', '.join(map(str, stale))}: run make readme-tables")


def on_files(files, config, **kwargs):
    for path in sorted(RESULTS.glob("*")):
        if path.suffix in (".md", ".png"):
            files.append(File(path.relative_to(ROOT).as_posix(), str(ROOT), config["site_dir"],
                              config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if page.file.src_uri.startswith("benchmarks/"):
        return markdown  # the reports as the benchmarks wrote them
    if MARKER.search(markdown):
        gen_cli = _module("gen_cli", ROOT / "docs" / "gen_cli.py")
        markdown = MARKER.sub(lambda m: gen_cli.render(m.group(1)), markdown)
    return markdown.replace("](../benchmarks/results/", "](benchmarks/results/")
