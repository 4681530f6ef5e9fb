"""Does `rela rank-priors` pick the priors that help ReLA most? Score vs. accuracy on Fashion-MNIST.

    nice -n 19 .venv/bin/python benchmarks/prior_ranking.py               # seed 0
    nice -n 19 .venv/bin/python benchmarks/prior_ranking.py --seeds 0 1   # adds seed 1

1. Trains three priors with this project: BYOL on Fashion-MNIST (short), BYOL on
   scikit-learn's digits and a supervised classifier on digits (other data).
2. Candidates: those three and random initialisations of two architectures.
   Scores every candidate with :func:`rela.diagnose.rank_priors` (label-free, no
   training) and, for reference, :func:`rela.diagnose.diagnose` (raw k-NN, class
   spread: they use labels).
3. Short ReLA + BYOL runs on Fashion-MNIST with each candidate (and plain BYOL as a
   baseline), k-NN and linear probe on the test split.
4. Spearman correlation between each score and the final k-NN accuracy.

Writes prior_ranking.json (every step; a rerun skips finished ones) and prior_ranking.md under
--results. Run folders go to --runs-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

from scipy.stats import spearmanr

from common import BANKS, ResultsFile, add_output_args, config, fmt, run_cell, table_head, write_report
from rela.config import TrainConfig
from rela.data import load_dataset
from rela.diagnose import SCORES, build_candidates, diagnose, learner_dim, rank_priors
from rela.train import train

PRIOR_SEED = 1  # random candidates: one fixed initialisation, scored and used in training alike
REFERENCE = ("knn_top1", "class_spread", "explained_variance")  # label-based, from diagnose


def trained_priors(args) -> dict[str, TrainConfig]:
    runs = args.runs_dir
    base = config(backbone=args.backbone, progress=False, probe_every=0, seed=0, resume=True)
    return {
        "byol-fmnist": dataclasses.replace(base, dataset="fashion-mnist", method="byol", epochs=args.prior_epochs,
                                           ratio=args.prior_ratio, out=str(runs / "prior-byol-fmnist")),
        "byol-digits": dataclasses.replace(base, dataset="digits", method="byol", epochs=args.digits_epochs,
                                           out=str(runs / "prior-byol-digits")),
        "supervised-digits": dataclasses.replace(base, dataset="digits", method="supervised",
                                                 epochs=args.digits_epochs, out=str(runs / "prior-supervised-digits")),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--prior-epochs", type=int, default=2, help="BYOL prior on Fashion-MNIST: epochs")
    p.add_argument("--prior-ratio", type=float, default=0.5, help="BYOL prior on Fashion-MNIST: data ratio")
    p.add_argument("--digits-epochs", type=int, default=30)
    p.add_argument("--samples", type=int, default=2048, help="augmented views per prior for the score")
    add_output_args(p, runs="bench-prior-ranking")
    return p.parse_args(argv)


def train_priors(results: ResultsFile, args) -> None:
    """1. priors trained by this project"""
    for name, cfg in trained_priors(args).items():
        if not results.find(kind="prior", name=name):
            print(f"[prior-ranking] training prior {name}", flush=True)
            m = train(cfg)
            results.add({"kind": "prior", "name": name, "out": cfg.out, "dataset": cfg.dataset, "method": cfg.method,
                         "epochs": cfg.epochs, "ratio": cfg.ratio, "train_seconds": m["train_seconds"]})


def score_candidates(results: ResultsFile, args, specs: list[str]) -> None:
    """2. label-free scores and label-based references, no training"""
    train_set, test_set = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    dim = learner_dim(args.backbone, train_set)
    candidates = build_candidates(specs, train_set, backbone=args.backbone, seed=PRIOR_SEED)
    if not results.find(kind="scores"):
        print("[prior-ranking] scoring candidates", flush=True)
        report = rank_priors(candidates, train_set, target_dim=dim, samples=args.samples, progress=False,
                             cache_dir=BANKS)
        results.add({"kind": "scores", **report})
    if not results.find(kind="diagnose"):
        print("[prior-ranking] diagnose", flush=True)
        results.add({"kind": "diagnose", **diagnose(candidates, train_set, test_set, target_dim=dim,
                                                    progress=False, cache_dir=BANKS)})


def train_with_priors(results: ResultsFile, args, specs: list[str], labels: dict[str, str]) -> None:
    """3. short ReLA + BYOL runs"""
    for seed in args.seeds:
        for spec in ["none", *specs]:
            key = dict(kind="rela", spec=spec, seed=seed, ratio=args.ratio, epochs=args.epochs, backbone=args.backbone)
            out = args.runs_dir / f"rela-{labels.get(spec, spec)}-s{seed}"
            cfg = config(dataset="fashion-mnist", method="byol", prior=spec, prior_seed=PRIOR_SEED, ratio=args.ratio,
                         epochs=args.epochs, seed=seed, backbone=args.backbone, out=str(out), progress=False,
                         probe_every=0)
            run_cell(results, key, cfg, ("knn_top1", "linear_top1", "train_seconds", "bank_seconds", "steps",
                                         "switch_step"), f"[prior-ranking] ReLA+BYOL prior={spec} seed={seed} -> {out}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = ResultsFile(args.results / "prior_ranking.json",
                          meta={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "results"})
    train_priors(results, args)
    priors = trained_priors(args)
    specs = ["random", "random:resnet-narrow"] + [f"checkpoint:{cfg.out}" for cfg in priors.values()]
    labels = dict(zip(specs, ["random-convnet", "random-resnet-narrow", *priors]))
    score_candidates(results, args, specs)
    train_with_priors(results, args, specs, labels)
    results.meta["summary"] = summary = correlate(results.runs)
    results.save()
    write_table(results.runs, summary, results.path.with_suffix(".md"), args)


def correlate(runs: list[dict]) -> dict:
    """Spearman rho (and its two-sided p-value) of every score against the mean final k-NN accuracy."""
    scores = {r["spec"]: r for r in next(r for r in runs if r["kind"] == "scores")["priors"]}
    reference = {m["spec"]: m for m in next(r for r in runs if r["kind"] == "diagnose")["models"]}
    acc = {}
    for r in runs:
        if r["kind"] == "rela" and r["spec"] in scores:
            acc.setdefault(r["spec"], []).append(r["knn_top1"])
    specs = sorted(acc)
    y = [statistics.fmean(acc[s]) for s in specs]
    out = {"candidates": len(specs)}
    for name in SCORES:
        rho, pval = spearmanr([scores[s][name] for s in specs], y)
        out[name] = {"rho": float(rho), "p": float(pval)}
    for name in REFERENCE:
        rho, pval = spearmanr([reference[s][name] for s in specs], y)
        out[f"{name} (labels)"] = {"rho": float(rho), "p": float(pval)}
    return out


def write_table(runs: list[dict], summary: dict, path: Path, args) -> None:
    scores = {r["spec"]: r for r in next(r for r in runs if r["kind"] == "scores")["priors"]}
    reference = {m["spec"]: m for m in next(r for r in runs if r["kind"] == "diagnose")["models"]}
    rela = [r for r in runs if r["kind"] == "rela"]
    seeds = sorted({r["seed"] for r in rela})
    lines = [f"Fashion-MNIST, ReLA + BYOL, {args.backbone} learner, budget {args.epochs} epochs x ratio {args.ratio} "
             f"(seeds {seeds}). Scores from `rank_priors` (label-free) and `diagnose` (raw k-NN and class spread "
             "use labels). Command: `nice -n 19 .venv/bin/python benchmarks/prior_ranking.py "
             f"--seeds {' '.join(map(str, seeds))}`.", "",
             *table_head("prior", "stability", "retrieval", "effective rank", "raw k-NN (labels)",
                         "class spread (labels)", "ReLA k-NN top-1", "ReLA linear top-1", "switch step")]
    for spec in dict.fromkeys(r["spec"] for r in rela):
        runs_of = [r for r in rela if r["spec"] == spec]
        s, ref = scores.get(spec), reference.get(spec)
        cells = (f"{s['stability']:.3f} | {s['retrieval']:.3f} | {s['effective_rank']:.1f} | "
                 f"{100 * ref['knn_top1']:.1f} | {ref['class_spread']:.3f}") if s else "- | - | - | - | -"
        lines.append(f"| `{spec}` | {cells} | {fmt([r['knn_top1'] for r in runs_of], 100)} "
                     f"| {fmt([r['linear_top1'] for r in runs_of], 100)} "
                     f"| {', '.join(str(r['switch_step']) for r in runs_of)} |")
    lines += ["", f"Spearman correlation with the ReLA k-NN top-1 over {summary['candidates']} candidates "
                  "(plain BYOL, `none`, is not a candidate; for class spread lower is better, so a useful "
                  "rho is negative):", "", *table_head("score", "rho", "p")]
    lines += [f"| {name} | {v['rho']:.2f} | {v['p']:.2f} |" for name, v in summary.items() if isinstance(v, dict)]
    write_report(lines, path)


if __name__ == "__main__":
    main()
