"""Fidelity to the authors' reference code: rela's defaults, the `authors` preset, and each deviation alone.

    python benchmarks/fidelity.py                  # 10 rows x 3 seeds (about 1 hour on 2 CPU cores)
    python benchmarks/fidelity.py --seeds 0        # one seed first; rerun later to add seeds
    python benchmarks/fidelity.py --report-only    # the table from what has run

The cell is the 20% budget of Table 1 (benchmarks/table1.py): Fashion-MNIST, convnet learner, batch 256,
BYOL + ReLA with a random prior, a fresh 20% of the images in each of E = 4 epochs (184 optimizer steps).
Rows: ``defaults`` (rela's TrainConfig defaults, switch BENCH_SWITCH unless --switch), ``authors`` (rela/presets/authors.yaml, every deviation at
once) and one row per deviation switched on alone over the defaults (DEVIATIONS: which preset fields
it sets). Every run is evaluated on the test split (k-NN 200 and 20, linear probe); finished runs are kept
in fidelity.json and skipped, so the grid runs in pieces. Writes fidelity.json / .md under --results
(fidelity_<switch>.* with --switch, e.g. fidelity_constant0.75.*; fidelity_val<N>.* with --holdout N;
fidelity_e<E>_... off the 4-epoch cell, e.g. fidelity_e32_soft-plateau_val10000.*).

With the benchmarks' (common.BENCH_SWITCH) and the authors' adaptive switch nothing hands over within 184 steps (see the Table 1 notes), so
the rows that change only the base method's phase (constant-momentum, byol-hidden-256, switch-aug-next-epoch)
can differ from `defaults` only by noise; ``--switch constant:0.75`` (Table 1's switch) measures them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import (BENCH_SWITCH, ResultsFile, add_output_args, command, config, fmt, mean_std, run_cell, shown,
                    table_head, write_report)
from rela.config import TrainConfig
from rela.registry import PRESETS

# deviation row -> the preset fields that make it (together they are every field the preset changes over the
# benchmark's defaults, whose switch is BENCH_SWITCH: the authors' adaptive rule, so not a deviation here)
DEVIATIONS = {
    "frozen-head": ("transfer_head",),
    "learner-init-prior": ("prior",),
    "adamw-1e-3-wd-0.01": ("lr", "weight_decay"),
    "no-warmup-constant-lr": ("warmup", "lr_schedule"),
    "constant-momentum": ("momentum_schedule",),
    "byol-hidden-256": ("hidden_dim",),
    "switch-aug-next-epoch": ("switch_aug_at",),
    "bank-float32": ("bank_dtype",),
}
ROWS = ("defaults", "authors", *DEVIATIONS)
RECORDED = ("knn_top1", "knn20_top1", "linear_top1", "steps", "switch_step", "train_seconds", "bank_seconds",
            "target_dim", "target_explained_variance")
# The authors' code ported to CPU on this cell (issue 16; 3 seeds, rela's evaluator): k-NN200, k-NN20, linear
PORT = {"authors' ReLA, random prior (port)": (77.8, 82.0, 84.4),
        "authors' ReLA, transfer head trainable (port)": (80.3, 84.2, 85.9)}


def cell_parser(script: str, doc: str) -> argparse.ArgumentParser:
    """The options of the cell both fidelity.py and conditioning.py train: epochs, batch, switch, outputs, limits."""
    p = argparse.ArgumentParser(prog=f"benchmarks/{script}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4, help="E, the epochs of BYOL-full")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--switch", default=None, help="switch of every run (default: BENCH_SWITCH, adaptive, the "
                                                   "authors' rule, which the committed results used)")
    add_output_args(p, runs=Path(script).stem)
    p.add_argument("--train-limit", type=int, default=None, help="smoke tests: use only the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="smoke tests: evaluate on the first N test images")
    p.add_argument("--report-only", action="store_true")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None):
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def parse_args(argv: list[str] | None = None):
    p = cell_parser("fidelity.py", __doc__)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ratio", type=float, default=0.2, help="the budget: share of the images drawn per epoch")
    p.add_argument("--holdout", type=int, default=None, help="validation mode: evaluate on the last N train images")
    return parse(p, argv)


def preset_fields() -> dict:
    return PRESETS.create("authors")


def row_fields(row: str, switch: str | None = None) -> dict:
    """The TrainConfig fields a row sets over the defaults (the prior is the defaults' random one). A pass with
    --switch runs every row with that switch, the authors' row included, so its fields say so."""
    preset = preset_fields()
    if row == "defaults":
        return {}
    if row == "authors":
        return preset | ({"switch": switch} if switch else {})
    return {name: preset[name] for name in DEVIATIONS[row]}


def cell_config(args, out: Path, seed: int, *, ratio: float, holdout: int | None, **fields) -> TrainConfig:
    """A Table 1 cell (budget ``ratio`` of ``args.epochs`` epochs, ReLA + random prior) with ``fields`` over it."""
    switch = {"switch": args.switch} if args.switch else {}
    return config(**{"dataset": "fashion-mnist", "backbone": "convnet", "prior": "random",
                     "batch_size": args.batch_size, "ratio": ratio, "epochs": args.epochs, "holdout": holdout,
                     "train_limit": args.train_limit, "test_limit": args.test_limit, "probe_every": 0,
                     "progress": False, **fields, **switch, "seed": seed, "out": str(out)})


PORT_CELL = {"epochs": 4, "ratio": 0.2, "holdout": None}  # where the authors' code was ported and measured


def suffix(args, holdout: int | None) -> str:
    """What tells a grid's files apart: ``_e<E>`` / ``_r<ratio>`` off the default cell (4 epochs, 20 %),
    ``_<switch>`` for a --switch, ``_val<N>`` on a holdout split."""
    return ((f"_e{args.epochs}" if args.epochs != PORT_CELL["epochs"] else "")
            + (f"_r{args.ratio}" if getattr(args, "ratio", PORT_CELL["ratio"]) != PORT_CELL["ratio"] else "")
            + (f"_{args.switch.replace(':', '')}" if args.switch else "") + (f"_val{holdout}" if holdout else ""))


def results_file(args, script: str, meta: dict, holdout: int | None = None) -> ResultsFile:
    """``NAME<suffix>.json`` of the benchmark ``script``, under --results."""
    return ResultsFile(args.results / f"{Path(script).stem}{suffix(args, holdout)}.json",
                       meta={"dataset": "fashion-mnist", "backbone": "convnet", "batch_size": args.batch_size,
                             "epochs": args.epochs, "train_limit": args.train_limit, "test_limit": args.test_limit,
                             **meta},
                       command=None if args.report_only else command(script, args.argv))


def run_grid(args, results: ResultsFile) -> None:
    for seed in args.seeds:
        for row in args.rows:
            fields = row_fields(row, args.switch)
            cfg = cell_config(args, args.runs_dir / f"{row}-s{seed}{suffix(args, args.holdout)}", seed, ratio=args.ratio, holdout=args.holdout,
                              **fields)
            run_cell(results, {"row": row, "seed": seed}, cfg, RECORDED, f"[fidelity] {row} seed={seed}",
                     extra={"fields": fields, "out": shown(cfg.out)})


def accuracy_cells(runs: list[dict]) -> list[str]:
    return [fmt([r[k] for r in runs], 100) for k in ("knn_top1", "knn20_top1", "linear_top1")]


def delta(runs: list[dict], base: list[dict], key: str) -> str:
    if not runs or not base:
        return "-"
    return f"{100 * (mean_std([r[key] for r in runs])[0] - mean_std([r[key] for r in base])[0]):+.1f}"


def report(args, results: ResultsFile) -> None:
    base = [r for r in results.runs if r["row"] == "defaults"]
    lines = [f"# Fidelity: rela's defaults vs the authors' code, option by option (Fashion-MNIST, convnet, "
             f"{args.ratio:.0%} x {args.epochs} epochs, batch {args.batch_size})"
             + (f", VALIDATION on the last {args.holdout} training images" if args.holdout else ""), "",
             results.commands_shown(), "",
             "Top-1 % (mean ± std over seeds); Δ: the mean's difference from `defaults` in points.", "",
             *table_head("row", "fields over the defaults", "seeds", "k-NN(200)", "k-NN(20)", "linear",
                         "Δ k-NN(200)", "Δ linear", "steps", "switch step")]
    for row in ROWS:
        runs = [r for r in results.runs if r["row"] == row]
        if not runs:
            continue
        fields = ", ".join(f"{k}={v}" for k, v in row_fields(row, args.switch).items()) or "-"
        switch = sorted({str(r["switch_step"]) for r in runs})
        lines.append(f"| {row} | {fields} | {len(runs)} | " + " | ".join(accuracy_cells(runs))
                     + f" | {delta(runs, base, 'knn_top1')} | {delta(runs, base, 'linear_top1')} | "
                     f"{runs[0]['steps']} | {', '.join(switch)} |")
    if (args.epochs, args.ratio, args.holdout) == tuple(PORT_CELL.values()):
        lines += ["", "The authors' code itself, ported to CPU on this cell (issue 16, 3 seeds, rela's evaluator):", "",
                  *table_head("run", "k-NN(200)", "k-NN(20)", "linear"),
                  *[f"| {name} | {a} | {b} | {c} |" for name, (a, b, c) in PORT.items()]]
    write_report(lines, results.path.with_suffix(".md"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = results_file(args, __file__, {"ratio": args.ratio, "switch": args.switch or BENCH_SWITCH,
                                           "preset": preset_fields()},
                           holdout=args.holdout)
    if not args.report_only:
        run_grid(args, results)
    report(args, results)


if __name__ == "__main__":
    main()
