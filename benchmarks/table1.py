"""Table 1 of the paper in miniature: budget x prior on Fashion-MNIST, 3 seeds, cost-to-accuracy plots.

    python benchmarks/table1.py --full-epochs 32                  # the grid (many hours on 2 CPU cores)
    python benchmarks/table1.py --full-epochs 32 --seeds 0        # one seed first; rerun later to add seeds
    python benchmarks/table1.py --full-epochs 32 --holdout 10000 --budgets 0.5 --seeds 0 \
        --sweep-switch adaptive plateau soft-plateau never        # choose the switch on the holdout split
    python benchmarks/table1.py --full-epochs 32 --report-only    # tables/plots from what has run
    python benchmarks/table1.py --full-epochs 32 --holdout 10000 --budgets 0.2 --seeds 0 \
        --rows byol-subset rela-random-same --set lr_schedule=constant warmup=0   # a knob, on the holdout

"Full budget" is BYOL for E epochs (--full-epochs; E is chosen by benchmarks/byol_convergence.py)
on all 60k images; budgets are fractions of its optimizer steps. Rows: 0 no training (the learner
as initialised: the floor); 1 BYOL on a random subset each epoch; 2 BYOL on all data for fewer
steps; 3 ReLA + random init of the learner's architecture, with --switch; 3a the same with the
authors' adaptive switch; 4 ReLA + random init of another architecture; 5 ReLA + a BYOL model of
scikit-learn's digits; 5b the same from MNIST's 60k digits (scripts/install_mnist.py); 6 ReLA + the BYOL-full model of Fashion-MNIST (not free: it costs a full
BYOL run); 7 distillation only (ReLA phase, no switch). Rows 2, 4, 5, 5b, 6 run for the first seed
only unless --all-rows-every-seed. BYOL-full and BYOL at 2E for a seed are taken from
benchmarks/byol_convergence.py's results when it ran the same configuration, else trained here (a --set
grid trains no BYOL at 2E).
Finished runs are kept in the JSON and skipped, so the grid can run in pieces.

Cost: FLOPs of every forward and backward pass (rela.flops: learner, momentum network, and the
prior's extraction of the bank), a figure background load cannot distort; wall-clock seconds
(training + bank extraction) stay beside it. Headroom: (acc - floor) / (BYOL-full - floor) per metric.

Writes table1_e<E>.json / .md / _cost.png / _byol_curve.png under --results (``_val<N>`` with
--holdout N); the README's and docs' headlines come from committed results through ``make readme-tables``,
never from this script.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import yaml

from common import (RESULTS, ResultsFile, add_output_args, command, config, fmt, mean_std, run_cell, shown,
                    table_head, train_and_evaluate, write_report)
from rela.config import FULL_DATA_IGNORED_FIELDS, HANDOVER_ONLY_FIELDS, PRIOR_ONLY_FIELDS, TrainConfig
from rela.errors import RelaError
from rela.io import load_json
from rela.plotting import pyplot
from rela.train import count_step_flops, train

TRAIN_IMAGES = 60_000
ROWS = {
    "byol-subset": "1. BYOL, random subset per epoch",
    "byol-fewer-steps": "2. BYOL, all data, fewer steps",
    "rela-random-same": "3. ReLA, random-init prior (same arch)",
    "rela-random-adaptive": "3a. ReLA, random-init prior, the authors' adaptive switch",
    "rela-random-other": "4. ReLA, random-init prior (other arch)",
    "rela-digits": "5. ReLA, BYOL prior from digits",
    "rela-mnist": "5b. ReLA, BYOL prior from MNIST",
    "rela-fmnist-byol": "6. ReLA, BYOL-full prior of Fashion-MNIST (not free)",
    "distill-only": "7. Distillation only (no switch)",
}
FREE_PRIOR_ROWS = ("rela-random-same", "rela-random-adaptive", "rela-random-other", "rela-digits", "rela-mnist")
# rows whose prior is BYOL trained on another dataset: row -> (dataset, default epochs of that prior)
OTHER_DATASET_PRIORS = {"rela-digits": ("digits", 100), "rela-mnist": ("mnist", 10)}
ONE_SEED_ROWS = ("byol-fewer-steps", "rela-random-other", "rela-digits", "rela-mnist", "rela-fmnist-byol")
FLOOR = "untrained"  # row 0: the learner as initialised, evaluated like every other row
RECORDED = ("knn_top1", "knn20_top1", "linear_top1", "wall_seconds", "train_seconds", "bank_seconds", "steps",
            "images_seen", "switch_step", "rela_steps", "epochs", "ratio", "train_flops", "bank_flops", "subset",
            "selection_flops")
METRICS = (("knn_top1", "k-NN"), ("linear_top1", "linear"))


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="benchmarks/table1.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full-epochs", type=int, default=32,
                   help="E: epochs of BYOL-full (32: chosen by benchmarks/byol_convergence.py)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--other-arch", default="resnet-narrow", help="architecture of row 4's random prior")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", dest="overrides",
                   help="TrainConfig fields over every training row, BYOL's included (a knob investigation, on "
                        "--holdout): e.g. lr_schedule=constant warmup=0; the result files get a _set-... suffix. "
                        "When every field is one only a prior reads (e.g. target_variance, rela_augment), the rows "
                        "without a prior are taken from the default recipe's file instead of retrained; when every "
                        "field is one only the hand-over reads (momentum_after_switch), so is distillation only. "
                        "A --set grid trains no BYOL at 2E (the default recipe's convergence check)")
    p.add_argument("--switch", default="soft-plateau",
                   help="switch of the ReLA rows (3a uses adaptive, 7 never switches); chosen on --holdout 10000 "
                        "(benchmarks/results/table1_e32_switch_val10000.md)")
    p.add_argument("--all-rows-every-seed", action="store_true",
                   help=f"also run {', '.join(ONE_SEED_ROWS)} for every seed (default: first seed only)")
    p.add_argument("--byol-results", type=Path, default=RESULTS / "byol_convergence.json",
                   help="BYOL runs of benchmarks/byol_convergence.py reused as BYOL-full / 2E when their config matches")
    p.add_argument("--digits-epochs", type=int, default=OTHER_DATASET_PRIORS["rela-digits"][1],
                   help="epochs of row 5's BYOL prior on scikit-learn's digits; another value is a knob: the result "
                        "files get a _digits<N> suffix and every other row is taken from the grid without it "
                        "(the same --set)")
    p.add_argument("--mnist-epochs", type=int, default=OTHER_DATASET_PRIORS["rela-mnist"][1],
                   help="epochs of row 5b's BYOL prior on MNIST's 60k digits (scripts/install_mnist.py); another "
                        "value is a knob, as --digits-epochs")
    p.add_argument("--holdout", type=int, default=None, help="validation mode: evaluate on the last N train images")
    add_output_args(p, runs="table1")
    p.add_argument("--train-limit", type=int, default=None, help="smoke tests: use only the first N training images")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--sweep-switch", nargs="+", metavar="SPEC", default=None,
                   help="validation only (needs --holdout): run row 3 with each switch spec instead of the grid")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.overrides = parse_overrides(args.overrides)
    except RelaError as e:
        p.error(str(e))  # one line, exit 2
    return args


ROW_FIELDS = ("prior", "switch", "ratio", "epochs", "max_steps", "seed", "out", "holdout", "train_limit")


def parse_overrides(items: list[str]) -> dict:
    """``FIELD=VALUE`` strings -> TrainConfig fields, checked and typed as a config file's would be
    (values read as YAML). The fields that define a row or a split are not for overriding."""
    raw = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise RelaError(f"--set {item}: expected FIELD=VALUE")
        if name in ROW_FIELDS:
            raise RelaError(f"--set {name}: the grid sets it per row (or by its own option); not overridable")
        raw[name] = yaml.safe_load(value)
    checked = TrainConfig.from_dict(raw, source="--set")
    return {name: getattr(checked, name) for name in raw}


def overrides_suffix(overrides: dict) -> str:
    return "_set-" + "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) if overrides else ""


def changed_prior_rows(args) -> dict[str, str]:
    """Rows whose other-dataset prior is trained for a non-default number of epochs -> result-file suffix."""
    return {row: f"_{name}{epochs}" for row, (name, default) in OTHER_DATASET_PRIORS.items()
            if (epochs := getattr(args, f"{name}_epochs")) != default}


def _costs(record: dict) -> dict:
    # a subset rule's own work (k-means of the targets) is part of the cost
    flops = None if record.get("train_flops") is None else \
        record["train_flops"] + (record.get("bank_flops") or 0.0) + (record.get("selection_flops") or 0.0)
    return {"cost_seconds": record["train_seconds"] + (record.get("bank_seconds") or 0.0), "cost_flops": flops,
            "images_per_second": record["images_seen"] / record["train_seconds"] if record["train_seconds"] else None}


class Grid:
    def __init__(self, args):
        self.args = args
        suffix = (f"_switch_val{args.holdout}" if args.sweep_switch else f"_val{args.holdout}") if args.holdout else ""
        self.base_results = args.results / f"table1_e{args.full_epochs}{suffix}.json"  # the same grid, no --set
        suffix += overrides_suffix(args.overrides)
        # the same grid and --set with every other-dataset prior at its default epochs
        self.same_recipe_results = args.results / f"table1_e{args.full_epochs}{suffix}.json"
        self.changed_prior_rows = changed_prior_rows(args)
        prior_suffix = "".join(self.changed_prior_rows.values())
        # what a --set grid's report is compared with: the default recipe, with the same priors
        self.default_recipe_results = self.base_results.with_name(f"{self.base_results.stem}{prior_suffix}.json")
        suffix += prior_suffix
        self.name = f"table1_e{args.full_epochs}{suffix}"
        self.results = ResultsFile(args.results / f"{self.name}.json", meta={
            "full_epochs": args.full_epochs, "backbone": args.backbone, "batch_size": args.batch_size,
            "switch": args.switch, "holdout": args.holdout, "train_limit": args.train_limit,
            "dataset": "fashion-mnist", "overrides": args.overrides},
            command=None if args.report_only else command(__file__, args.argv))
        self.runs_dir = Path(f"{args.runs_dir}_e{args.full_epochs}{suffix}")
        self.n_train = (args.train_limit or TRAIN_IMAGES) - (args.holdout or 0)
        self.full_steps = args.full_epochs * (self.n_train // args.batch_size)

    def base(self, **kw) -> TrainConfig:
        return config(dataset="fashion-mnist", backbone=self.args.backbone, batch_size=self.args.batch_size,
                      holdout=self.args.holdout, train_limit=self.args.train_limit, probe_every=0, progress=False,
                      **self.args.overrides, **kw)

    def run(self, row: str, budget: float, seed: int, cfg: TrainConfig, prior_label: str) -> dict:
        key = dict(row=row, budget=budget, seed=seed)
        if not self.results.find(**key) and (same := self.same_run_of_the_default_recipe(cfg, key)):
            self.results.add(same)
        return run_cell(self.results, dict(row=row, budget=budget, seed=seed), cfg, RECORDED,
                        f"[table1] {row} budget={budget} seed={seed} prior={cfg.prior}",
                        extra={"prior": prior_label, "out": shown(cfg.out)}, derive=_costs)

    def same_run_of_the_default_recipe(self, cfg: TrainConfig, key: dict) -> dict | None:
        """A run this grid's changes cannot alter, taken from the grid that already has it instead of trained
        again: every row but the one whose other-dataset prior trains for other epochs comes from the same
        recipe's grid without that change (the same --set); a row that ignores every field a --set changes (one
        without a prior, when only what a prior reads changes; distillation only, when only what the hand-over
        reads changes) comes from the default recipe's grid."""
        if not (self.args.overrides or self.changed_prior_rows) or key["row"] in self.changed_prior_rows:
            return None
        ignored = PRIOR_ONLY_FIELDS if cfg.prior == "none" else HANDOVER_ONLY_FIELDS if cfg.switch == "never" else set()
        if cfg.ratio == 1 or cfg.max_steps == 0:  # on all the data every subset rule is the uniform draw
            ignored = ignored | FULL_DATA_IGNORED_FIELDS
        sources = [self.same_recipe_results] if self.changed_prior_rows else []
        if set(self.args.overrides) <= ignored:
            sources.append(self.base_results)
        for source in sources:
            if source.is_file() and (found := ResultsFile(source).find(**key)):
                return {**found, "imported_from": shown(source)}
        return None

    def out(self, name: str) -> str:
        return str(self.runs_dir / name)

    # --- reference runs ------------------------------------------------------------------
    def untrained(self, seed: int) -> dict:
        """Row 0: the learner as initialised with this seed (no step taken), evaluated like the others."""
        return self.run(FLOOR, 0.0, seed, self.base(prior="none", ratio=1.0, epochs=1, max_steps=0, seed=seed,
                                                    out=self.out(f"untrained-s{seed}")), "none")

    def byol_row(self, epochs: int) -> str:
        return "byol-full" if epochs == self.args.full_epochs else f"byol-{epochs}ep"

    def byol_full_config(self, seed: int, epochs: int) -> TrainConfig:
        out = self.out(f"{self.byol_row(epochs)}-s{seed}")
        return self.base(prior="none", ratio=1.0, epochs=epochs, seed=seed, out=out)

    def byol_full(self, seed: int, epochs: int | None = None) -> dict:
        e = epochs or self.args.full_epochs
        row = self.byol_row(e)
        key = dict(row=row, budget=e / self.args.full_epochs, seed=seed)
        if not self.results.find(**key) and (imported := self.converged_byol(e, seed)):
            self.results.add({**key, "prior": "none", **imported, **_costs(imported)})
        return self.run(row, e / self.args.full_epochs, seed, self.byol_full_config(seed, e), "none")

    def byol_full_model(self, seed: int) -> str:
        """Row 6's prior: the BYOL-full model of ``seed``. When its result was imported from
        byol_convergence.py, whose runs folder may not be on this machine, it is trained here with the same
        configuration and seed (on another CPU its accuracy may differ by about a point: the log shows both)."""
        self.byol_full(seed)
        cfg = self.byol_full_config(seed, self.args.full_epochs)
        if not (Path(cfg.out) / "backbone.pt").is_file():
            print(f"[table1] training BYOL-full seed {seed} as row 6's prior (its result was imported)", flush=True)
            again = train_and_evaluate(cfg)
            recorded = self.results.find(row="byol-full", budget=1.0, seed=seed)
            print(f"[table1] BYOL-full seed {seed} again: k-NN {again['knn_top1']}, linear {again['linear_top1']} "
                  f"(recorded: {recorded['knn_top1']}, {recorded['linear_top1']})", flush=True)
        return cfg.out

    def converged_byol(self, epochs: int, seed: int) -> dict | None:
        """The same BYOL run from benchmarks/byol_convergence.py's results, if it ran this configuration.
        A run recorded before FLOPs were: images seen x the method's FLOPs per image, counted on this
        configuration's networks (BYOL on all data has one phase, so that is what training would record)."""
        a = self.args
        if a.holdout or a.train_limit or a.overrides or not a.byol_results.is_file():
            return None
        other = ResultsFile(a.byol_results)
        if (other.meta.get("backbone"), other.meta.get("batch_size")) != (a.backbone, a.batch_size):
            return None
        found = other.find(epochs=epochs, seed=seed)
        if found is None:
            return None
        imported = {k: found.get(k) for k in RECORDED if k in found} | {"imported_from": shown(a.byol_results)}
        if imported.get("train_flops") is None:
            per_image = count_step_flops(self.byol_full_config(seed, epochs))["method"]
            imported |= {"train_flops": imported["images_seen"] * per_image, "bank_flops": None}
        return imported

    def other_dataset_prior(self, dataset: str, epochs: int, batch_size: int) -> str:
        """A free prior: BYOL trained on another dataset (its cost is not ReLA's: someone else paid it)."""
        # keyed by epochs, so resume=True never extends a shorter prior into a longer one
        out = self.runs_dir / f"prior-{dataset}-byol-e{epochs}"
        if not (out / "backbone.pt").is_file():
            print(f"[table1] training the {dataset} BYOL prior", flush=True)
            train(config(dataset=dataset, backbone=self.args.backbone, method="byol", epochs=epochs, resume=True,
                         batch_size=batch_size, probe_every=0, progress=False, seed=0, out=str(out)))
        return f"checkpoint:{out}"

    # --- the grid ------------------------------------------------------------------------
    def cell(self, row: str, budget: float, seed: int) -> None:
        name = f"{row}-b{budget}-s{seed}"
        if row == "byol-subset":
            cfg = self.base(prior="none", ratio=budget, epochs=self.args.full_epochs, seed=seed, out=self.out(name))
            return self.run(row, budget, seed, cfg, "none")
        if row == "byol-fewer-steps":
            steps = round(budget * self.full_steps)
            cfg = self.base(prior="none", ratio=1.0, epochs=math.ceil(budget * self.args.full_epochs),
                            max_steps=steps, seed=seed, out=self.out(name))
            return self.run(row, budget, seed, cfg, "none")
        prior = {"rela-random-same": "random", "rela-random-adaptive": "random",
                 "rela-random-other": f"random:{self.args.other_arch}", "distill-only": "random"}.get(row)
        if row == "rela-digits":
            prior = self.other_dataset_prior("digits", self.args.digits_epochs, 128)
        if row == "rela-mnist":
            prior = self.other_dataset_prior("mnist", self.args.mnist_epochs, self.args.batch_size)
        if row == "rela-fmnist-byol":
            prior = f"checkpoint:{self.byol_full_model(0)}"
        switch = {"distill-only": "never", "rela-random-adaptive": "adaptive"}.get(row, self.args.switch)
        cfg = self.base(prior=prior, switch=switch, ratio=budget, epochs=self.args.full_epochs, seed=seed,
                        out=self.out(name))
        label = re.sub(r"checkpoint:.*/", "checkpoint:", prior)
        return self.run(row, budget, seed, cfg, label)

    def run_all(self) -> None:
        for seed in self.args.seeds:  # seed by seed, so a partial grid is already a full table
            self.untrained(seed)
            self.byol_full(seed)
            for budget in self.args.budgets:
                for row in self.args.rows:
                    if seed == self.args.seeds[0] or self.args.all_rows_every_seed or row not in ONE_SEED_ROWS:
                        self.cell(row, budget, seed)
            # is E full? A question for the default recipe on the test split: not for a validation run, nor
            # for a --set grid (BYOL at 2E costs twice a full run; a knob is compared at the same E)
            if not (self.args.holdout or self.args.overrides):
                self.byol_full(seed, 2 * self.args.full_epochs)

    def sweep_switch(self) -> None:
        """Choose the ReLA rows' switch on the holdout split: row 3 with each candidate switch."""
        for seed in self.args.seeds:
            for budget in self.args.budgets:
                for spec in self.args.sweep_switch:
                    name = f"switch-{spec.replace(':', '')}-b{budget}-s{seed}"
                    cfg = self.base(prior="random", switch=spec, ratio=budget, epochs=self.args.full_epochs,
                                    seed=seed, out=self.out(name))
                    self.run(f"switch={spec}", budget, seed, cfg, "random")


