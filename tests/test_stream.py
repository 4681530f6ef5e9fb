"""Stream mode (rela.data.stream, rela.data.files): per-sample decoding in DataLoader workers, same behaviour
as memory mode (subsets, bank rows), reproducible with workers, data-mode choice, dataset identity, shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import backbone_state
from lightning.pytorch.callbacks import Callback
from PIL import Image

from rela.bank import BankWriter, bank_key, extract_chunks, load_or_extract
from rela.build import choose_data_mode, load_data
from rela.cli import main
from rela.config import TrainConfig
from rela.data import load_dataset
from rela.data.files import image_folder
from rela.errors import RelaError
from rela.priors import build_prior
from rela.train import train

CLASSES = ("ant", "bee", "cat")


def make_jpeg_folder(root: Path, per_class: int = 8, splits=("train", "test"), size=(24, 20), seed=0) -> Path:
    """JPEGs that differ: a class colour plus noise, one sub-folder per class."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                base = np.zeros((size[1], size[0], 3), np.float64)
                base[..., c] = 200
                pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def stream_cfg(root: Path, tmp: Path, **fields) -> TrainConfig:
    base = dict(dataset=f"imagefolder:{root}", image_size=16, backbone="convnet", batch_size=8, ratio=0.5,
                epochs=2, probe_every=0, progress=False, cache_dir=str(tmp / "cache"), out=str(tmp / "run"),
                data_mode="stream", num_workers=0, checkpoint_every=0, accelerator="cpu")
    return TrainConfig(**{**base, **fields})


class Indices(Callback):
    """The dataset indices of every training batch, in order."""

    def __init__(self):
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        index = batch if isinstance(batch, torch.Tensor) else batch["index"]
        self.seen.append(index.tolist())


# --- files: decoding, identity -------------------------------------------------------------


def test_stream_decodes_what_memory_mode_holds(tmp_path):
    root = make_jpeg_folder(tmp_path / "pics", per_class=4)
    memory = load_dataset(f"imagefolder:{root}", "train", image_size=12)
    stream = load_data(stream_cfg(root, tmp_path, image_size=12), "train", "stream")
    assert len(stream) == len(memory) == 12 and torch.equal(stream.labels, memory.labels)
    decoded = stream.decoded()
    assert torch.equal(decoded.images, memory.images)
    assert decoded.images.float().std() > 10  # real pictures, not a constant
    assert stream.fingerprint() == memory.fingerprint()  # one bank for both modes


def test_fingerprint_is_names_sizes_mtimes_and_verify_hashes_content(tmp_path):
    root = make_jpeg_folder(tmp_path / "pics", per_class=2, splits=("train",))
    key = image_folder(str(root), "train").fingerprint(16)
    assert image_folder(str(root), "train").fingerprint(16) == key
    assert image_folder(str(root), "train").fingerprint(32) != key  # the decode size is part of it
    content = image_folder(str(root), "train").fingerprint(16, verify=True)
    f = root / "train" / "bee" / "001.jpg"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    assert image_folder(str(root), "train").fingerprint(16) != key
    assert image_folder(str(root), "train").fingerprint(16, verify=True) == content
    # same size and mtime, other bytes: only --verify-data sees it (what the README says a hit guarantees)
    touched = image_folder(str(root), "train").fingerprint(16)
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert image_folder(str(root), "train").fingerprint(16) == touched
    assert image_folder(str(root), "train").fingerprint(16, verify=True) != content
    (root / "train" / "bee" / "001.jpg").rename(root / "train" / "bee" / "009.jpg")  # renamed
    assert image_folder(str(root), "train").fingerprint(16) != touched


# --- data mode ------------------------------------------------------------------------------


