"""Bad input in stream mode: one line naming the file and exit 2, or skipped and counted with
--skip-bad-images; no worker tracebacks on the console."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_metrics
from lightning.pytorch.callbacks import Callback
from test_stream import make_jpeg_folder

from rela.cli import main
from rela.data.files import BadImage, shard_folder
from rela.errors import RelaError

# 3 classes x 8 images of 16 px, one epoch over all of them, 2 workers, no prior (no bank to extract first)
ARGS = ["train", "--image-size", "16", "--backbone", "convnet", "--batch-size", "8", "--epochs", "1",
        "--ratio", "1", "--probe-every", "0", "--no-progress", "--data-mode", "stream", "--num-workers", "2",
        "--checkpoint-every", "0"]


def run(capfd, tmp: Path, dataset: str, *extra: str) -> tuple[int, str]:
    """rela train's exit code and its console output (stderr, then stdout)."""
    rc = main([*ARGS, "--dataset", dataset, "--out", str(tmp / "out"), "--cache-dir", str(tmp / "cache"), *extra])
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "DataLoader worker" not in err  # nothing from inside the workers
    return rc, err + out


def one_error_line(err: str, *names: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("rela: error:")]
    assert len(lines) == 1, err
    assert all(name in lines[0] for name in names), lines[0]
    return lines[0]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_jpeg_mid_epoch_stops_with_its_name(capfd, tmp_path):
    root = make_jpeg_folder(tmp_path / "pics", splits=("train",))
    bad = root / "train" / "bee" / "003.jpg"
    truncate(bad)
    rc, err = run(capfd, tmp_path, f"imagefolder:{root}")
    assert rc == 2
    assert "--skip-bad-images" in one_error_line(err, str(bad), "truncated")


def test_non_image_file_in_a_class_folder(capfd, tmp_path):
    root = make_jpeg_folder(tmp_path / "pics", splits=("train",))
    bad = root / "train" / "cat" / "notes.jpg"
    bad.write_text("not a picture, just text that happens to end in .jpg\n")
    rc, err = run(capfd, tmp_path, f"imagefolder:{root}")
    assert rc == 2
    one_error_line(err, str(bad), "cannot identify image file")


class DeleteAfterFirstEpoch(Callback):
    """Deletes a file when the first epoch ends: the (persistent) workers read it again in the second."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == 0:
            self.path.unlink()


def test_file_deleted_after_indexing(tmp_path):
    from rela.config import TrainConfig
    from rela.train import train

    root = make_jpeg_folder(tmp_path / "pics", splits=("train",))
    gone = root / "train" / "ant" / "005.jpg"
    cfg = TrainConfig(accelerator="cpu", dataset=f"imagefolder:{root}", image_size=16, backbone="convnet", batch_size=8, epochs=2,
                      probe_every=0, progress=False, data_mode="stream", num_workers=2, checkpoint_every=0,
                      out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RelaError, match=f"cannot decode image {gone}: No such file or directory") as info:
        train(cfg, callbacks=[DeleteAfterFirstEpoch(gone)])
    assert "\n" not in str(info.value)


def test_skip_bad_images_counts_them_in_the_summary(capfd, tmp_path):
    root = make_jpeg_folder(tmp_path / "pics", splits=("train",))
    truncate(root / "train" / "bee" / "003.jpg")
    (root / "train" / "cat" / "007.jpg").unlink()
    (root / "train" / "cat" / "notes.jpg").write_text("text")  # 24 files: 3 full batches visit them all
    rc, err = run(capfd, tmp_path, f"imagefolder:{root}", "--skip-bad-images")
    assert rc == 0, err
    m = read_metrics(tmp_path / "out")
    assert m["skipped_images"] == 2 and m["data_mode"] == "stream"
    assert m["steps"] == 3 and m["images_seen"] == 22
    assert "skipped 2 image(s) that do not decode" in err  # the run summary says so too


def make_shards(tmp: Path) -> Path:
    root = make_jpeg_folder(tmp / "pics", splits=("train",))
    assert main(["shard", str(root), str(tmp / "shards"), "--samples-per-shard", "10"]) == 0
    return tmp / "shards"


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_empty_or_truncated_shard(capfd, tmp_path, damage):
    shards = make_shards(tmp_path)
    tar = shards / "train" / "shard-000001.tar"
    truncate(tar, 0.0 if damage == "empty" else 0.6)
    rc, err = run(capfd, tmp_path, f"shards:{shards}")
    assert rc == 2
    one_error_line(err, str(tar), "empty" if damage == "empty" else "truncated")
    # with --skip-bad-images the shard's 10 samples are left out and counted
    rc, err = run(capfd, tmp_path, f"shards:{shards}", "--skip-bad-images")
    assert rc == 0, err
    m = read_metrics(tmp_path / "out")
    assert m["skipped_images"] == 10 and m["steps"] == (24 - 10) // 8


def test_shard_truncated_after_opening_names_it(tmp_path):
    shards = make_shards(tmp_path)
    files = shard_folder(str(shards), "train")
    truncate(shards / "train" / "shard-000002.tar", 0.3)
    assert len(files.read(0)) > 100  # shard 0 is whole
    with pytest.raises(BadImage, match="shard-000002.tar .*shard truncated"):
        files.read(len(files) - 1)
