"""Hand-written mutants of the training step (rela/train.py), each run against a fast subset of the tests.

mutmut over all of train.py would run the slow training tests for hundreds of mutants; instead each
mutant below is one deliberate fault in ``training_step``, ``optimizer_step`` or
``configure_optimizers``. For each, the tree is copied to a temporary folder with the one edit, and
pytest runs there (in a process forked from this one, which has imported torch and Lightning
already) over SUITE, NEW_TESTS and DDP in that order, stopping at the first failure: killed *before*
if a test of the suite failed (the tests as on main), killed *after* if any did. A mutant that a new
test kills never reaches DDP; with --ddp-before it runs DDP alone once more (minutes a mutant), so
that its *before* verdict covers DDP too; without, that verdict is the fast suite's.

    PYTHONPATH=. python scripts/mutation_train.py [--only NAME ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import lightning  # noqa: F401  imported once here; every forked run reuses it
import pytest
import torch  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
TARGET = "rela/train.py"
NEW_TESTS = "tests/test_mutation_kills.py"
# The suite's own tests, fastest first; DDP is a two-process run of ~2-5 minutes on 2 shared cores.
SUITE = [
    "tests/test_optimisation.py",
    "tests/test_all_methods.py::test_rela_phase_keeps_momentum_networks_moving[byol]",
    "tests/test_all_methods.py::test_switch_hands_over_to_the_method[byol]",
    "tests/test_budget_options.py::test_max_steps_cuts_a_run_inside_an_epoch",
    "tests/test_reliability.py::test_nan_loss_stops_and_keeps_the_last_good_checkpoint",
]
DDP = ["tests/test_ddp.py::test_switch_decision_identical_on_all_ranks"]
# name: (text in rela/train.py, exactly once; its replacement)
MUTANTS = {
    "monitor input not detached": ("self.monitor(features.detach().float())", "self.monitor(features.float())"),
    "monitor not trained": ("return loss + monitor_loss", "return loss"),
    "ReLA loss weighted 1 - lam": ("loss = lam * rela_loss", "loss = (1 - lam) * rela_loss"),
    "method loss weighted lam": ("loss + (1 - lam) * out.loss", "loss + lam * out.loss"),
    "ReLA loss also at lam 0": ("if lam > 0:  # ReLA phase", "if lam >= 0:  # ReLA phase"),
    "method loss also at lam 1": ("if lam < 1:  # the method's", "if lam <= 1:  # the method's"),
    "switch.step skipped": ("self.rela.switch.step(lam, mean_loss, progress)", "pass"),
    "switch never sees the loss": ("mean_loss = None if rela_loss is None else", "mean_loss = None if True else"),
    "loss not averaged over ranks (no all_gather)": ("self.all_gather(rela_loss.detach()).float().mean().item()",
                                                     "rela_loss.detach().float().item()"),
    "update_momentum skipped": ("self.method.update_momentum(step, max_steps)", "pass"),
    "progress one step ahead": ("Progress(self.global_step,", "Progress(self.global_step + 1,"),
    "non-finite loss not caught": ("if not torch.isfinite(loss):", "if False:"),
    # the LR schedule lives in rela/schedules.py: (old, new, file) for mutants outside TARGET
    "warm-up off by one (step / W)": ("(step + 1) / warmup if", "step / warmup if", "rela/schedules.py"),
    "warm-up one step too long": ("if step < warmup else", "if step <= warmup else", "rela/schedules.py"),
    "cosine spans the warm-up too": ("/ max(total - warmup, 1))", "/ max(total, 1))", "rela/schedules.py"),
    "weight decay dropped": ("weight_decay=self.cfg.weight_decay)", ")"),
    "ReLA-phase images counted at lam 0": ("images * (self._batch_lam > 0)", "images * (self._batch_lam >= 0)"),
    "steps counted twice": ('self.budget["steps"] += 1', 'self.budget["steps"] += 2'),
}


class FirstFailure:
    """pytest plugin: the node id of the first failing test."""

    def __init__(self):
        self.failed: str | None = None

    def pytest_runtest_logreport(self, report):
        if report.failed and self.failed is None:
            self.failed = report.nodeid


def run_tests(tree: Path, tests: list[str], timeout: float) -> dict:
    """pytest over ``tests`` in ``tree`` (stop at the first failure), in a forked child; its outcome."""
    result = tree / "result.json"
    pid = os.fork()
    if pid == 0:  # the child: import rela from the mutated copy (subprocesses too, via PYTHONPATH)
        os.setsid()
        os.chdir(tree)
        sys.path.insert(0, str(tree))
        os.environ["PYTHONPATH"] = str(tree)
        plugin = FirstFailure()
        code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests], plugins=[plugin])
        result.write_text(json.dumps({"exit": int(code), "failed": plugin.failed}))
        os._exit(0)
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if os.waitpid(pid, os.WNOHANG)[0]:
            break
        time.sleep(1)
    else:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return {"status": "timeout", "seconds": timeout}
    outcome = json.loads(result.read_text()) if result.is_file() else {"exit": -1, "failed": None}
    outcome["seconds"] = round(time.monotonic() - start, 1)
    return outcome


def mutated_tree(tmp: Path, name: str | None) -> Path:
    tree = tmp / "tree"
    shutil.copytree(ROOT / "rela", tree / "rela", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", tree / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    for name_ in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name_, tree / name_)
    if name is not None:
        old, new, target = (*MUTANTS[name], TARGET)[:3]
        source = (ROOT / target).read_text()
        assert source.count(old) == 1, f"mutant {name!r}: {old!r} occurs {source.count(old)} times in {target}"
        (tree / target).write_text(source.replace(old, new))
    return tree


def verdict(tree: Path, timeout: float, ddp_before: bool) -> dict:
    """killed / survived / timeout, before (SUITE + DDP) and after (with NEW_TESTS), and the killing tests."""
    first = run_tests(tree, [*SUITE, NEW_TESTS, *DDP], timeout)
    if first.get("status") == "timeout":
        return {"before": "timeout", "after": "timeout", "seconds": first["seconds"]}
    if first["exit"] == 0:
        return {"before": "survived", "after": "survived", "seconds": first["seconds"]}
    result = {"before": "killed", "after": "killed", "killed_by": first["failed"], "seconds": first["seconds"]}
    if first["failed"].startswith(NEW_TESTS):
        result["before"] = "survived"
        if not ddp_before:
            result["before_ddp"] = "not run"
            return result
        ddp = run_tests(tree, DDP, timeout)  # would the suite's DDP test, not reached, have killed it?
        result["before"] = "survived" if ddp.get("exit") == 0 else "killed"
        result["killed_before_by"] = ddp.get("failed")
        result["seconds"] += ddp["seconds"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run these mutants only (names as in MUTANTS)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    parser.add_argument("--ddp-before", action="store_true", help="run DDP for mutants first killed by a new test")
    parser.add_argument("--no-baseline", action="store_true", help="skip the check that the unmutated tree passes")
    args = parser.parse_args()
    results = {}
    for name in [None, *(args.only or MUTANTS)]:
        with tempfile.TemporaryDirectory(prefix="mutation-train-") as tmp:
            tree = mutated_tree(Path(tmp), name)
            if name is None and args.no_baseline:
                continue
            if name is None:  # the unmutated tree must pass, or no verdict means anything
                outcome = run_tests(tree, [*SUITE, NEW_TESTS, *DDP], args.timeout)
                if outcome.get("exit") != 0:
                    print(f"the unmutated tree fails: {outcome}", file=sys.stderr)
                    return 1
                print(f"baseline passes ({outcome['seconds']} s)", flush=True)
                continue
            results[name] = verdict(tree, args.timeout, args.ddp_before)
        print(f"{name}: {results[name]}", flush=True)
    for when in ("before", "after"):
        killed = sum(r[when] == "killed" for r in results.values())
        print(f"{when}: {killed}/{len(results)} killed")
    if args.json:
        args.json.write_text(json.dumps({"target": TARGET, "tests": [*SUITE, NEW_TESTS, *DDP], "mutants": {
            n: {"from": MUTANTS[n][0], "to": MUTANTS[n][1], **r} for n, r in results.items()}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