# --- report -----------------------------------------------------------------------------

def runs_of(runs: list[dict], row: str, budget: float) -> list[dict]:
    return [r for r in runs if r["row"] == row and math.isclose(r["budget"], budget)]


def accuracy(rs: list[dict]) -> str:
    """k-NN / linear top-1 (%) of some runs, mean ± std."""
    return f"{fmt([r['knn_top1'] for r in rs], 100)} / {fmt([r['linear_top1'] for r in rs], 100)}"


def write_sweep_report(grid: Grid) -> None:
    args, runs = grid.args, grid.results.runs
    lines = [f"# Switch of the ReLA rows, chosen on the last {args.holdout} training images (not the test split)", "",
             grid.results.commands_shown(), "",
             "Row 3 (ReLA, random-init prior), k-NN top-1 / linear top-1 (%) on the holdout split, "
             f"BYOL-full = {args.full_epochs} epochs of {grid.n_train} images.", "",
             *table_head("switch", *(f"{b:.0%} budget" for b in args.budgets))]
    for spec in args.sweep_switch:
        cells = []
        for b in args.budgets:
            rs = runs_of(runs, f"switch={spec}", b)
            cells.append(f"{accuracy(rs)} (switch at {', '.join(str(r['switch_step']) for r in rs)} "
                         f"of {rs[0]['steps']})" if rs else "-")
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    write_report(lines + ["", chosen_switch(runs, args.sweep_switch, args.budgets)],
                 grid.results.path.with_suffix(".md"))


