"""The docs site builds offline and strictly (what `make docs` runs), with the generated CLI reference in it.

A broken link, a missing anchor or a stale measured block fails ``mkdocs build --strict``; one build of the
checkout's docs shows they have none, and a second, of a copy with one broken link, shows strict catches it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest
import yaml

from rela.cli import TRAIN_FLAGS
from rela.config import DEFAULT_WHY
from rela.registry import METHODS, PRIORS, SWITCHES

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install 'rela[docs]' (part of rela[dev])")
pytest.importorskip("material", reason="mkdocs-material is not installed: pip install 'rela[docs]'")
pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed: pip install 'rela[docs]'")


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH: the checkout's rela for mkdocstrings and the hooks; no network is needed (fonts are off)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


def text_of(page: Path) -> str:
    return unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.read_text())))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    done = build(REPO / "mkdocs.yml", site)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return site


def test_docs_build_strictly_with_every_page(site):
    assert (site / "index.html").is_file()
    for page in ("usage", "cli", "results", "theory", "streaming", "distributed", "reliability", "api"):
        assert (site / page / "index.html").is_file(), page
    # the reports the pages cite are part of the site, so their links are checked too
    assert (site / "benchmarks" / "results" / "table1_e32" / "index.html").is_file()
    assert (site / "benchmarks" / "results" / "table1_e32_cost.png").is_file()


def test_cli_reference_is_generated_from_the_parser_and_registries(site):
    text = text_of(site / "cli" / "index.html")
    for flag in TRAIN_FLAGS:
        assert flag in text, flag
    for registry in (METHODS, PRIORS, SWITCHES):
        for usage in registry.usages():
            assert usage in text, usage
    for why in DEFAULT_WHY.values():  # the reasons for the defaults, as --help gives them
        assert why in text
    assert "<!-- gen_cli" not in (site / "cli" / "index.html").read_text()  # every marker was filled


def test_api_reference_comes_from_the_docstrings(site):
    text = text_of(site / "api" / "index.html")
    for name in ("TrainConfig", "from_preset", "load_or_extract", "transport", "KNNMonitor"):
        assert name in text, name
    assert "The shipped preset" in text  # TrainConfig.from_preset's docstring


def test_a_broken_link_fails_the_strict_build(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs)
    (docs / "usage.md").write_text((docs / "usage.md").read_text() + "\nSee [nothing](no-such-page.md).\n")
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    config.update(docs_dir=str(docs), hooks=[str(REPO / "docs" / "hooks.py")])
    config["plugins"] = ["search"]  # the API page's mkdocstrings blocks are not what this build is about
    (docs / "api.md").write_text("# API reference\n")
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    done = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-page.md" in done.stdout + done.stderr
