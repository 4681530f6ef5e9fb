"""benchmarks/table1.py end to end on a tiny slice, and the README / docs blocks made from committed results.

Every requested cell runs once, resumes, reports; a scratch run writes only under its --results and
--runs-dir (not the working directory, not README.md or docs/); ``benchmarks/readme_tables.py`` is what
regenerates the measured blocks of README.md and docs/*.md, and the committed pages match the committed results.
"""

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import needs_fmnist

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def _benchmark(name: str):
    """A module of benchmarks/ (they import each other by plain name, as scripts)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def _script(name: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


def _bench(tmp_path, *extra):
    (tmp_path / "cwd").mkdir(exist_ok=True)
    return _script("table1.py", "--rows", "byol-subset", "rela-random-same", "--budgets", "0.5", "--seeds", "0",
                   "--full-epochs", "1", "--train-limit", "512", "--results", tmp_path / "res",
                   "--runs-dir", tmp_path / "runs", *extra, cwd=tmp_path / "cwd")


def pages() -> list[Path]:
    """The pages that hold measured blocks (README.md, docs/results.md, ...)."""
    return [REPO / page for page in _benchmark("readme_tables").PAGES]


def test_table1_grid_runs_resumes_and_reports_without_touching_the_readme(tmp_path):
    pages_before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in pages()]
    done = _bench(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "res" / "table1_e1.json").read_text())
    rows = sorted((r["row"], r["budget"]) for r in data["runs"])
    assert rows == [("byol-2ep", 2.0), ("byol-full", 1.0), ("byol-subset", 0.5), ("rela-random-same", 0.5),
                    ("untrained", 0.0)]
    for r in data["runs"]:
        for key in ("prior", "seed", "knn_top1", "linear_top1", "wall_seconds", "steps", "images_seen",
                    "switch_step", "cost_seconds", "cost_flops", "train_flops"):
            assert key in r, key
        assert 0 <= r["knn_top1"] <= 1 and (r["steps"] > 0) == (r["row"] != "untrained")
    floor = next(r for r in data["runs"] if r["row"] == "untrained")
    assert floor["train_flops"] == 0 and floor["images_seen"] == 0
    byol = [r for r in data["runs"] if r["row"].startswith("byol")]
    # FLOPs per image are the same for every BYOL run, so cost follows images seen exactly
    assert len({r["train_flops"] / r["images_seen"] for r in byol}) == 1
    rela_run = next(r for r in data["runs"] if r["row"] == "rela-random-same")
    assert rela_run["bank_flops"] > 0 and rela_run["cost_flops"] == rela_run["train_flops"] + rela_run["bank_flops"]
    full = next(r for r in data["runs"] if r["row"] == "byol-full")
    assert full["steps"] == 2 and full["images_seen"] == 512  # 512 images, batch 256, one epoch
    rela = next(r for r in data["runs"] if r["row"] == "rela-random-same")
    assert rela["prior"] == "random" and rela["images_seen"] == 256  # half the data each epoch
    assert data["meta"]["command"].startswith("python benchmarks/table1.py --rows")
    md = (tmp_path / "res" / "table1_e1.md").read_text()
    assert "## Headline (computed)" in md and "BYOL-full (100%)" in md and "0. No training (floor)" in md
    assert "No training (row 0, the floor)" in md and "of the floor-to-full headroom" in md
    assert (tmp_path / "res" / "table1_e1_cost.png").stat().st_size > 0
    # a scratch run writes only where it was told: nothing in the working directory, README and docs untouched
    assert list((tmp_path / "cwd").iterdir()) == []
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in pages()] == pages_before
    before = (tmp_path / "res" / "table1_e1.json").read_text()
    assert _bench(tmp_path).returncode == 0  # every cell is already in the JSON: nothing reruns
    assert json.loads((tmp_path / "res" / "table1_e1.json").read_text())["runs"] == json.loads(before)["runs"]
    # the report covers every budget the file holds, whatever --budgets the last command named
    assert _bench(tmp_path, "--report-only", "--budgets", "0.3").returncode == 0
    md = (tmp_path / "res" / "table1_e1.md").read_text()
    assert "| row | 50% budget |" in md and "30% budget" not in md


def test_a_results_file_keeps_every_command_that_added_runs(tmp_path):
    """A grid run in pieces (seed 0, later seed 1) is rerun by all of its commands; a report-only pass adds none."""
    common = _benchmark("common")
    path = tmp_path / "grid.json"
    first = common.ResultsFile(path, command="python benchmarks/table1.py --seeds 0")
    first.add({"seed": 0})
    assert common.ResultsFile(path, command="python benchmarks/table1.py --seeds 0").meta["commands"] == [
        "python benchmarks/table1.py --seeds 0"]  # nothing added: nothing recorded twice
    second = common.ResultsFile(path, command="python benchmarks/table1.py --seeds 1")
    second.add({"seed": 1})
    report = common.ResultsFile(path)  # --report-only passes command=None
    assert report.meta["commands"] == ["python benchmarks/table1.py --seeds 0", "python benchmarks/table1.py --seeds 1"]
    assert report.commands_shown() == ("Commands, in the order they added runs: `python benchmarks/table1.py --seeds 0`, "
                                       "then `python benchmarks/table1.py --seeds 1`")
    # a file written before the list existed: its one command made its runs
    path.write_text(json.dumps({"meta": {"command": "python old.py"}, "runs": [{"seed": 0}]}))
    assert common.ResultsFile(path).commands_shown() == "Command: `python old.py`"


def test_switch_sweep_needs_a_holdout(tmp_path):
    done = _bench(tmp_path, "--sweep-switch", "never")
    assert done.returncode != 0 and "needs --holdout" in done.stderr


def test_committed_readme_blocks_match_committed_results(tmp_path):
    done = _script("readme_tables.py", "--check", cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout


def copy_pages(root: Path) -> dict[str, str]:
    """The pages with blocks, copied into ``root`` at their places; returns name -> committed text."""
    texts = {}
    for page in pages():
        name = page.relative_to(REPO).as_posix()
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        texts[name] = page.read_text()
        (root / name).write_text(texts[name])
    return texts


def test_readme_tables_regenerates_only_the_marked_blocks(tmp_path):
    texts = copy_pages(tmp_path)
    stale = {
        # the README's short headline table (row 3 at the first budget)
        "README.md": texts["README.md"].replace("| 3. ReLA, random-init prior (same arch) | 81.4 /",
                                                "| 3. ReLA, random-init prior (same arch) | 11.1 /", 1),
        # the Table 1 headline and the methods table, in the results page
        "docs/results.md": texts["docs/results.md"].replace("; BYOL-full: k-NN", "; BYOL-full: k-NN 99.9 stale;", 1)
                                                   .replace("| vicreg | 73.5 |", "| vicreg | 11.1 |", 1),
    }
    assert "| 11.1 /" in stale["README.md"] and "99.9 stale" in stale["docs/results.md"]
    assert "| vicreg | 11.1 |" in stale["docs/results.md"]
    for name, text in stale.items():
        (tmp_path / name).write_text(text)
    results = tmp_path / "benchmarks" / "results"  # the checkout's layout, so the pages' links match
    results.mkdir(parents=True)
    for name in _benchmark("readme_tables").sources(BENCHMARKS / "results"):  # what the blocks read
        shutil.copy(BENCHMARKS / "results" / name, results)
    args = ["--root", tmp_path, "--results", results]
    done = _script("readme_tables.py", "--check", *args, cwd=tmp_path)
    assert done.returncode == 1 and "README.md" in done.stderr and "docs/results.md" in done.stderr
    assert all((tmp_path / name).read_text() == text for name, text in stale.items())  # --check changes nothing
    done = _script("readme_tables.py", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert all((tmp_path / name).read_text() == text for name, text in texts.items())


def test_readme_tables_names_a_missing_block(tmp_path):
    texts = copy_pages(tmp_path)
    (tmp_path / "docs" / "results.md").write_text(texts["docs/results.md"].replace("<!-- methods-table:end -->", ""))
    done = _script("readme_tables.py", "--root", tmp_path, cwd=tmp_path)
    assert done.returncode != 0 and "methods-table:end" in done.stderr
    # every block lives in one page: the same block twice is named too
    (tmp_path / "docs" / "results.md").write_text(texts["docs/results.md"])
    (tmp_path / "docs" / "theory.md").write_text(texts["docs/theory.md"] + "\n<!-- methods-table:start -->\n"
                                                 "<!-- methods-table:end -->\n")
    done = _script("readme_tables.py", "--root", tmp_path, cwd=tmp_path)
    assert done.returncode != 0 and "block methods-table" in done.stderr and "found in 2" in done.stderr




def test_headroom_and_cost_are_relative_to_the_floor_and_byol_full():
    table1 = _benchmark("table1")

    def run(row, budget, knn, linear, flops, seconds, seed=0):
        return {"row": row, "budget": budget, "seed": seed, "knn_top1": knn, "linear_top1": linear,
                "cost_flops": flops, "cost_seconds": seconds}

    runs = [run("untrained", 0.0, 0.75, 0.82, 0.0, 0.0), run("byol-full", 1.0, 0.85, 0.88, 1e12, 1000.0),
            run("rela-random-same", 0.1, 0.80, 0.86, 0.5e11, 80.0), run("byol-subset", 0.1, 0.70, 0.83, 1e11, 100.0)]
    summary = table1.summarise(runs, [0.1])
    rela_cell, byol_cell = summary["table"]["rela-random-same"][0.1], summary["table"]["byol-subset"][0.1]
    assert table1.headroom(summary, rela_cell, "knn_top1") == pytest.approx(0.5)
    assert table1.headroom(summary, rela_cell, "linear_top1") == pytest.approx(4 / 6)
    assert table1.headroom(summary, byol_cell, "knn_top1") == pytest.approx(-0.5)  # below the floor
    assert table1.cost_ratio(summary, rela_cell, "flops") == pytest.approx(0.05)
    assert table1.cost_ratio(summary, rela_cell, "seconds") == pytest.approx(0.08)
    assert not table1.reaches_full(summary, rela_cell)
    lines = table1.headline(summary, [0.1])
    assert any("captures 50% (k-NN) / 67% (linear)" in line for line in lines)
    # the hand-over is judged seed by seed, on the seeds both rows have (seed 2 of ReLA has no partner)
    runs += [run("distill-only", 0.1, 0.79, 0.86, 0.4e11, 70.0), run("rela-random-same", 0.1, 0.81, 0.865, 0.5e11, 80.0, 1),
             run("distill-only", 0.1, 0.80, 0.857, 0.4e11, 70.0, 1), run("rela-random-same", 0.1, 0.90, 0.90, 0.5e11, 80.0, 2)]
    lines = table1.headline(table1.summarise(runs, [0.1]), [0.1])
    assert ("Hand-over at 10%: ReLA with the switch minus distillation only, seed by seed (2 seeds): "
            "k-NN +1.0 ± 0.0, linear +0.4 ± 0.6 points (not >= 0.5 on both).") in lines


def test_switch_choice_takes_the_best_mean_and_states_its_margin_over_distillation_only():
    chosen_switch = _benchmark("table1").chosen_switch

    def run(spec, knn, linear):
        return {"row": f"switch={spec}", "budget": 0.5, "knn_top1": knn, "linear_top1": linear}

    specs = ["plateau", "adaptive", "never"]
    runs = [run("plateau", 0.823, 0.875), run("adaptive", 0.830, 0.860), run("never", 0.815, 0.872)]
    assert chosen_switch(runs[:2], specs, [0.5]).startswith("Chosen: not yet")
    line = chosen_switch(runs, specs, [0.5])
    assert "**plateau**" in line and "+0.80 k-NN / +0.30 linear; misses" in line
    runs[2] = run("never", 0.83, 0.88)
    assert "**never**" in chosen_switch(runs, specs, [0.5]) and "buys nothing" in chosen_switch(runs, specs, [0.5])


def test_full_e_is_the_first_whose_doubling_adds_little_and_seeds_are_named_at_e_and_2e(tmp_path):
    """byol_convergence's rule on seed 0's curve, then the check on the mean of the seeds that have run."""
    convergence = _benchmark("byol_convergence")

    def run(epochs, seed, knn, linear):
        return {"epochs": epochs, "seed": seed, "steps": epochs * 10, "knn_top1": knn, "knn20_top1": knn,
                "linear_top1": linear, "train_seconds": float(epochs)}

    curve = [run(4, 0, 0.79, 0.84), run(8, 0, 0.81, 0.86), run(16, 0, 0.815, 0.863), run(32, 0, 0.82, 0.865)]
    path = tmp_path / "byol_convergence.json"
    path.write_text(json.dumps({"meta": {}, "runs": curve + [run(8, 1, 0.81, 0.85)]}))
    lines = convergence.table_lines(convergence.ResultsFile(path))
    assert "Chosen: E = 8 epochs (seed 0: doubling adds +0.50 k-NN, +0.30 linear)." in lines  # 4 -> 8 adds +2 / +2
    # mean of seeds 0-1 at E = 8 (81.0 / 85.5) against seed 0 at 16: +0.5 / +0.8, a miss, and it says why
    assert lines[-1] == ("On the mean of seeds [0, 1] at E and [0] at 2E: 2E - E = +0.50 k-NN, +0.80 linear "
                         "(misses the rule; not every seed has run).")
    path.write_text(json.dumps({"meta": {}, "runs": curve + [run(8, s, 0.81, 0.86) for s in (1, 2)]
                                + [run(16, s, 0.815, 0.863) for s in (1, 2)]}))
    assert convergence.table_lines(convergence.ResultsFile(path))[-1] == (
        "On the mean of seeds [0, 1, 2] at E and [0, 1, 2] at 2E: 2E - E = +0.50 ± 0.00 k-NN, +0.30 ± 0.00 linear "
        "(meets the rule).")
    # seeds that scatter: linear 86.0 ± 0.1 at E, 86.6 ± 0.3 at 2E -> +0.60 ± sqrt((0.1^2 + 0.3^2) / 3) = 0.18: 0.10 over
    path.write_text(json.dumps({"meta": {}, "runs": curve + [run(8, 1, 0.81, 0.861), run(8, 2, 0.81, 0.859)]
                                + [run(16, 1, 0.815, 0.866), run(16, 2, 0.815, 0.869)]}))
    lines = convergence.table_lines(convergence.ResultsFile(path))
    assert lines[-2:] == [
        "On the mean of seeds [0, 1, 2] at E and [0, 1, 2] at 2E: 2E - E = +0.50 ± 0.00 k-NN, +0.60 ± 0.18 linear "
        "(misses the rule).",
        "± is one standard error of the difference of means; the gain exceeds the rule's limit: "
        "linear by 0.10 points (0.5 standard errors)."]


def test_a_recipe_is_compared_cell_by_cell_and_by_relas_margins_over_its_references():
    table1 = _benchmark("table1")

    def run(row, budget, knn, linear):
        return {"row": row, "budget": budget, "seed": 0, "knn_top1": knn, "linear_top1": linear}

    base = [run("untrained", 0.0, 0.75, 0.82), run("byol-full", 1.0, 0.83, 0.88), run("byol-subset", 0.2, 0.79, 0.85),
            run("rela-random-same", 0.2, 0.81, 0.87), run("distill-only", 0.2, 0.81, 0.87),
            run("rela-random-same", 0.5, 0.82, 0.875)]  # a budget the other recipe has not run: left out
    tuned = [run("untrained", 0.0, 0.75, 0.82), run("byol-full", 1.0, 0.84, 0.88), run("byol-subset", 0.2, 0.79, 0.86),
             run("rela-random-same", 0.2, 0.83, 0.88), run("distill-only", 0.2, 0.815, 0.875)]
    lines = table1.recipe_comparison(base, tuned, "lr_schedule=constant")
    text = "\n".join(lines)
    assert "| 3. ReLA, random-init prior (same arch), 20% | 81.0 / 87.0 | 83.0 / 88.0 | +2.0 / +1.0 |" in lines
    assert "| BYOL-full (100%) | 83.0 / 88.0 | 84.0 / 88.0 | +1.0 / +0.0 |" in lines
    assert "50%" not in text
    # ReLA - BYOL-full: -2/-1 -> -1/0; ReLA - subset: +2/+2 -> +4/+2 (linear unchanged); ReLA - distill: 0/0 -> +1.5/+0.5
    assert "| over BYOL-full, 20% | -2.0 / -1.0 | -1.0 / +0.0 | +1.0 / +1.0 |" in lines
    assert "| over BYOL on a subset, 20% | +2.0 / +2.0 | +4.0 / +2.0 | +2.0 / +0.0 |" in lines
    assert lines[-1].startswith("5 of 6 margins grew") and "does not help ReLA more" in lines[-1]
    tuned[2] = run("byol-subset", 0.2, 0.79, 0.85)  # now every margin grows
    assert "6 of 6 margins grew under lr_schedule=constant: it helps ReLA more" in table1.recipe_comparison(
        base, tuned, "lr_schedule=constant")[-1]
    # the README's summary of every knob: one line per recipe and budget both ran; a row missing is "-"
    no_distill = [r for r in tuned if r["row"] != "distill-only"]
    summary = table1.knob_summary(base, [("lr_schedule=constant", tuned), ("target_variance=0.9", no_distill)])
    assert summary[-2:] == [
        "| lr_schedule=constant | 20% | 1 | 81.0 / 87.0 -> 83.0 / 88.0 | +0.0 / +0.0 -> +1.5 / +0.5 | +2.0 / +2.0 -> +4.0 / +3.0 |",
        "| target_variance=0.9 | 20% | 1 | 81.0 / 87.0 -> 83.0 / 88.0 | - | +2.0 / +2.0 -> +4.0 / +3.0 |"]
    # a second seed of the default recipe alone changes neither comparison: each is made on the seeds both ran
    seed1 = [{**r, "seed": 1, "knn_top1": r["knn_top1"] - 0.05} for r in base]
    assert table1.knob_summary(base + seed1, [("lr_schedule=constant", tuned)]) == table1.knob_summary(
        base, [("lr_schedule=constant", tuned)])
    assert table1.recipe_comparison(base + seed1, tuned, "x") == table1.recipe_comparison(base, tuned, "x")
    # with the second seed under both recipes, both seeds count
    both = table1.knob_summary(base + seed1, [("lr_schedule=constant", tuned + [{**r, "seed": 1} for r in tuned])])
    assert both[-1].startswith("| lr_schedule=constant | 20% | 2 | 78.5 ± 3.5 / 87.0 ± 0.0 -> 83.0 ± 0.0 / 88.0 ± 0.0 |")
    # a second seed of some cells only (the other recipe's floor and BYOL-full): compared cell by cell, so
    # ReLA stays on seed 0 while BYOL-full takes both seeds
    partial = [{**r, "seed": 1} for r in tuned if r["row"] in ("untrained", "byol-full")]
    lines = table1.recipe_comparison(base + seed1, tuned + partial, "x")
    assert "| 3. ReLA, random-init prior (same arch), 20% | 81.0 / 87.0 | 83.0 / 88.0 | +2.0 / +1.0 |" in lines
    assert "| BYOL-full (100%) | 80.5 ± 3.5 / 88.0 ± 0.0 | 84.0 ± 0.0 / 88.0 ± 0.0 | +3.5 / +0.0 |" in lines
    # a grid of another row than row 3 (row 5b's longer prior): its cells, and no empty margin table
    mnist = [*base[:2], run("rela-mnist", 0.1, 0.81, 0.87)], [*tuned[:2], run("rela-mnist", 0.1, 0.82, 0.875)]
    lines = table1.recipe_comparison(*mnist, "x")
    assert "| 5b. ReLA, BYOL prior from MNIST, 10% | 81.0 / 87.0 | 82.0 / 87.5 | +1.0 / +0.5 |" in lines
    assert not any("margin" in line for line in lines), lines


@needs_fmnist
def test_a_byol_run_imported_without_flops_gets_what_the_grid_records_for_byol(tmp_path):
    """BYOL-full comes from byol_convergence.py's results when it ran the same configuration; a run
    recorded there before FLOPs were gets images seen x the FLOPs per image counted on its configuration,
    which must be what table1.py's own BYOL runs recorded while training (the committed E = 32 grid)."""
    old_format = {"meta": {"backbone": "convnet", "batch_size": 256},
                  "runs": [{"epochs": 32, "seed": 0, "steps": 7488, "images_seen": 1916928, "knn_top1": 0.83,
                            "linear_top1": 0.87, "train_seconds": 2312.0, "wall_seconds": 2320.0}]}
    (tmp_path / "byol.json").write_text(json.dumps(old_format))
    table1 = _benchmark("table1")
    grid = table1.Grid(table1.parse_args(["--full-epochs", "32", "--byol-results", str(tmp_path / "byol.json"),
                                          "--results", str(tmp_path / "res"), "--runs-dir", str(tmp_path / "runs")]))
    imported = grid.converged_byol(32, 0)
    assert imported["knn_top1"] == 0.83 and imported["imported_from"].endswith("byol.json")
    assert grid.converged_byol(32, 1) is None  # that seed did not run there
    committed = json.loads((BENCHMARKS / "results" / "table1_e32.json").read_text())["runs"]
    trained_here = next(r for r in committed if r["row"] == "byol-subset" and "imported_from" not in r)
    assert imported["train_flops"] / imported["images_seen"] == pytest.approx(
        trained_here["train_flops"] / trained_here["images_seen"], rel=1e-9)
    assert table1._costs(imported)["cost_flops"] == imported["train_flops"]


