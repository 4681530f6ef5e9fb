"""The paper's theory experiment (Fig. 2) in miniature: what makes data "efficient" on a bimodal Gaussian mixture.

    nice -n 19 .venv/bin/python benchmarks/theory_gaussian.py            # full run (5 seeds, ~1-2 min, 1 core)
    nice -n 19 .venv/bin/python benchmarks/theory_gaussian.py --quick    # smoke run, writes to runs/

Task. Binary classification of the mixture component c in {0, 1} of
x ~ 0.5 N(-mu, sigma0^2 I) + 0.5 N(+mu, sigma0^2 I) in ``--dim`` dimensions, |mu| = ``--separation``,
sigma0 = 1 (the "original" data). A small MLP (dim -> 32 -> 1, ReLU) is trained with minibatch SGD on
binary cross-entropy. Validation is always on held-out samples of the *original* distribution with their
true component labels, so every setting is scored on the same task.

Two ways of making the training data more "efficient", as in the paper:

(a) modified variance: the training samples are drawn with a smaller (or larger) sigma, labels = component;
(b) re-labelling: the training samples come from the original distribution and, with probability p (the
    intensity), a sample's label is replaced by the Bayes-optimal classifier's decision 1[mu.x > 0]. At
    p = 1 the sample -> target map is a deterministic function (one-to-one); at p = 0 it is the noisy
    original one (points near the boundary carry either label).

For each setting the script records the validation loss every ``--eval-every`` steps, the first step at
which it reaches each ``threshold = Bayes validation loss + margin`` (``--margins``: a loose one for the
early phase, a tight one near convergence; the Bayes loss is computed exactly from the known posterior on
the same validation set), the best and the final loss and the final validation error, each as
mean ± std over ``--seeds``. Within a seed every setting shares the initial weights, the
minibatch order and the underlying random draws (noise vectors, component draws, re-label coin flips), so
the settings differ only in the property under study.

Writes ``theory_gaussian.json`` (config, per-setting numbers, loss curves subsampled), ``.md`` (tables
and the summary sentence) and ``.png`` (two panels: validation loss vs. step, mean ± std) to ``--results``.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import RESULTS, RUNS, mean_std, write_report
from rela.io import atomic_write, save_json
from rela.plotting import pyplot

HIDDEN = 32


def make_mu(dim: int, separation: float) -> torch.Tensor:
    return torch.full((dim,), separation / math.sqrt(dim))


def draw(n: int, dim: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Component labels and standard-normal noise; settings rescale the same draws (paired comparison)."""
    return torch.randint(0, 2, (n,), generator=g).float(), torch.randn(n, dim, generator=g)


