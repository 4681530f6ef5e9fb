"""--logger csv|tensorboard|wandb: per-step losses, lambda, rho, switch step, learning rate, images/s, data wait;
and the online k-NN monitor (KNNMonitor) as a public callback."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest

from rela.accelerator import LAG
from conftest import TINY, TINY_STEPS, read_metrics, run_ok, saved_backbone_features, weighted_knn_top1

from rela.callbacks import KNNMonitor
from rela.cli import main
from rela.config import TrainConfig
from rela.data import load_dataset
from rela.train import train

# 2 epochs x 4 steps; warm-up over the first 2 steps, then cosine. The adaptive switch at threshold
# 0.38 fires within these 8 steps: rho starts at exp(-(2 - 1)) = 0.368 and its EMAs close slowly
# (the gap shrinks ~1 % a step: 0.38 is reached at step 4 or 5).
THRESHOLD = 0.38
LOGGED = [*TINY, "--prior", "random", "--switch", f"adaptive:{THRESHOLD}", "--warmup", "0.25",
          "--log-every", "1", "--probe-every", "1"]
STEPS = TINY_STEPS


def logged_run(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "run"
    run_ok(["train", *LOGGED, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *extra])
    return out


def csv_rows(run: Path) -> list[dict]:
    with open(run / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def series(rows: list[dict], key: str) -> dict[int, float]:
    """step -> value of ``key`` (rows without it, or with NaN: not computed that step, left out)."""
    values = {int(r["step"]): float(r[key]) for r in rows if r.get(key, "") != ""}
    return {step: value for step, value in values.items() if not math.isnan(value)}


def expected_lr(step: int, total: int, peak: float = 2e-3, warmup_share: float = 0.25) -> float:
    """The schedule written out: linear warm-up, then cosine to zero over the run's steps."""
    warmup = int(warmup_share * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def expected_rho(losses: list[float], threshold: float = THRESHOLD) -> tuple[list[float], int | None]:
    """rho after each step and the step that reaches ``threshold`` (the authors' EMAs, written out)."""
    fast, slow, rhos = 1.0, 2.0, []
    for step, loss in enumerate(losses):
        rhos.append(math.exp(-max(slow - fast, 0.0)))
        fast = 0.999 * fast + (1 - 0.999) * loss
        slow = 0.99 * slow + (1 - 0.99) * fast
        if rhos[-1] >= threshold:
            return rhos, step
    return rhos, None


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory) -> Path:
    return logged_run(tmp_path_factory.mktemp("csv_run"))


def test_csv_log_has_one_row_per_step_with_lr_throughput_and_data_wait(csv_run):
    rows, m = csv_rows(csv_run), read_metrics(csv_run)
    assert m["steps"] == STEPS
    lr = series(rows, "train/lr")
    assert sorted(lr) == list(range(STEPS))
    for step, value in lr.items():
        assert value == pytest.approx(expected_lr(step, STEPS), rel=1e-6), step
    speed, wait = series(rows, "train/images_per_s"), series(rows, "train/data_wait")
    assert sorted(speed) == sorted(wait) == list(range(STEPS))
    assert all(0 <= w < 1 for w in wait.values()), wait
    # With --log-every 1 each row covers one step of 32 images: 32 / images_per_s is the step's period
    # and (1 - data_wait) of it its busy part, which contains the part rela counts as train_seconds.
    periods = {s: 32 / v for s, v in speed.items()}
    busy = sum(p * (1 - wait[s]) for s, p in periods.items())
    assert m["train_seconds"] <= busy <= sum(periods.values()) <= m["wall_seconds"]


def test_csv_log_has_rho_and_the_switch_step(csv_run):
    rows, m = csv_rows(csv_run), read_metrics(csv_run)
    rela_loss, rho = series(rows, "train/rela_loss"), series(rows, "train/rho")
    # the ReLA phase logged every step up to the switch, and rho is the EMAs' statistic of those losses
    phase = sorted(rela_loss)
    assert phase == list(range(len(phase)))
    rhos, decided = expected_rho([rela_loss[s] for s in phase])
    # rho crossed the threshold at step t; the host learns it LAG steps late (it never waits for the
    # device), so steps up to t + LAG are ReLA steps and t + 1 + LAG is the hand-over, the switch step
    assert decided is not None and decided == phase[-1] - LAG and m["switch_step"] == decided + 1 + LAG < STEPS
    switch = m["switch_step"]
    for step in phase[:decided + 1]:  # Lightning logs float32
        assert rho[step] == pytest.approx(rhos[step], rel=1e-6), step
    assert all(rho[s] == rho[decided] for s in phase[decided:])  # a decided switch keeps its state
    # from the hand-over on: the base method's loss, lambda 0, rho frozen at its last value
    after = range(switch, STEPS)
    assert sorted(series(rows, "train/method_loss")) == list(after)
    assert all(series(rows, "train/lambda")[s] == 0 for s in after)
    assert all(rho[s] == rho[decided] for s in after)
    # the switch step is written once, at its own step
    assert [(int(r["step"]), float(r["train/switch_step"])) for r in rows
            if r.get("train/switch_step", "")] == [(switch, switch)]