def chosen_switch(runs: list[dict], specs: list[str], budgets: list[float]) -> str:
    """The rule: the highest mean of k-NN and linear top-1 over all budgets and seeds; then its margin over
    ``never`` (distillation only), against the target of >= 0.5 point on both metrics."""
    cells = {(spec, b): runs_of(runs, f"switch={spec}", b) for spec in specs for b in budgets}
    if not all(cells.values()):
        return "Chosen: not yet (a switch has not run at every budget)."
    rows = {spec: [r for b in budgets for r in cells[spec, b]] for spec in specs}
    mean = {spec: {m: sum(r[m] for r in rs) / len(rs) for m in ("knn_top1", "linear_top1")} for spec, rs in rows.items()}
    best = max(specs, key=lambda spec: mean[spec]["knn_top1"] + mean[spec]["linear_top1"])
    line = (f"Chosen: **{best}** (the highest mean of k-NN and linear top-1: "
            f"{50 * (mean[best]['knn_top1'] + mean[best]['linear_top1']):.2f}).")
    if "never" in mean and best != "never":
        gain = [100 * (mean[best][m] - mean["never"][m]) for m in ("knn_top1", "linear_top1")]
        verdict = "meets" if min(gain) >= 0.5 else "misses"
        line += (f" Over distillation only (never): {gain[0]:+.2f} k-NN / {gain[1]:+.2f} linear; {verdict} the "
                 "target of >= 0.5 on both.")
    elif best == "never":
        line += " No hand-over beats distillation only here: at this scale the hand-over buys nothing."
    return line


