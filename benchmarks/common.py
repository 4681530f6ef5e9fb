"""What the benchmark scripts share: where they write, resumable result files, mean ± std, reports.

Benchmarks live in the source checkout, never in the installed package. Every script writes its
results under ``--results DIR`` and its training runs under ``--runs-dir DIR``; the defaults are
this checkout's ``benchmarks/results`` and ``runs/``, found from this file's location, not from the
working directory. No script touches README.md: ``make readme-tables`` (benchmarks/readme_tables.py)
regenerates the marked blocks of README.md and docs/ from the committed results.

Importing this module puts the checkout first on ``sys.path``, so a script measures the ``rela``
next to it, whatever else is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "runs"
BANKS = REPO / ".cache" / "rela"  # the checkout's bank cache, shared by every benchmark and `rela train` run there
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402  (after the path set-up above, like every rela import below)

from rela.config import TrainConfig  # noqa: E402
from rela.evaluate import evaluate_run  # noqa: E402
from rela.io import load_json, save_json, save_text  # noqa: E402
from rela.train import train  # noqa: E402


# --- where results go ------------------------------------------------------------------

def add_output_args(parser: argparse.ArgumentParser, runs: str | None = None) -> None:
    """``--results DIR`` (and, with ``runs``, ``--runs-dir DIR``) with checkout-relative defaults."""
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder the result files are written to (default: the checkout's benchmarks/results)")
    if runs is not None:
        parser.add_argument("--runs-dir", type=Path, default=RUNS / runs,
                            help=f"folder of the training runs (default: the checkout's runs/{runs})")


def shown(path: str | Path) -> str:
    """A path as results should record it: relative to the checkout when inside it."""
    path = Path(path).resolve()
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def command(script: str, argv: list[str]) -> str:
    """How to rerun a script from the checkout's root: ``python benchmarks/NAME.py ARGS``."""
    return f"python {shown(script)} " + " ".join(argv)


def environment() -> dict:
    """What the timings depend on, recorded beside them."""
    return {"torch": torch.__version__, "machine": platform.platform(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}


# --- resumable grids -------------------------------------------------------------------

class ResultsFile:
    """``{"meta": ..., "runs": [...]}`` on disk, rewritten atomically after every run, so a grid resumes."""

    def __init__(self, path: str | Path, meta: dict | None = None, command: str | None = None):
        """``command``: how to rerun what made the file; None keeps the stored one (or takes sys.argv)."""
        self.path = Path(path)
        data = load_json(self.path) if self.path.is_file() else {}
        self.runs: list[dict] = data.get("runs", [])
        stored = data.get("meta", {})
        env = environment()
        # every command that added runs, in order: a grid run in pieces (seeds, rows) needs all of them to rerun
        made_by = stored.get("commands") or ([stored["command"]] if stored.get("command") and self.runs else [])
        self.meta = {**stored, **(meta or {}), "command": command or stored.get("command") or " ".join(sys.argv),
                     "commands": list(made_by), "torch": env["torch"], "machine": env["machine"],
                     "threads": env["threads"]}

    def find(self, **key) -> dict | None:
        return next((r for r in self.runs if all(r.get(k) == v for k, v in key.items())), None)

    def add(self, run: dict) -> None:
        self.runs.append(run)
        if self.meta["command"] not in self.meta["commands"]:
            self.meta["commands"].append(self.meta["command"])
        self.save()

    def commands_shown(self) -> str:
        """The report's line on how to rerun the file: every command that added runs, in order."""
        made_by = self.meta["commands"] or [self.meta["command"]]
        return ("Command: " if len(made_by) == 1 else "Commands, in the order they added runs: ") + \
            ", then ".join(f"`{c}`" for c in made_by)

    def save(self) -> None:
        save_json({"meta": self.meta, "runs": self.runs}, self.path)


# The switch the committed results were measured with, before rela's default became soft-plateau (issue 28):
# every benchmark that leaves the switch unset runs this one, so its committed results stay reproducible.
# table1.py sets its ReLA rows' switch itself (--switch, default soft-plateau, chosen on the holdout).
BENCH_SWITCH = "adaptive"


def config(**fields) -> TrainConfig:
    """A TrainConfig whose banks are cached in the checkout (not in the working directory), with the
    benchmarks' switch (:data:`BENCH_SWITCH`) unless ``fields`` names one."""
    return TrainConfig(**{"cache_dir": str(BANKS), "switch": BENCH_SWITCH, **fields})


def train_and_evaluate(cfg: TrainConfig, *, linear_epochs: int = 50) -> dict:
    """One benchmark cell: a fresh run (resumed if interrupted), then k-NN + linear probe."""
    cfg = dataclasses.replace(cfg, resume=True)
    train(cfg)
    return evaluate_run(cfg.out, linear_epochs=linear_epochs, progress=False)


def run_cell(results: ResultsFile, key: dict, cfg: TrainConfig, keep: tuple[str, ...], message: str,
             extra: dict | None = None, derive=None) -> dict:
    """The stored record of ``key``, or: print ``message``, train + evaluate ``cfg``, store the record.

    The record: ``key``, ``extra``, the metrics named in ``keep``, then what ``derive(record)`` adds.
    """
    done = results.find(**key)
    if done:
        return done
    print(message, flush=True)
    metrics = train_and_evaluate(cfg)
    record = {**key, **(extra or {}), **{k: metrics.get(k) for k in keep}}
    record.update(derive(record) if derive else {})
    results.add(record)
    return record


# --- numbers and reports ---------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if len(values) > 1 else f"{m * scale:.{digits}f}"


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: list[float]) -> dict:
    """Median, min, max, mean and count of a list of timings."""
    if not values:
        return {"median": float("nan"), "n": 0}
    return {"median": median(values), "min": float(min(values)), "max": float(max(values)),
            "mean": float(statistics.fmean(values)), "n": len(values)}


def table_head(*columns: str) -> list[str]:
    """The first two lines of a markdown table."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def write_report(lines: list[str], path: str | Path) -> None:
    """Save a markdown report atomically and print it."""
    text = "\n".join(lines)
    save_text(text + "\n", Path(path))
    print(text)