def test_data_mode_auto_follows_the_ram_budget(tmp_path):
    root = make_jpeg_folder(tmp_path / "pics", per_class=4, splits=("train",))
    cfg = TrainConfig(dataset=f"imagefolder:{root}", image_size=64, data_mode="auto")
    need = 12 * 3 * 64 * 64  # N x C x H x W bytes
    mode, why = choose_data_mode(cfg, ram=4 * need)  # budget = 25% of RAM = need: fits
    assert mode == "memory" and "<=" in why and "25%" in why
    mode, why = choose_data_mode(cfg, ram=4 * need - 4)
    assert mode == "stream" and ">" in why
    assert choose_data_mode(TrainConfig(dataset="synthetic"), ram=1)[0] == "memory"  # not files: memory
    assert choose_data_mode(TrainConfig(dataset="synthetic", data_mode="memory"))[0] == "memory"
    with pytest.raises(RelaError, match="valid choices: auto, memory, stream"):
        TrainConfig(dataset="synthetic", data_mode="disk").validate()
    with pytest.raises(RelaError, match="imagefolder:PATH or shards:PATH"):
        TrainConfig(dataset="synthetic", data_mode="stream").validate()
    with pytest.raises(RelaError, match="num_workers"):
        TrainConfig(dataset="synthetic", num_workers=-1).validate()


# --- training: same subsets, repeatable with workers ---------------------------------------------


def test_stream_loader_walks_the_memory_loaders_subsets(tmp_path):
    """The loaders themselves, without training: same sampler, same index batches, epoch by epoch."""
    from torch.utils.data import BatchSampler, DataLoader

    from rela.data import DynamicSubsetSampler
    from rela.data.augment import BYOL_VIEW_1, RELA_VIEW
    from rela.data.stream import StreamBatches

    root = make_jpeg_folder(tmp_path / "pics", per_class=5, splits=("train",))
    data = load_data(stream_cfg(root, tmp_path), "train", "stream")
    stream = StreamBatches(data, RELA_VIEW, [BYOL_VIEW_1], seed=0, workers=0, prefetch=2, pin_memory=False)
    a, b = DynamicSubsetSampler(len(data), 0.6, seed=4), DynamicSubsetSampler(len(data), 0.6, seed=4)
    memory_loader = DataLoader(range(len(data)), batch_sampler=BatchSampler(a, 3, drop_last=True),
                               collate_fn=torch.tensor)
    stream_loader = stream.loader(b, 3)
    for epoch in range(3):
        a.set_epoch(epoch), b.set_epoch(epoch)
        batches = [stream.split(batch) for batch in stream_loader]
        assert [i.tolist() for i, *_ in batches] == [i.tolist() for i in memory_loader]
        index, labels, rela_views, method_views = batches[0]
        assert torch.equal(labels, data.labels[index])
        assert len(rela_views) == 2 and len(method_views) == 1 and rela_views[0].shape == (3, 3, 16, 16)
        assert not torch.equal(rela_views[0], rela_views[1])  # two random views of the same images
    assert stream.position == len(a)  # the sampler position of the last batch taken



@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """Memory mode; stream mode with the views made on the device; stream mode twice with the views made by
    2 workers: same folder, seed and settings (random prior)."""
    tmp = tmp_path_factory.mktemp("three")
    root = make_jpeg_folder(tmp / "pics", per_class=8, splits=("train",))
    runs = {}
    for name, fields in (("memory", {"data_mode": "memory"}), ("stream_device", {"num_workers": 2}),
                         ("stream_a", {"num_workers": 2, "augment_on": "workers"}),
                         ("stream_b", {"num_workers": 2, "augment_on": "workers"})):
        seen = Indices()
        cfg = stream_cfg(root, tmp, out=str(tmp / name), prior="random", batch_size=4, **fields)
        metrics = train(cfg, callbacks=[seen])
        runs[name] = (tmp / name, seen.seen, metrics)
    return runs