def summarise(runs: list[dict], budgets: list[float]) -> dict:
    def cell(row, budget):
        rs = runs_of(runs, row, budget)
        return {"n": len(rs), "runs": rs,
                **{k: mean_std([r.get(k) for r in rs]) for k in ("knn_top1", "linear_top1", "cost_seconds", "cost_flops")}}
    table = {row: {b: cell(row, b) for b in budgets} for row in ROWS}
    return {"table": table, "full": cell("byol-full", 1.0), "floor": cell(FLOOR, 0.0)}


def budgets_of(runs: list[dict]) -> list[float]:
    """The budgets the grid's rows ran at (what --budgets was)."""
    return sorted({r["budget"] for r in runs if r["row"] in ROWS})


def headroom(summary: dict, cell: dict, metric: str) -> float | None:
    """(acc - floor) / (BYOL-full - floor): the share of what full training adds over no training."""
    floor, full = summary["floor"], summary["full"]
    if not (floor["n"] and full["n"] and cell["n"]) or full[metric][0] == floor[metric][0]:
        return None
    return (cell[metric][0] - floor[metric][0]) / (full[metric][0] - floor[metric][0])


def cost_ratio(summary: dict, cell: dict, kind: str) -> float | None:
    """A cell's mean cost relative to BYOL-full's, in FLOPs (kind "flops") or wall-clock seconds ("seconds")."""
    mine, full = cell[f"cost_{kind}"][0], summary["full"][f"cost_{kind}"][0]
    return None if math.isnan(mine) or math.isnan(full) or not full else mine / full