def compose(c: torch.Tensor, noise: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    return (2 * c - 1)[:, None] * mu + sigma * noise


def bayes_decision(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    return (x @ mu > 0).float()


def train_curve(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, seed: int,
                args) -> tuple[list[float], float]:
    """Validation BCE every ``eval_every`` steps (step 0 included) and the final validation error."""
    torch.manual_seed(seed)  # same initial weights for every setting of this seed
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 1))
    opt = torch.optim.SGD(net.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(seed + 1)
    curve = []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            with torch.no_grad():
                curve.append(F.binary_cross_entropy_with_logits(net(xv).squeeze(1), yv).item())
        if step == args.steps:
            break
        idx = torch.randint(0, len(y), (args.batch_size,), generator=order)
        loss = F.binary_cross_entropy_with_logits(net(x[idx]).squeeze(1), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        error = ((net(xv).squeeze(1) > 0).float() != yv).float().mean().item()
    return curve, error


def first_step_below(curve: list[float], threshold: float, eval_every: int) -> int | None:
    return next((i * eval_every for i, v in enumerate(curve) if v <= threshold), None)


def crossing(curves: list[list[float]], threshold: float, eval_every: int) -> dict:
    hits = [first_step_below(c, threshold, eval_every) for c in curves]
    reached = [h for h in hits if h is not None]
    # A mean over only the seeds that got there would flatter a setting that mostly never does.
    return {"threshold": threshold, "per_seed": hits, "reached": len(reached),
            "mean_std": list(mean_std(reached)) if len(reached) == len(hits) else None}


def summarise(runs: list[tuple[list[float], float]], thresholds: dict[str, float], args) -> dict:
    curves = torch.tensor([c for c, _ in runs])
    keep = max(1, len(curves[0]) // args.curve_points)  # subsample the curve the JSON carries
    return {
        "steps_to_threshold": {name: crossing(curves.tolist(), t, args.eval_every) for name, t in thresholds.items()},
        "final_loss_mean_std": list(mean_std(curves[:, -1].tolist())),
        "best_loss_mean_std": list(mean_std(curves.min(1).values.tolist())),
        "best_step_mean_std": list(mean_std((curves.argmin(1) * args.eval_every).tolist())),
        "final_error_mean_std": list(mean_std([e for _, e in runs])),
        "curve_steps": list(range(0, args.steps + 1, args.eval_every))[::keep],
        "curve_mean": curves.mean(0)[::keep].tolist(),
        "curve_std": (curves.std(0) if len(curves) > 1 else torch.zeros(curves.shape[1]))[::keep].tolist(),
        "_curves": curves,
    }


def run_grid(args) -> dict:
    mu = make_mu(args.dim, args.separation)
    c_val, n_val = draw(args.val_size, args.dim, torch.Generator().manual_seed(10_000))
    xv, yv = compose(c_val, n_val, mu, 1.0), c_val
    # Exact posterior of the original mixture: logit = 2 mu.x / sigma0^2.
    bayes_loss = F.binary_cross_entropy_with_logits(2 * xv @ mu, yv).item()
    bayes_error = (bayes_decision(xv, mu) != yv).float().mean().item()
    thresholds = {f"bayes+{m:g}": bayes_loss + m for m in args.margins}
    runs = {("sigma", s): [] for s in args.sigmas} | {("p", p): [] for p in args.intensities}
    for seed in args.seeds:
        g = torch.Generator().manual_seed(seed)
        c, noise = draw(args.train_size, args.dim, g)
        coin = torch.rand(args.train_size, generator=g)
        for sigma in args.sigmas:
            runs[("sigma", sigma)].append(train_curve(compose(c, noise, mu, sigma), c, xv, yv, seed, args))
        x = compose(c, noise, mu, 1.0)
        for p in args.intensities:
            if p == 0:  # no re-labelling is exactly the sigma = 1 run of this seed
                runs[("p", p)].append(runs[("sigma", 1.0)][-1])
                continue
            y = torch.where(coin < p, bayes_decision(x, mu), c)
            runs[("p", p)].append(train_curve(x, y, xv, yv, seed, args))
        print(f"[theory] seed {seed} done", flush=True)
    settings = {f"{kind}={value:g}": {"kind": kind, "value": value, **summarise(r, thresholds, args)}
                for (kind, value), r in runs.items()}
    return {"bayes_val_loss": bayes_loss, "bayes_val_error": bayes_error, "thresholds": thresholds,
            "settings": settings}


def verdict(res: dict, args) -> str:
    """Sentences computed from the numbers: do (a) and (b) converge faster, by how much, at what final cost."""
    s = res["settings"]

    def steps(name, kind, value):
        m = s[f"{kind}={value:g}"]["steps_to_threshold"][name]["mean_std"]
        return None if m is None else m[0]

    def speedup(name, kind, slow, fast):
        a, b = steps(name, kind, slow), steps(name, kind, fast)
        return a / b if a is not None and b else None

    def fmt_steps(name, kind, value):
        m = s[f"{kind}={value:g}"]["steps_to_threshold"][name]["mean_std"]
        return "not reached by every seed" if m is None else f"{m[0]:.0f} ± {m[1]:.0f}"

    def monotone(name, kind, values_fast_to_slow):
        means = [steps(name, kind, v) for v in values_fast_to_slow]
        return None not in means and all(a <= b for a, b in zip(means, means[1:]))

    lo, p0, p1 = min(args.sigmas), min(args.intensities), max(args.intensities)
    small = sorted(v for v in args.sigmas if v <= 1.0)
    parts, ok, mono, known = [], True, True, True
    for name, t in res["thresholds"].items():
        r_sigma, r_p = speedup(name, "sigma", 1.0, lo), speedup(name, "p", p0, p1)
        fastest = min((v for v in args.sigmas if steps(name, "sigma", v) is not None),
                      key=lambda v: steps(name, "sigma", v), default=None)
        m_sigma, m_p = monotone(name, "sigma", small), monotone(name, "p", sorted(args.intensities, reverse=True))
        known &= r_sigma is not None and r_p is not None
        ok &= bool(r_sigma and r_sigma > 1 and r_p and r_p > 1)
        mono &= m_sigma and m_p
        parts.append(
            f"Steps to validation BCE <= {t:.3f} ({name}): sigma={lo:g} {fmt_steps(name, 'sigma', lo)} vs sigma=1 "
            f"{fmt_steps(name, 'sigma', 1.0)} ({'x%.2f' % r_sigma if r_sigma else 'no ratio'}; fastest sigma="
            f"{fastest if fastest is None else f'{fastest:g}'}; {'monotone' if m_sigma else 'not monotone'} over "
            f"sigma<=1), p={p1:g} {fmt_steps(name, 'p', p1)} vs p={p0:g} {fmt_steps(name, 'p', p0)} "
            f"({'x%.2f' % r_p if r_p else 'no ratio'}; {'monotone' if m_p else 'not monotone'} over p).")

    def final(kind, value):
        return s[f"{kind}={value:g}"]["final_loss_mean_std"][0]

    parts.append(f"Final loss at step {args.steps}: sigma={lo:g} {final('sigma', lo):.3f} vs sigma=1 "
                 f"{final('sigma', 1.0):.3f}; p={p1:g} {final('p', p1):.3f} vs p={p0:g} {final('p', p0):.3f}.")
    outcome = ("undetermined (a threshold was not reached by every seed; run more --steps)" if not known
               else "reproduced" if ok and mono else "partly reproduced (faster, but not monotone in every sweep)"
               if ok else "not reproduced at every threshold")
    parts.append(f"Qualitative finding (smaller variance and a one-to-one map converge faster): {outcome}.")
    return " ".join(parts)


def plot(res: dict, args, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    steps = torch.arange(0, args.steps + 1, args.eval_every)
    for ax, kind, title in ((axes[0], "sigma", "(a) modified variance of the training samples"),
                            (axes[1], "p", "(b) re-labelled by the Bayes classifier, intensity p")):
        for name, d in res["settings"].items():
            if d["kind"] != kind:
                continue
            curves = d["_curves"]
            m = curves.mean(0)
            s = curves.std(0) if len(curves) > 1 else torch.zeros_like(m)
            line, = ax.plot(steps, m, label=f"{'σ' if kind == 'sigma' else 'p'} = {d['value']:g}")
            ax.fill_between(steps, m - s, m + s, color=line.get_color(), alpha=0.2)
        ax.axhline(res["bayes_val_loss"], color="k", ls=":", lw=1, label="Bayes loss")
        for i, (name, t) in enumerate(res["thresholds"].items()):
            ax.axhline(t, color="grey", ls=("--", "-.", ":")[i % 3], lw=1, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("SGD step")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("validation BCE (original data, true labels)")
    fig.suptitle(f"Bimodal Gaussian mixture, d={args.dim}, |mu|={args.separation:g}, sigma0=1; "
                 f"mean ± std over {len(args.seeds)} seeds", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def table(res: dict, kind: str) -> list[str]:
    def f(ms, digits=3):
        return "-" if ms is None else f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"

    head = "sigma (train)" if kind == "sigma" else "re-label intensity p"
    names = list(res["thresholds"])
    lines = [f"| {head} | " + " | ".join(f"steps to {n} (seeds reaching)" for n in names)
             + " | best loss | step of best | final loss | final error |", "|" + "---|" * (5 + len(names))]
    for d in res["settings"].values():
        if d["kind"] == kind:
            hits = [d["steps_to_threshold"][n] for n in names]
            lines.append(f"| {d['value']:g} | "
                         + " | ".join(f"{f(h['mean_std'], 0)} ({h['reached']}/{len(h['per_seed'])})" for h in hits)
                         + f" | {f(d['best_loss_mean_std'])} | {f(d['best_step_mean_std'], 0)} | "
                         f"{f(d['final_loss_mean_std'])} | {f(d['final_error_mean_std'])} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--separation", type=float, default=1.5, help="|mu|; sigma0 = 1")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0, 2.0])
    p.add_argument("--intensities", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--train-size", type=int, default=1024)
    p.add_argument("--val-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--margins", type=float, nargs="+", default=[0.1, 0.04],
                   help="thresholds = Bayes validation loss + each margin")
    p.add_argument("--curve-points", type=int, default=50, help="points per curve kept in the JSON")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 400 steps, output to runs/")
    p.add_argument("--results", type=Path, default=None,
                   help=f"output folder (default {RESULTS}, or {RUNS / 'theory_gaussian_quick'} with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = args.seeds[:2], 400
    args.results = args.results or (RUNS / "theory_gaussian_quick" if args.quick else RESULTS)
    if any(s <= 0 for s in args.sigmas) or any(not 0 <= v <= 1 for v in args.intensities):
        p.error("--sigmas must be > 0 and --intensities in [0, 1]")
    if min(args.dim, args.steps, args.eval_every, args.batch_size, args.train_size, args.val_size) < 1:
        p.error("--dim, --steps, --eval-every, --batch-size, --train-size and --val-size must be >= 1")
    if 1.0 not in args.sigmas:
        p.error("--sigmas must include 1 (the original data, the reference for the speed-up)")
    return args


def save_results(res: dict, summary: dict, args, seconds: float, cpu: float) -> None:
    config = {k: v for k, v in vars(args).items() if k not in ("results", "quick")}
    save_json({"meta": {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "torch": torch.__version__,
                        "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "threads": 1,
                        "model": f"MLP {args.dim}-{HIDDEN}-1 ReLU, SGD", **config},
               "bayes_val_loss": res["bayes_val_loss"], "bayes_val_error": res["bayes_val_error"],
               "thresholds": res["thresholds"], "summary": summary,
               "settings": {k: {kk: vv for kk, vv in d.items() if kk != "_curves"}
                            for k, d in res["settings"].items()}},
              args.results / "theory_gaussian.json")
    md = [f"Bimodal Gaussian mixture, d={args.dim}, |mu|={args.separation:g}, sigma0=1; MLP {args.dim}-{HIDDEN}-1, "
          f"SGD lr {args.lr}, batch {args.batch_size}, {args.train_size} training samples, {args.steps} steps; "
          f"validation: {args.val_size} original samples, true labels (Bayes BCE {res['bayes_val_loss']:.3f}, "
          f"Bayes error {res['bayes_val_error']:.3f}); thresholds "
          + ", ".join(f"{n} = {t:.3f}" for n, t in res["thresholds"].items())
          + f"; mean ± std over seeds {args.seeds}; {cpu:.0f} s CPU ({seconds:.0f} s wall).", "",
          "(a) modified variance", "", *table(res, "sigma"), "", "(b) re-labelling", "", *table(res, "p"), "", summary]
    write_report(md, args.results / "theory_gaussian.md")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Tiny matrices: one thread is faster than two, and leaves the other core to the rest of the machine.
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    res = run_grid(args)
    # CPU seconds are what the run costs; wall seconds depend on what else the machine is doing.
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    summary = verdict(res, args)
    plot(res, args, args.results / "theory_gaussian.png")
    save_results(res, summary, args, seconds, cpu)


if __name__ == "__main__":
    main()
