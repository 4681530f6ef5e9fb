"""The demo's report: comparison table and accuracy-vs-cost plot, on metrics of real tiny runs."""

from __future__ import annotations

import json

import matplotlib
import matplotlib.colors
import pytest
from conftest import FASHION_MNIST_ROOT, needs_fmnist, read_metrics
from PIL import Image

from rela.cli import main
from rela.config import TrainConfig
from rela.demo import format_table, handover_seconds, plot_cost_curves


@pytest.fixture(scope="module")
def runs(none_run, random_run, constant_run):
    return {"BYOL": read_metrics(none_run), "ReLA + BYOL": read_metrics(random_run),
            "ReLA (constant:0.5) + BYOL": read_metrics(constant_run)}


def test_format_table(runs):
    table = format_table(runs)
    lines = table.splitlines()
    assert len(lines) == 2 + len(runs)
    assert lines[0].startswith("| run |") and lines[1].startswith("|---|")
    for line, (label, m) in zip(lines[2:], runs.items()):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == label
        assert cells[1] == str(m["steps"]) and cells[2] == str(m["images_seen"])
        assert float(cells[3]) == pytest.approx(m["train_seconds"], abs=0.05)
        assert cells[5] == ("-" if m["switch_step"] is None else str(m["switch_step"]))
        assert float(cells[6]) == pytest.approx(100 * m["knn_top1"], abs=0.005)
        assert float(cells[7]) == pytest.approx(100 * m["linear_top1"], abs=0.005)
    assert lines[-1].split("|")[6].strip() == str(runs["ReLA (constant:0.5) + BYOL"]["switch_step"])


def colour_pixels(path, colours: list) -> list[int]:
    """How many pixels of the PNG at ``path`` have exactly each of ``colours`` (any matplotlib colour)."""
    with Image.open(path) as image:
        counts = {rgb: n for n, rgb in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    return [counts.get(tuple(round(255 * v) for v in matplotlib.colors.to_rgb(c)), 0) for c in colours]


def test_plot_cost_curves_writes_a_png(runs, tmp_path):
    path = tmp_path / "cost.png"
    plot_cost_curves(runs, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size == (720, 480)  # 6 x 4 inches at 120 dpi
    # Each run's curve is drawn in its own colour of matplotlib's default cycle (#1f77b4, #ff7f0e, ...):
    # every colour is on the plot (the legend at least).
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][:len(runs)]
    assert all(colour_pixels(path, colours))
    # Each run's curve itself, plotted alone (curves of runs probed at similar seconds overlap, so the
    # pixels of one colour on the full plot depend on the machine's timing): the same plot with no probe
    # points is the floor (its legend); one probe marker (6 pt at 120 dpi, 10 px across) adds ~50-70
    # pixels (measured: +48 for a one-marker curve with this venv's matplotlib).
    for label, m in runs.items():
        alone, legend_only = tmp_path / "alone.png", tmp_path / "legend-only.png"
        plot_cost_curves({label: m}, alone)
        plot_cost_curves({label: {**m, "history": []}}, legend_only)
        (n,), (n_floor,) = colour_pixels(alone, colours[:1]), colour_pixels(legend_only, colours[:1])
        assert n > n_floor + 30, f"{label}: {n} pixels with its curve, {n_floor} with the legend alone"


def test_the_plot_marks_each_hand_over_where_it_happened(runs, tmp_path):
    marks = dict(plot_cost_curves(runs, tmp_path / "cost.png"))
    handed_over = {label for label, m in runs.items() if m["switch_step"] is not None}
    assert handed_over and set(marks) == handed_over  # constant:0.5 hands over; BYOL and the adaptive run do not
    m = runs["ReLA (constant:0.5) + BYOL"]
    # between the probes on either side of the switch step, on the run's cost axis (bank seconds first)
    before = max((h for h in m["history"] if h["steps"] <= m["switch_step"]), key=lambda h: h["steps"],
                 default={"train_seconds": 0.0})
    after = min((h for h in m["history"] if h["steps"] >= m["switch_step"]), key=lambda h: h["steps"])
    assert before["train_seconds"] <= handover_seconds(m) <= after["train_seconds"]
    assert marks["ReLA (constant:0.5) + BYOL"] == pytest.approx(m["bank_seconds"] + handover_seconds(m))


@needs_fmnist
def test_demo_command_end_to_end_hands_over_and_reruns(tmp_path, monkeypatch, capsys):
    """A reduced demo (1024 images, 2 epochs of half of them: 4 steps of 256): with rela's default switch
    (soft-plateau, whose time constants are fractions of the run) the ReLA run hands over to BYOL, as the full
    demo's does; the adaptive rule could not within 2,400 steps."""
    monkeypatch.chdir(tmp_path)  # the demo caches banks under ./.cache/rela
    monkeypatch.delenv("RELA_DATA", raising=False)
    args = ["demo", "--out", "demo", "--epochs", "2", "--ratio", "0.5", "--train-limit", "1024",
            "--data-root", str(FASHION_MNIST_ROOT), "--no-progress"]
    assert main(args) == 0
    first = capsys.readouterr().out
    out = tmp_path / "demo"
    for name in ("demo_cost.png", "demo_summary.json", "demo_summary.md"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "demo_summary.json").read_text())
    assert len(summary) == 2
    byol, rela = summary.values()
    # the same budget for both: 2 epochs over round(0.5 * 1024) images, 2 batches of 256 each
    assert byol["steps"] == rela["steps"] == 4 and byol["images_seen"] == rela["images_seen"] == 1024
    assert byol["prior"] == "none" and rela["prior"] == "random"
    # the hand-over: ReLA steps first, then BYOL's own loss on its own views
    assert TrainConfig().switch == "soft-plateau"
    assert rela["switch_step"] is not None and 0 < rela["switch_step"] < rela["steps"]
    assert rela["rela_steps"] == rela["switch_step"] and rela["method_phase_images"] > 0
    assert byol["switch_step"] is None
    assert f"handed over to byol at step {rela['switch_step']} of 4 (switch soft-plateau" in first
    assert (out / "demo_summary.md").read_text().strip() == format_table(summary)
    assert format_table(summary) in first
    # a second call reuses the finished runs instead of training again
    assert main(args) == 0
    second = capsys.readouterr().out
    assert second.count("already finished") == 2
    assert json.loads((out / "demo_summary.json").read_text()) == summary