HANDOVER_TARGET = 0.005  # issue 13: the switch should beat distillation only by >= 0.5 points on both metrics


def paired_gains(runs: list[dict], others: list[dict]) -> list[tuple[float, float, list[float]]]:
    """Per metric: (mean, std, the differences) of runs - others over the seeds both have; [] when none."""
    mine, theirs = ({r["seed"]: r for r in rs} for rs in (runs, others))
    seeds = sorted(mine.keys() & theirs.keys())
    if not seeds:
        return []
    out = []
    for metric, _ in METRICS:
        d = [mine[s][metric] - theirs[s][metric] for s in seeds]
        out.append((*mean_std(d), d))
    return out


def _seeds(n: int) -> str:
    return f"{n} seed" + ("s" if n != 1 else "")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def reaches_full(summary: dict, cell: dict) -> bool:
    """Within BYOL-full's mean - std on both metrics."""
    full = summary["full"]
    return bool(full["n"] and cell["n"]) and all(cell[m][0] >= full[m][0] - full[m][1] for m, _ in METRICS)


def headline(summary: dict, budgets: list[float]) -> list[str]:
    """What the grid says, computed: where ReLA reaches BYOL-full, the switch, the headroom at the smallest budget."""
    full, floor = summary["full"], summary["floor"]
    if not full["n"]:
        return ["BYOL-full has not run yet."]
    lines = [(f"No training (row 0, the floor): k-NN {100 * floor['knn_top1'][0]:.1f}, linear "
              f"{100 * floor['linear_top1'][0]:.1f}; " if floor["n"] else "")
             + f"BYOL-full: k-NN {100 * full['knn_top1'][0]:.1f} ± {100 * full['knn_top1'][1]:.1f}, linear "
             f"{100 * full['linear_top1'][0]:.1f} ± {100 * full['linear_top1'][1]:.1f} ({_seeds(full['n'])})."]
    for row in (*FREE_PRIOR_ROWS, "rela-fmnist-byol"):
        hit = next(((b, c) for b in sorted(budgets) if reaches_full(summary, c := summary["table"][row][b])), None)
        if hit:
            b, c = hit
            lines.append(f"{ROWS[row]}: reaches BYOL-full accuracy (k-NN {100 * c['knn_top1'][0]:.1f}, linear "
                         f"{100 * c['linear_top1'][0]:.1f}; {_seeds(c['n'])}) at {b:.0%} of its steps, for "
                         # FLOPs when counted: wall-clock ratios mix machines and loads when a grid ran in pieces
                         + (f"{_pct(flops)} of its FLOPs." if (flops := cost_ratio(summary, c, 'flops')) is not None
                            else f"{_pct(cost_ratio(summary, c, 'seconds'))} of its wall-clock cost."))
        elif ran := [b for b in budgets if summary["table"][row][b]["n"]]:
            b = max(ran, key=lambda b: sum(summary["table"][row][b][m][0] for m, _ in METRICS))
            c = summary["table"][row][b]
            lines.append(f"{ROWS[row]}: does not reach BYOL-full accuracy within its std at any budget tried "
                         f"(closest: k-NN {100 * c['knn_top1'][0]:.1f}, linear {100 * c['linear_top1'][0]:.1f} at "
                         f"{b:.0%} of its steps, {_pct(cost_ratio(summary, c, 'flops'))} of its FLOPs).")
    for b in budgets:
        chosen, distill = summary["table"]["rela-random-same"][b], summary["table"]["distill-only"][b]
        if gains := paired_gains(chosen["runs"], distill["runs"]):
            n = len(gains[0][2])
            lines.append(f"Hand-over at {b:.0%}: ReLA with the switch minus distillation only, seed by seed "
                         f"({_seeds(n)}): " + ", ".join(f"{label} {100 * m:+.1f}" + (f" ± {100 * s:.1f}" if n > 1 else "")
                                                        for (_, label), (m, s, _) in zip(METRICS, gains)) + " points "
                         + ("(>= " if all(m >= HANDOVER_TARGET for m, *_ in gains) else "(not >= ")
                         + f"{100 * HANDOVER_TARGET:.1f} on both).")
    small = min(budgets)
    for row in ("rela-random-same", "byol-subset"):
        c = summary["table"][row][small]
        if c["n"] and floor["n"]:
            lines.append(f"{ROWS[row]} at {small:.0%}: captures {_pct(headroom(summary, c, 'knn_top1'))} (k-NN) / "
                         f"{_pct(headroom(summary, c, 'linear_top1'))} (linear) of the floor-to-full headroom.")
    return lines