def test_tensorboard_logger_writes_the_same_series(csv_run, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = logged_run(tmp_path, "--logger", "tensorboard")
    assert not (run / "logs" / "metrics.csv").exists()
    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag) if not math.isnan(e.value)}
               for tag in events.Tags()["scalars"]}
    reference = csv_rows(csv_run)
    # same seed, same run: the deterministic series equal the CSV run's (TensorBoard stores float32)
    for key in ("train/lr", "train/rela_loss", "train/rho", "train/lambda", "probe_knn"):
        expected = series(reference, key)
        assert expected and scalars[key].keys() == expected.keys(), key
        assert all(scalars[key][s] == pytest.approx(v, rel=1e-6) for s, v in expected.items()), key
    assert scalars["train/switch_step"] == {read_metrics(run)["switch_step"]: read_metrics(run)["switch_step"]}
    assert len(scalars["train/images_per_s"]) == len(scalars["train/data_wait"]) == STEPS


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install 'rela[wandb]')")
def test_wandb_logger_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = logged_run(tmp_path, "--logger", "wandb")
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run / "wandb").iterdir())
    data = sorted(offline[0].glob("run-*.wandb"))
    assert data and data[0].stat().st_size > 0
    # the records hold the per-step series under their keys
    raw = data[0].read_bytes()
    for key in (b"train/lr", b"train/rho", b"train/images_per_s", b"train/data_wait", b"train/switch_step"):
        assert key in raw, key


@pytest.mark.parametrize("logger, packages", [("tensorboard", ("tensorboard", "tensorboardX")), ("wandb", ("wandb",))])
def test_missing_logger_extra_is_one_line_before_any_work(capsys, tmp_path, monkeypatch, logger, packages):
    for package in packages:
        monkeypatch.setitem(sys.modules, package, None)  # as if not installed: importing it fails
    out = tmp_path / "run"
    rc = main(["train", *TINY, "--prior", "random", "--logger", logger, "--out", str(out),
               "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == (f"rela: error: --logger {logger} needs the optional package {packages[0]}, which is not "
                   f"installed: pip install 'rela[{logger}]'")
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_unknown_logger_lists_the_choices(capsys, tmp_path):
    assert main(["train", *TINY, "--logger", "mlflow", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == ("rela: error: unknown logger 'mlflow'; valid choices: "
                                               "csv, tensorboard, wandb")


def test_knn_monitor_from_the_python_api(tmp_path):
    """A user's monitor on a validation split: logged, in the progress bar's metrics and in metrics.json."""
    memory = load_dataset("synthetic", "train", holdout=128)
    queries = load_dataset("synthetic", "test", holdout=128)
    monitor = KNNMonitor(memory, queries, every=2, k=5, name="val_knn", memory_images=40)
    cfg = TrainConfig(accelerator="cpu", dataset="synthetic", holdout=128, batch_size=32, ratio=0.3, epochs=3, probe_every=1,
                      out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), progress=False)
    m = train(cfg, callbacks=[monitor])
    # every=2 over 3 epochs: after epoch 2 and after the last; the default probe (every epoch) shares the records
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3]
    assert ["val_knn_top1" in h for h in m["history"]] == [False, True, True]
    assert all("probe_knn_top1" in h for h in m["history"])
    assert m["history"][-1]["steps"] == m["steps"]
    # the last score is k-NN on the saved weights: the first 40 of the 384 training images vote for the 128 held out
    ftr, fte = saved_backbone_features(cfg.out, memory.images[:40], queries.images)
    expected = weighted_knn_top1(ftr, memory.labels[:40], fte, queries.labels, k=5)
    assert m["history"][-1]["val_knn_top1"] == pytest.approx(expected, abs=1e-12)
    assert 0.1 < expected < 1  # a value that tells a right monitor from a wrong one
    logged = series(csv_rows(Path(cfg.out)), "val_knn")
    assert list(logged.values()) == pytest.approx([h["val_knn_top1"] for h in m["history"][1:]])


def test_knn_monitor_rejects_bad_settings():
    data = load_dataset("synthetic", "train", limit=8)
    with pytest.raises(ValueError, match="every >= 1"):
        KNNMonitor(data, data, every=0)
