"""Every method with and without ReLA (random-init prior) at one reduced budget on Fashion-MNIST.

    .venv/bin/python benchmarks/methods.py                 # default budget, 1 seed
    .venv/bin/python benchmarks/methods.py --seeds 0 1 2   # mean ± std over seeds

Writes methods.json (one object per run; reruns skip finished runs) and methods.md (the table)
under --results; run folders go to --runs-dir. The docs' table (docs/results.md) comes from the committed
methods.json through ``make readme-tables``.
"""

from __future__ import annotations

import argparse
import sys

from common import ResultsFile, add_output_args, config, fmt, run_cell, table_head, write_report
from rela.methods import METHODS

RECORDED = ("knn_top1", "linear_top1", "train_seconds", "bank_seconds", "wall_seconds", "steps", "images_seen",
            "switch_step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--backbone", default="convnet")
    add_output_args(p, runs="bench-methods")
    return p.parse_args(argv)


def run_grid(results: ResultsFile, args) -> None:
    for seed in args.seeds:
        for method in args.methods:
            for prior in ("none", "random"):
                key = dict(method=method, prior=prior, seed=seed, ratio=args.ratio, epochs=args.epochs,
                           backbone=args.backbone)
                out = args.runs_dir / f"{method}-{prior}-r{args.ratio}-e{args.epochs}-s{seed}"
                cfg = config(dataset="fashion-mnist", method=method, prior=prior, ratio=args.ratio,
                                  epochs=args.epochs, seed=seed, backbone=args.backbone, out=str(out),
                                  progress=False, probe_every=0)
                run_cell(results, key, cfg, RECORDED, f"[methods] {method} prior={prior} seed={seed} -> {out}")


def table_lines(runs: list[dict]) -> list[str]:
    """The markdown table: one line per method, without and with ReLA."""
    lines = table_head("method", "k-NN top-1 (none)", "k-NN top-1 (ReLA)", "linear top-1 (none)",
                       "linear top-1 (ReLA)", "train s (none)", "train s (ReLA)", "bank s (ReLA)", "switch step")
    for method in dict.fromkeys(r["method"] for r in runs):
        base = [r for r in runs if r["method"] == method and r["prior"] == "none"]
        rela = [r for r in runs if r["method"] == method and r["prior"] == "random"]
        lines.append(
            f"| {method} | {fmt([r['knn_top1'] for r in base], 100)} | {fmt([r['knn_top1'] for r in rela], 100)} "
            f"| {fmt([r['linear_top1'] for r in base], 100)} | {fmt([r['linear_top1'] for r in rela], 100)} "
            f"| {fmt([r['train_seconds'] for r in base], 1, 0)} | {fmt([r['train_seconds'] for r in rela], 1, 0)} "
            f"| {fmt([r['bank_seconds'] for r in rela], 1, 0)} "
            f"| {', '.join(str(r['switch_step']) if r['switch_step'] is not None else 'none' for r in rela)} |")
    return lines


def write_table(runs: list[dict], path, args) -> None:
    intro = (f"Fashion-MNIST, {args.backbone}, budget {args.epochs} epochs x ratio {args.ratio} "
             f"(seeds: {sorted({r['seed'] for r in runs})}). ReLA = random-init prior, adaptive switch. "
             "bank s: seconds to extract the prior's bank (one bank serves every method; '-' where a run "
             "found it cached from before extraction times were recorded).")
    write_report([intro, "", *table_lines(runs)], path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = ResultsFile(args.results / "methods.json", meta={"ratio": args.ratio, "epochs": args.epochs,
                                                               "backbone": args.backbone, "dataset": "fashion-mnist"},
                          command=None)
    run_grid(results, args)
    write_table(results.runs, results.path.with_suffix(".md"), args)


if __name__ == "__main__":
    main(sys.argv[1:])