def table_rows(summary: dict, budgets: list[float]) -> list[str]:
    """Accuracy per budget, bold where BYOL-full (mean - std) is reached on both metrics; floor and full below."""
    lines = []
    for row, label in ROWS.items():
        cells = [accuracy(c["runs"]) if (c := summary["table"][row][b])["n"] else "-" for b in budgets]
        cells = [f"**{t}**" if reaches_full(summary, summary["table"][row][b]) else t for t, b in zip(cells, budgets)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name, c in (("0. No training (floor)", summary["floor"]), ("BYOL-full (100%)", summary["full"])):
        if c["n"]:
            lines.append(f"| {name} | {accuracy(c['runs'])} |" + " |" * (len(budgets) - 1))
    return lines


def cost_rows(summary: dict, budgets: list[float]) -> list[str]:
    """Headroom captured and cost per budget: k-NN / linear headroom; FLOPs and wall-clock relative to BYOL-full."""
    lines = []
    for row, label in ROWS.items():
        cells = []
        for b in budgets:
            c = summary["table"][row][b]
            cells.append("-" if not c["n"] else
                         f"{_pct(headroom(summary, c, 'knn_top1'))} / {_pct(headroom(summary, c, 'linear_top1'))}; "
                         f"{_pct(cost_ratio(summary, c, 'flops'))} / {_pct(cost_ratio(summary, c, 'seconds'))}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    full = summary["full"]
    if full["n"]:
        flops = full["cost_flops"][0]
        lines.append(f"| BYOL-full (100%) | 100% / 100%; 100% = {flops / 1e12:.1f} TFLOPs / "
                     f"{full['cost_seconds'][0]:.0f} s |" + " |" * (len(budgets) - 1))
    return lines


def notes(grid: Grid, summary: dict) -> list[str]:
    """Is E full (BYOL at 2E), where the ReLA rows switched, how fast the learner trains."""
    args, runs, full = grid.args, grid.results.runs, summary["full"]
    lines = []
    twice = [r for r in runs if r["row"] == f"byol-{2 * args.full_epochs}ep"]
    if twice and full["n"]:
        gain = 100 * (mean_std([r["knn_top1"] for r in twice])[0] - full["knn_top1"][0])
        gain_l = 100 * (mean_std([r["linear_top1"] for r in twice])[0] - full["linear_top1"][0])
        lines += ["", f"BYOL at 2E = {2 * args.full_epochs} epochs vs E ({len(twice)} / {full['n']} seeds): "
                  f"k-NN {gain:+.2f}, linear {gain_l:+.2f} points (rule for a full E: < 1.0 k-NN and < 0.5 linear)."]
    switches = [r for r in runs if r["row"].startswith("rela-")]
    if switches:
        lines += ["", "Switch steps (ReLA rows): " + ", ".join(
            f"{r['row']}@{r['budget']:.0%}/s{r['seed']}: {r['switch_step'] if r['switch_step'] is not None else 'none'}"
            f" of {r['steps']}" for r in switches)]
    if full["n"]:
        speed = mean_std([r["images_per_second"] for r in full["runs"]])[0]
        lines += ["", f"Learner throughput: BYOL-full trains {args.backbone} at {speed:.0f} images/s "
                  f"({grid.results.meta['threads']} CPU threads; two views + momentum forward per image)."]
    return lines


RECIPE_MARGINS = (("byol-full", "BYOL-full"), ("byol-subset", "BYOL on a subset"), ("distill-only", "distillation only"))


def _points(a: dict, b: dict) -> list[float]:
    """a - b in points, per metric, of two summary cells."""
    return [100 * (a[m][0] - b[m][0]) for m, _ in METRICS]


def _signed(points: list[float]) -> str:
    return " / ".join(f"{d:+.1f}" for d in points)


def recipe_margins(before: dict, after: dict, budgets: list[float]):
    """(budget, row, ReLA - row under the default recipe, ... under the other) in points, per metric, for
    each row of RECIPE_MARGINS that ran under both recipes (summaries of summarise(); BYOL-full has one budget)."""
    def cells_of(row: str, b: float) -> tuple[dict, dict]:
        return (before["full"], after["full"]) if row == "byol-full" else (before["table"][row][b], after["table"][row][b])

    for b in budgets:
        rela = cells_of("rela-random-same", b)
        for row, _ in RECIPE_MARGINS:
            other = cells_of(row, b)
            if all(c["n"] for c in (*rela, *other)):
                yield b, row, _points(rela[0], other[0]), _points(rela[1], other[1])


def summarise_both(base_runs: list[dict], runs: list[dict]) -> tuple[dict, dict, list[float]]:
    """The default recipe's and another recipe's summaries, on the budgets both ran and, cell by cell (row and
    budget), on the seeds both ran there: the default may have run more seeds than a knob, and a mean over
    other seeds would mix seed-to-seed spread into the knob's effect."""
    def cell(r: dict) -> tuple:
        return r["row"], round(r["budget"], 6)

    ran = ({}, {})  # per recipe: cell -> the seeds it ran there
    for cells, rs in zip(ran, (base_runs, runs)):
        for r in rs:
            cells.setdefault(cell(r), set()).add(r["seed"])

    def both(r: dict) -> bool:
        return r["seed"] in ran[0].get(cell(r), set()) & ran[1].get(cell(r), set())

    base_runs, runs = [r for r in base_runs if both(r)], [r for r in runs if both(r)]
    budgets = [b for b in budgets_of(runs) if any(math.isclose(b, c) for c in budgets_of(base_runs))]
    return summarise(base_runs, budgets), summarise(runs, budgets), budgets


def knob_summary(base_runs: list[dict], recipes: list[tuple[str, list[dict]]]) -> list[str]:
    """One line per --set recipe and budget: ReLA (row 3) and its margins over distillation only and over
    BYOL on a subset, default recipe -> that recipe, on the seeds both ran (the investigations of the
    hand-over, on the holdout)."""
    lines = ["k-NN(200) / linear top-1 (%, mean ± std over the seeds both recipes ran) and margins (points), "
             "default recipe -> the recipe named.", "",
             *table_head("recipe (--set)", "budget", "seeds", "ReLA (row 3)", "ReLA - distillation only",
                         "ReLA - BYOL on a subset")]
    for label, runs in recipes:
        before, after, budgets = summarise_both(base_runs, runs)
        margins = {(b, row): (m0, m1) for b, row, m0, m1 in recipe_margins(before, after, budgets)}
        for b in budgets:
            rela = before["table"]["rela-random-same"][b], after["table"]["rela-random-same"][b]
            if not all(c["n"] for c in rela):
                continue
            shown_margins = [f"{_signed(margins[b, row][0])} -> {_signed(margins[b, row][1])}" if (b, row) in margins
                             else "-" for row in ("distill-only", "byol-subset")]
            lines.append(f"| {label} | {b:.0%} | {rela[1]['n']} | "
                         f"{accuracy(rela[0]['runs'])} -> {accuracy(rela[1]['runs'])} | " + " | ".join(shown_margins) + " |")
    return lines


def recipe_comparison(base_runs: list[dict], runs: list[dict], label: str) -> list[str]:
    """A --set recipe against the default one: each cell that ran under both, then ReLA's margins.

    A knob that helps ReLA is only worth adopting if it helps ReLA more than the rows ReLA is measured
    against, so the verdict counts the margins (ReLA - BYOL-full, ReLA - BYOL on a subset, ReLA -
    distillation only, per budget and metric) that grew under the new recipe. Both on the seeds both ran.
    """
    before, after, budgets = summarise_both(base_runs, runs)
    cells = [("BYOL-full (100%)", before["full"], after["full"]), ("0. No training (floor)", before["floor"], after["floor"])]
    cells += [(f"{ROWS[row]}, {b:.0%}", before["table"][row][b], after["table"][row][b]) for b in budgets for row in ROWS]
    lines = ["k-NN(200) / linear top-1 (%); change in points.", "",
             *table_head("cell", "default recipe", label, "change")]
    lines += [f"| {name} | {accuracy(x['runs'])} | {accuracy(y['runs'])} | "
              + " / ".join(f"{d:+.1f}" for d in _points(y, x)) + " |" for name, x, y in cells if x["n"] and y["n"]]
    margins = []
    grew = total = 0
    for b, row, m0, m1 in recipe_margins(before, after, budgets):
        change = [y - x for x, y in zip(m0, m1)]
        grew, total = grew + sum(d > 0 for d in change), total + len(change)
        margins.append(f"| over {dict(RECIPE_MARGINS)[row]}, {b:.0%} | "
                       + " | ".join(_signed(m) for m in (m0, m1, change)) + " |")
    if total:  # none where row 3 did not run under both recipes (a grid of another row)
        lines += ["", "ReLA (row 3) minus each row it is compared with, under each recipe (points, k-NN / linear):",
                  "", *table_head("margin", "default recipe", label, "change"), *margins,
                  "", f"{grew} of {total} margins grew under {label}: "
                  + ("it helps ReLA more than the rows it is compared with." if grew == total else
                     "it does not help ReLA more than the rows it is compared with on every budget and metric.")]
    return lines


def recipe_label(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))


def write_table(grid: Grid) -> None:
    args = grid.args
    # every budget the file holds, not only this command's --budgets: a grid extended by a later command
    # (one more budget, more seeds) is reported whole
    budgets = budgets_of(grid.results.runs) or args.budgets
    summary = summarise(grid.results.runs, budgets)
    seeds = sorted({r["seed"] for r in grid.results.runs})
    lines = [f"# Table 1 in miniature: Fashion-MNIST, {args.backbone}, BYOL-full = {args.full_epochs} epochs "
             f"({grid.full_steps} steps), batch {args.batch_size}, seeds {seeds}"
             + (f", VALIDATION on the last {args.holdout} training images" if args.holdout else ""), "",
             grid.results.commands_shown(), "",
             "k-NN(200) top-1 / linear top-1 (%, mean ± std over seeds; one number: one seed). "
             "**Bold**: within BYOL-full's mean - std on both metrics.", "",
             *table_head("row", *(f"{b:.0%} budget" for b in budgets)), *table_rows(summary, budgets), "",
             "Headroom captured, (acc - floor) / (BYOL-full - floor), k-NN / linear; then cost relative to BYOL-full: "
             "FLOPs (forward + backward of every network, bank extraction included) / wall-clock seconds. "
             "Wall-clock is that of the machine and load each run met (a grid that runs in pieces meets several): "
             "compare FLOPs; each run's images/s is in the JSON.", "",
             *table_head("row", *(f"{b:.0%} budget" for b in budgets)), *cost_rows(summary, budgets),
             *notes(grid, summary),
             "", "## Headline (computed)", "", *[f"- {h}" for h in headline(summary, budgets)]]
    if args.overrides and (default := grid.default_recipe_results).is_file():
        lines += ["", f"## Against the default recipe ({default.name})", "",
                  *recipe_comparison(load_json(default)["runs"], grid.results.runs, recipe_label(args.overrides))]
    write_report(lines, grid.results.path.with_suffix(".md"))
    plot_cost(grid, summary)
    plot_byol_curve(grid)


def plot_cost(grid: Grid, summary: dict) -> None:
    """Accuracy against FLOPs relative to BYOL-full's (raw FLOPs while it has none), one line per row;
    BYOL-full's mean ± std as a band and as a star at 100 %, the floor as a line."""
    plt = pyplot()
    full, floor = summary["full"], summary["floor"]
    unit = full["cost_flops"][0] if full["n"] and not math.isnan(full["cost_flops"][0]) else None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (metric, name) in zip(axes, METRICS):
        if full["n"]:
            m, s = full[metric]
            ax.axhspan(100 * (m - s), 100 * (m + s), color="grey", alpha=0.3, label="BYOL-full (mean ± std)")
            if unit:
                ax.errorbar([1.0], [100 * m], yerr=[100 * s], marker="*", ms=12, color="black", capsize=3,
                            ls="none", label="BYOL-full (100%)")
        if floor["n"]:
            ax.axhline(100 * floor[metric][0], color="black", ls="--", lw=1, label="0. No training (floor)")
        for row, label in ROWS.items():
            pts = [(c["cost_flops"][0] / (unit or 1.0), 100 * c[metric][0], 100 * c[metric][1])
                   for c in summary["table"][row].values() if c["n"] and not math.isnan(c["cost_flops"][0])]
            if pts:
                xs, ys, es = zip(*sorted(pts))
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # labels on every minor tick overlap
        if unit:
            ax.set_xticks([0.05, 0.1, 0.2, 0.3, 0.5, 1.0], ["5%", "10%", "20%", "30%", "50%", "100%"])
            ax.set_xlabel("cost relative to BYOL-full: FLOPs of training + bank extraction")
        else:
            ax.set_xlabel("cost: FLOPs of training + bank extraction")
        ax.set_ylabel(f"{name} top-1 (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Fashion-MNIST: accuracy vs. cost")
    fig.tight_layout()
    fig.savefig(f"{grid.results.path.with_suffix('')}_cost.png", dpi=120)
    plt.close(fig)


def plot_byol_curve(grid: Grid) -> None:
    """BYOL on all data against epochs: the runs of row 2 (fractions of E), E and 2E."""
    pts = sorted((r["images_seen"] / grid.n_train, r["knn_top1"], r["linear_top1"]) for r in grid.results.runs
                 if r["row"] in (FLOOR, "byol-fewer-steps", "byol-full", f"byol-{2 * grid.args.full_epochs}ep"))
    if not pts:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o", label="k-NN")
    ax.plot([p[0] for p in pts], [100 * p[2] for p in pts], "s", label="linear")
    ax.axvline(grid.args.full_epochs, color="grey", ls=":", label="E (full)")
    ax.set_xlabel("epochs of BYOL on all data")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("BYOL accuracy curve (each point a separate run)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{grid.results.path.with_suffix('')}_byol_curve.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    grid = Grid(args)
    if args.sweep_switch:
        if not args.holdout:
            raise SystemExit("benchmarks/table1.py: --sweep-switch chooses a setting, so it needs --holdout N")
        if not args.report_only:
            grid.sweep_switch()
        return write_sweep_report(grid)
    if not args.report_only:
        grid.run_all()
    write_table(grid)


if __name__ == "__main__":
    main()