def test_same_seed_same_subsets_in_both_modes(three_runs):
    _, memory, m = three_runs["memory"]
    _, stream, s = three_runs["stream_a"]
    assert m["data_mode"] == "memory" and s["data_mode"] == "stream"
    assert len(memory) == 2 * (12 // 4) == len(stream) and memory == stream
    assert memory[0] != memory[-1]  # a fresh subset each epoch
    assert m["bank_key"] == s["bank_key"] and m["bank_cache_hit"] is False and s["bank_cache_hit"] is True
    assert m["steps"] == s["steps"] == 6


def test_stream_mode_augmenting_on_the_device_trains_exactly_as_memory_mode(three_runs):
    """Workers only decode; the batch is augmented as memory mode augments it: the same weights, bit for bit."""
    _, memory_seen, _ = three_runs["memory"]
    _, device_seen, m = three_runs["stream_device"]
    assert m["data_mode"] == "stream" and device_seen == memory_seen
    a, b = backbone_state(three_runs["memory"][0]), backbone_state(three_runs["stream_device"][0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stream_run_with_workers_repeats_exactly(three_runs):
    a, b = backbone_state(three_runs["stream_a"][0]), backbone_state(three_runs["stream_b"][0])
    memory_run = backbone_state(three_runs["memory"][0])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], memory_run[k]) for k in a)  # other augmentation draws: not the same weights


class SimulatedKill(BaseException):
    """Not an Exception: nothing on the way up may catch it, as with a real kill."""


@pytest.mark.parametrize("run", ["stream_a", "stream_device"])
def test_stream_run_killed_mid_epoch_resumes_to_identical_weights(three_runs, monkeypatch, run):
    """Workers run ahead of training: the checkpoint must hold the position of the last trained batch."""
    from rela.train import ReLAModule

    reference, _, _ = three_runs[run]
    cfg = TrainConfig.from_yaml(reference / "config.yaml")
    cfg.out, cfg.checkpoint_every = str(reference.parent / f"killed-{run}"), 1
    step_fn = ReLAModule.training_step

    def dying_step(self, batch, batch_idx):
        if self.global_step == 4:  # the second batch of epoch 2 (3 per epoch)
            raise SimulatedKill
        return step_fn(self, batch, batch_idx)

    monkeypatch.setattr(ReLAModule, "training_step", dying_step)
    with pytest.raises(SimulatedKill):
        train(cfg)
    monkeypatch.undo()
    saved = torch.load(Path(cfg.out) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4 and saved["rela_sampler"]["consumed"] == 4  # not where the workers were
    cfg.resume = True
    train(cfg)
    a, b = backbone_state(reference), backbone_state(Path(cfg.out))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- bank extraction streams ----------------------------------------------------------------------


def test_streamed_bank_matches_memory_bank_and_resumes(tmp_path):
    root = make_jpeg_folder(tmp_path / "pics", per_class=7, splits=("train",))
    cfg = stream_cfg(root, tmp_path)
    stream, memory = load_data(cfg, "train", "stream"), load_data(cfg, "train", "memory")
    prior = build_prior("random", learner_arch="convnet", channels=3, image_size=16, mean=stream.mean,
                        std=stream.std, seed=1)
    key = bank_key(prior, stream)
    writer = BankWriter(tmp_path / "s" / "bank.npy", key, len(stream), chunk_rows=8)
    # a killed extraction: half the chunks (rank 0 of 2) written, then a fresh process finishes the rest
    first = extract_chunks(prior, stream, writer, rank=0, world_size=2, batch_size=4, workers=2, progress=False)
    assert first == [0, 2] and writer.missing() == [1]
    feats_s, info = load_or_extract(prior, stream, path=tmp_path / "s" / "bank.npy", chunk_rows=8, batch_size=4,
                                    workers=2, progress=False, dtype="float16")
    assert info["bank_cache_hit"] is False and list(feats_s.shape) == [21, 128]
    feats_m, _ = load_or_extract(prior, memory, path=tmp_path / "m" / "bank.npy", chunk_rows=8, batch_size=4,
                                 progress=False)
    assert torch.allclose(feats_s.float(), feats_m.float(), rtol=1e-2, atol=1e-3)
    assert feats_s.float().std(0).mean() > 0.01  # rows differ: each image has its own features


def test_stream_run_is_evaluated_from_its_files(tmp_path, monkeypatch):
    """``rela eval`` of a stream-mode run streams both splits through DataLoader workers (the decoded set is never
    built) and scores exactly what evaluating the same files in memory scores."""
    from rela.data.stream import StreamSet
    from rela.evaluate import evaluate_run

    root = make_jpeg_folder(tmp_path / "pics", per_class=6)
    run = tmp_path / "run"
    train(stream_cfg(root, tmp_path, epochs=1, num_workers=2))
    whole = StreamSet.decoded
    monkeypatch.setattr(StreamSet, "decoded", lambda *a, **k: pytest.fail("eval decoded a whole split"))
    streamed = evaluate_run(run, ks=(5,), linear_epochs=5, progress=False)
    assert streamed["eval_data_mode"] == "stream" and streamed["eval_test_images"] == 18
    monkeypatch.setattr(StreamSet, "decoded", whole)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "data_mode": "memory"}))
    in_memory = evaluate_run(run, ks=(5,), linear_epochs=5, progress=False)
    assert in_memory["eval_data_mode"] == "memory"
    assert (streamed["knn5_top1"], streamed["linear_top1"]) == (in_memory["knn5_top1"], in_memory["linear_top1"])


