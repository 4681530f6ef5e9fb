"""The default main job: BYOL with and without ReLA at the same reduced budget.

Trains plain BYOL and ReLA + BYOL (random-init prior) on Fashion-MNIST for the
same number of epochs over the same dynamic subset ratio, evaluates both on the
test split, prints a comparison table and saves an accuracy-vs-cost plot.
Finished runs are reused, unfinished ones resumed, so the demo can be rerun.
"""

from __future__ import annotations

from pathlib import Path

from rela.config import TrainConfig
from rela.console import console_scope
from rela.evaluate import evaluate_run
from rela.io import load_json, save_json, save_text
from rela.plotting import pyplot, require_plots
from rela.train import train


def _run(cfg: TrainConfig, progress: bool) -> dict:
    metrics_file = Path(cfg.out) / "metrics.json"
    if metrics_file.is_file() and "linear_top1" in load_json(metrics_file):
        print(f"[demo] {cfg.out} is already finished; reusing it (delete the folder to rerun)")
        return load_json(metrics_file)
    print(f"[demo] training {cfg.method} with prior {cfg.prior!r} -> {cfg.out}")
    train(cfg)
    print(f"[demo] evaluating {cfg.out}")
    return evaluate_run(cfg.out, progress=progress)


def handover_seconds(m: dict) -> float | None:
    """Training seconds at the run's hand-over (its ``switch_step``), interpolated between the probes'
    (steps, seconds) points; None for a run that did not hand over."""
    step = m.get("switch_step")
    if step is None:
        return None
    points = [(0, 0.0)] + [(h["steps"], h["train_seconds"]) for h in m["history"]]
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return t0 + (t1 - t0) * (step - s0) / max(s1 - s0, 1)
    return points[-1][1]


def plot_cost_curves(runs: dict[str, dict], path: Path) -> list[tuple[str, float]]:
    """The accuracy-vs-cost plot; returns the hand-overs it marked, as (run label, x in seconds)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    marks = []
    for label, m in runs.items():
        # ReLA's cost includes extracting the bank (zero on a cache hit, which we do not count as free).
        offset = m.get("bank_seconds", 0.0)
        xs = [offset] + [offset + h["train_seconds"] for h in m["history"]]
        ys = [None] + [100 * h["probe_knn_top1"] for h in m["history"]]
        line, = ax.plot(xs[1:], ys[1:], marker="o", label=f"{label} (test k-NN {100 * m['knn_top1']:.1f}%)")
        at = handover_seconds(m)
        if at is not None:  # where the ReLA phase hands over to the base method
            x = offset + at
            ax.axvline(x, color=line.get_color(), ls=":", lw=1.5, label=f"{label}: hand-over at step {m['switch_step']}")
            marks.append((label, x))
    ax.set_xlabel("training cost (seconds on this machine, bank extraction included)")
    ax.set_ylabel("k-NN top-1 on probe slice (%)")
    ax.set_title("Fashion-MNIST: accuracy vs. cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return marks


def format_table(runs: dict[str, dict]) -> str:
    head = "| run | steps | images seen | train s | bank s | switch step | k-NN top-1 | linear top-1 |"
    rows = [head, "|" + "---|" * 8]
    for label, m in runs.items():
        rows.append(f"| {label} | {m['steps']} | {m['images_seen']} | {m['train_seconds']:.1f} | "
                    f"{m.get('bank_seconds', 0):.1f} | {m['switch_step'] if m['switch_step'] is not None else '-'} | "
                    f"{100 * m['knn_top1']:.2f} | {100 * m['linear_top1']:.2f} |")
    return "\n".join(rows)


@console_scope()
def run_demo(out: str = "runs/demo", epochs: int = 5, ratio: float = 0.2, seed: int = 0,
             data_root: str | None = None, train_limit: int | None = None, progress: bool = True) -> dict:
    require_plots()  # the demo ends with a figure: say so before ten minutes of training
    out_dir = Path(out)
    switch = TrainConfig().switch  # the demo shows rela's defaults: a run that hands over (soft-plateau)
    tag = f"r{ratio}-e{epochs}-s{seed}" + (f"-n{train_limit}" if train_limit else "")
    common = dict(dataset="fashion-mnist", data_root=data_root, method="byol", ratio=ratio, epochs=epochs,
                  seed=seed, train_limit=train_limit, progress=progress, resume=True)
    runs = {
        "BYOL": _run(TrainConfig(prior="none", out=str(out_dir / f"byol-{tag}"), **common), progress),
        "ReLA + BYOL (random prior)": _run(
            # the switch in the name: a finished run of another default (before issue 28: adaptive) is not reused
            TrainConfig(prior="random", out=str(out_dir / f"rela-random-{switch.replace(':', '')}-{tag}"), **common),
            progress),
    }
    table = format_table(runs)
    plot = out_dir / "demo_cost.png"
    plot_cost_curves(runs, plot)
    save_json(runs, out_dir / "demo_summary.json")
    save_text(table + "\n", out_dir / "demo_summary.md")
    print(f"\nFashion-MNIST, BYOL budget: {epochs} epochs x {ratio:.0%} of the data per epoch, seed {seed}\n")
    print(table)
    for label, m in runs.items():
        if m.get("switch_step") is not None:
            print(f"{label}: handed over to {m['method']} at step {m['switch_step']} of {m['steps']} "
                  f"(switch {switch}, rela's default); the dotted line on the plot")
    print(f"\nplot:    {plot}\nsummary: {out_dir / 'demo_summary.md'} and demo_summary.json")
    print(f"runs:    {out_dir}/*-{tag}/ (config.yaml, metrics.json, backbone.pt, logs/, checkpoints/)")
    return runs