def test_set_overrides_every_training_row_and_names_its_files(tmp_path):
    done = _bench(tmp_path, "--set", "lr_schedule=constant", "warmup=0")
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "res" / "table1_e1_set-lr_scheduleconstant-warmup0.0.json").read_text())
    assert data["meta"]["overrides"] == {"lr_schedule": "constant", "warmup": 0.0}
    # even on the test split no BYOL at 2E (the default recipe's convergence check, twice a full run) and
    # nothing imported
    assert sorted(r["row"] for r in data["runs"]) == ["byol-full", "byol-subset", "rela-random-same", "untrained"]
    for r in data["runs"]:
        assert "imported_from" not in r
        cfg = yaml.safe_load((tmp_path / r["out"] / "config.yaml").read_text()) if r["row"] != "untrained" else None
        if cfg:  # BYOL's rows too: a knob is compared recipe against recipe
            assert (cfg["lr_schedule"], cfg["warmup"], cfg["holdout"]) == ("constant", 0.0, None), r["row"]


def test_set_of_prior_only_fields_takes_the_baselines_from_the_default_recipes_grid(tmp_path):
    assert _bench(tmp_path, "--holdout", "128").returncode == 0
    done = _bench(tmp_path, "--holdout", "128", "--set", "target_variance=0.5")
    assert done.returncode == 0, done.stderr[-3000:]
    default = {r["row"]: r for r in json.loads((tmp_path / "res" / "table1_e1_val128.json").read_text())["runs"]}
    data = json.loads((tmp_path / "res" / "table1_e1_val128_set-target_variance0.5.json").read_text())
    for r in data["runs"]:
        if r["row"] == "rela-random-same":  # the only row with a prior trains again, with the knob
            assert "imported_from" not in r and "set-target_variance0.5" in r["out"]
            assert yaml.safe_load((tmp_path / r["out"] / "config.yaml").read_text())["target_variance"] == 0.5
        else:  # untrained, BYOL-full, BYOL-subset: the default recipe's runs, not retrained
            assert r["imported_from"].endswith("table1_e1_val128.json")
            assert {k: v for k, v in r.items() if k != "imported_from"} == default[r["row"]]
    assert not (tmp_path / "runs_e1_val128_set-target_variance0.5" / "byol-full-s0").exists()

    # a longer-trained other-dataset prior is a knob of its own row only: its own files, the rest imported
    table1 = _benchmark("table1")
    grid = table1.Grid(table1.parse_args(["--full-epochs", "1", "--train-limit", "512", "--holdout", "128",
                                          "--mnist-epochs", "3", "--results", str(tmp_path / "res")]))
    assert grid.name == "table1_e1_val128_mnist3" and grid.changed_prior_rows == {"rela-mnist": "_mnist3"}
    cfg = grid.base(prior="none", ratio=0.5, epochs=1, seed=0, out=grid.out("byol-subset-b0.5-s0"))
    key = dict(row="byol-subset", budget=0.5, seed=0)
    assert grid.same_run_of_the_default_recipe(cfg, key)["imported_from"].endswith("table1_e1_val128.json")
    assert grid.same_run_of_the_default_recipe(cfg, {**key, "row": "rela-mnist"}) is None
    assert table1.Grid(table1.parse_args(["--full-epochs", "1", "--holdout", "128"])).changed_prior_rows == {}

    # with a --set as well, every other row (a prior's included) is that --set grid's run
    both = table1.Grid(table1.parse_args(["--full-epochs", "1", "--train-limit", "512", "--holdout", "128",
                                          "--mnist-epochs", "3", "--set", "target_variance=0.5",
                                          "--results", str(tmp_path / "res")]))
    assert both.name == "table1_e1_val128_set-target_variance0.5_mnist3"
    # its report is compared with the default recipe run with the same MNIST prior (--mnist-epochs 3)
    assert both.default_recipe_results == tmp_path / "res" / "table1_e1_val128_mnist3.json"
    assert table1.Grid(table1.parse_args(["--full-epochs", "1", "--holdout", "128", "--set", "warmup=0",
                                          "--results", str(tmp_path / "res")])).default_recipe_results == \
        tmp_path / "res" / "table1_e1_val128.json"
    knobbed = {r["row"]: r for r in data["runs"]}
    rela_cfg = both.base(prior="random", ratio=0.5, epochs=1, seed=0, out=both.out("rela-random-same-b0.5-s0"))
    for row, row_cfg in (("rela-random-same", rela_cfg), ("byol-subset", cfg)):
        found = both.same_run_of_the_default_recipe(row_cfg, {**key, "row": row})
        assert found["imported_from"].endswith("table1_e1_val128_set-target_variance0.5.json")
        assert {k: v for k, v in found.items() if k != "imported_from"} == \
            {k: v for k, v in knobbed[row].items() if k != "imported_from"}
    assert both.same_run_of_the_default_recipe(rela_cfg, {**key, "row": "rela-mnist"}) is None


@pytest.mark.parametrize("item, message", [("lr", "expected FIELD=VALUE"), ("nosuch=1", "unknown field"),
                                           ("ratio=0.5", "not overridable"), ("warmup=abc", "warmup")])
def test_set_rejects_what_it_cannot_apply_in_one_line(tmp_path, item, message):
    done = _script("table1.py", "--set", item, "--report-only", "--results", tmp_path, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("benchmarks/table1.py: error:") and not list(tmp_path.iterdir())
