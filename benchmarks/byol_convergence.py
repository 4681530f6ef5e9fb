"""Is BYOL-full full? Choose Table 1's E by the rule of issue 13, from measured runs.

    .venv/bin/python benchmarks/byol_convergence.py             # curve, then 3 seeds at E and 2E
    .venv/bin/python benchmarks/byol_convergence.py --report-only

1. The curve: BYOL on all 60k Fashion-MNIST training images for 4, 8, 16 and 32 epochs, seed 0,
   each run with its own warm-up + cosine schedule over its own steps (a shorter run is not a
   prefix of a longer one).
2. E = the smallest epoch count e of the curve whose doubling adds < 1.0 k-NN(200) and < 0.5
   linear points (seed 0).
3. Seeds 1 and 2 at E and 2E, so the rule is checked on 3-seed means.

Every finished run is stored in benchmarks/results/byol_convergence.json and skipped on a rerun,
so the script resumes where it stopped. Evaluation: the test split, k-NN (k = 200 and 20) and a
50-epoch linear probe on frozen features, exactly as in Table 1.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from common import RESULTS, RUNS, ResultsFile, command, fmt, mean_std, run_cell, write_report
from rela.config import TrainConfig

KNN_GAIN, LINEAR_GAIN = 1.0, 0.5  # points that doubling E may add, at most, for E to count as "full"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, nargs="+", default=[4, 8, 16, 32], help="the curve (seed 0)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds at the chosen E and 2E")
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--runs-dir", default=str(RUNS / "byol_convergence"))
    p.add_argument("--results", default=str(RESULTS / "byol_convergence.json"))
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def run(results: ResultsFile, args, epochs: int, seed: int) -> dict:
    cfg = TrainConfig(dataset="fashion-mnist", backbone=args.backbone, method="byol", prior="none", ratio=1.0,
                      epochs=epochs, batch_size=args.batch_size, seed=seed, probe_every=0, progress=False,
                      out=str(Path(args.runs_dir) / f"byol-{epochs}ep-s{seed}"))
    return run_cell(results, {"epochs": epochs, "seed": seed}, cfg, (
        "knn_top1", "knn20_top1", "linear_top1", "train_seconds", "wall_seconds", "steps", "images_seen", "train_flops"),
        f"[byol_convergence] BYOL {epochs} epochs, seed {seed}")


def by_epochs(results: ResultsFile, seeds=None) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in results.runs:
        if seeds is None or r["seed"] in seeds:
            out.setdefault(r["epochs"], []).append(r)
    return dict(sorted(out.items()))


def gain(runs: dict[int, list[dict]], e: int, metric: str) -> float | None:
    if e not in runs or 2 * e not in runs:
        return None
    return 100 * (mean_std([r[metric] for r in runs[2 * e]])[0] - mean_std([r[metric] for r in runs[e]])[0])


def gain_se(runs: dict[int, list[dict]], e: int, metric: str) -> float | None:
    """Standard error of gain(), in points: sqrt(s_E^2/n_E + s_2E^2/n_2E); None while a side has one seed."""
    sides = [[r[metric] for r in runs.get(k, [])] for k in (e, 2 * e)]
    if min(len(v) for v in sides) < 2:
        return None
    return 100 * math.sqrt(sum(mean_std(v)[1] ** 2 / len(v) for v in sides))


def choose_e(runs: dict[int, list[dict]]) -> int | None:
    """The smallest e whose doubling adds < KNN_GAIN k-NN and < LINEAR_GAIN linear points."""
    for e in runs:
        g_knn, g_lin = gain(runs, e, "knn_top1"), gain(runs, e, "linear_top1")
        if g_knn is not None and g_knn < KNN_GAIN and g_lin < LINEAR_GAIN:
            return e
    return None


def table_lines(results: ResultsFile, seeds=(0, 1, 2)) -> list[str]:
    """The curve and the chosen E, as markdown (the report's body and the docs' block)."""
    curve = by_epochs(results, seeds={0})
    chosen = choose_e(curve)
    lines = ["| epochs | steps | seeds | k-NN(200) top-1 | k-NN(20) top-1 | linear top-1 | 2e - e: k-NN / linear (seed 0) | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for e, rs in by_epochs(results).items():
        g_knn, g_lin = gain(curve, e, "knn_top1"), gain(curve, e, "linear_top1")
        doubling = f"{g_knn:+.2f} / {g_lin:+.2f}" if g_knn is not None else "-"
        lines.append(f"| {e} | {rs[0]['steps']} | {len(rs)} | {fmt([r['knn_top1'] for r in rs], 100, 2)} | "
                     f"{fmt([r['knn20_top1'] for r in rs], 100, 2)} | {fmt([r['linear_top1'] for r in rs], 100, 2)} | "
                     f"{doubling} | {fmt([r['train_seconds'] for r in rs], 1, 0)} |")
    lines.append("")
    if chosen is None:
        lines.append("No E of the curve meets the rule yet (or the curve is incomplete).")
    else:
        full = by_epochs(results, seeds=set(seeds))
        g3 = (gain(full, chosen, "knn_top1"), gain(full, chosen, "linear_top1"))
        lines.append(f"Chosen: E = {chosen} epochs (seed 0: doubling adds {gain(curve, chosen, 'knn_top1'):+.2f} k-NN, "
                     f"{gain(curve, chosen, 'linear_top1'):+.2f} linear).")
        seeds_e, seeds_2e = (sorted({r["seed"] for r in full.get(e, [])}) for e in (chosen, 2 * chosen))
        if g3[0] is not None and max(len(seeds_e), len(seeds_2e)) > 1:
            verdict = "meets" if g3[0] < KNN_GAIN and g3[1] < LINEAR_GAIN else "misses"
            se = (gain_se(full, chosen, "knn_top1"), gain_se(full, chosen, "linear_top1"))
            pm = [f" ± {s:.2f}" if s is not None else "" for s in se]
            lines.append(f"On the mean of seeds {seeds_e} at E and {seeds_2e} at 2E: 2E - E = {g3[0]:+.2f}{pm[0]} k-NN, "
                         f"{g3[1]:+.2f}{pm[1]} linear ({verdict} the rule"
                         + ("" if seeds_e == seeds_2e == sorted(seeds) else "; not every seed has run") + ").")
            over = [f"{name} by {g - limit:.2f} points ({(g - limit) / s:.1f} standard errors)"
                    for name, g, limit, s in (("k-NN", g3[0], KNN_GAIN, se[0]), ("linear", g3[1], LINEAR_GAIN, se[1]))
                    if g >= limit and s]
            if over:
                lines.append("± is one standard error of the difference of means; the gain exceeds the rule's limit: "
                             + ", ".join(over) + ".")
    return lines


def report(results: ResultsFile, args) -> int | None:
    lines = ["# Is BYOL-full full? Fashion-MNIST, BYOL on all 60k training images, test split", "",
             results.commands_shown(), "",
             f"Rule: E = the smallest e whose doubling adds < {KNN_GAIN} k-NN(200) and < {LINEAR_GAIN} linear points "
             "(seed 0); then seeds 1-2 at E and 2E.", "", *table_lines(results, args.seeds)]
    write_report(lines, results.path.with_suffix(".md"))
    return choose_e(by_epochs(results, seeds={0}))


def main(argv=None) -> None:
    args = parse_args(argv)
    results = ResultsFile(args.results, meta={"backbone": args.backbone, "batch_size": args.batch_size,
                                              "dataset": "fashion-mnist", "method": "byol"},
                          command=None if args.report_only else
                          command(__file__, argv or sys.argv[1:]))
    if not args.report_only:
        for e in args.epochs:
            run(results, args, e, 0)
            report(results, args)
        chosen = choose_e(by_epochs(results, seeds={0}))
        if chosen is not None:
            for seed in args.seeds:
                for e in (chosen, 2 * chosen):
                    run(results, args, e, seed)
                    report(results, args)
    report(results, args)


if __name__ == "__main__":
    main()