@pytest.mark.parametrize("command", ["diagnose", "rank-priors"])
def test_prior_studies_stream_and_report_what_memory_mode_reports(tmp_path, command):
    """diagnose / rank-priors on an image folder in stream mode: features through the streamed bank path (rank-priors
    decodes only its sampled images), the same report as memory mode."""
    root = make_jpeg_folder(tmp_path / "pics", per_class=8)
    flag = "--models" if command == "diagnose" else "--priors"
    reports = {}
    for mode in ("stream", "memory"):
        out = tmp_path / mode
        args = [command, flag, "random", "random:resnet-narrow", "--dataset", f"imagefolder:{root}", "--data-mode",
                mode, "--cache-dir", str(tmp_path / f"cache-{mode}"), "--out", str(out), "--no-progress"]
        args += ["--pair-samples", "24"] if command == "diagnose" else ["--samples", "16"]
        assert main(args) == 0
        name = "diagnose.json" if command == "diagnose" else "rank_priors.json"
        reports[mode] = json.loads((out / name).read_text())
    assert reports["stream"] == reports["memory"]


# --- shards ----------------------------------------------------------------------------------------


def test_shard_command_and_shards_dataset(tmp_path, capsys):
    root = make_jpeg_folder(tmp_path / "pics", per_class=5)
    out = tmp_path / "shards"
    assert main(["shard", str(root), str(out), "--samples-per-shard", "4"]) == 0
    assert "4 shard(s)" in capsys.readouterr().out  # 15 images of train, 4 per tar
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == [f"shard-{i:06d}.tar" for i in range(4)]
    folder = load_dataset(f"imagefolder:{root}", "train", image_size=12)
    sharded = load_dataset(f"shards:{out}", "train", image_size=12)
    assert torch.equal(sharded.images, folder.images) and torch.equal(sharded.labels, folder.labels)
    assert len(load_dataset(f"shards:{out}", "test", image_size=12)) == 15
    stream = load_data(stream_cfg(out, tmp_path, dataset=f"shards:{out}", image_size=12), "train", "stream")
    assert torch.equal(stream.decoded(workers=2).images, folder.images)
    wds = pytest.importorskip("webdataset")  # the tars are plain WebDataset shards
    samples = list(wds.WebDataset(str(out / "train" / "shard-000000.tar"), shardshuffle=False))
    assert [int(s["cls"]) for s in samples] == folder.labels[:4].tolist()
    assert samples[0]["jpg"] == (root / "train" / "ant" / "000.jpg").read_bytes()


def test_stream_training_on_shards(tmp_path):
    root = make_jpeg_folder(tmp_path / "pics", per_class=8, splits=("train",))
    assert main(["shard", str(root), str(tmp_path / "shards"), "--samples-per-shard", "10"]) == 0
    m = train(stream_cfg(root, tmp_path, dataset=f"shards:{tmp_path / 'shards'}", num_workers=1, epochs=1))
    assert m["data_mode"] == "stream" and m["steps"] == 1 and m["images_seen"] == 8
