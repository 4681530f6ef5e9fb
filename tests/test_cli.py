"""User errors through the CLI: exit code 2, one 'rela: error:' line naming the bad value, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import TINY

from rela.bank import load_or_extract
from rela.cli import main
from rela.data import load_dataset
from rela.priors import build_prior


def expect_user_error(capsys, args: list[str], *names: str) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "rela: error:" in err
    assert "Traceback" not in err
    for name in names:
        assert name in err, f"{name!r} not named in: {err}"
    return err


@pytest.fixture
def paths(tmp_path):
    """Output and cache folders that must not appear when a run is refused."""
    return tmp_path / "out", tmp_path / "cache"


def train_args(paths, *extra) -> list[str]:
    out, cache = paths
    return ["train", *TINY, "--probe-every", "0", "--out", str(out), "--cache-dir", str(cache), *extra]


def assert_nothing_written(paths):
    out, _ = paths
    assert not out.exists()


@pytest.mark.parametrize("flag,value,named", [
    ("--dataset", "not-a-dataset", "not-a-dataset"),
    ("--prior", "pretrained-magic", "pretrained-magic"),
    ("--prior", "random:not-an-arch", "not-an-arch"),
    ("--method", "not-a-method", "not-a-method"),
    ("--backbone", "not-a-backbone", "not-a-backbone"),
    ("--ratio", "0", "ratio"),
    ("--ratio", "1.5", "1.5"),
    ("--epochs", "0", "epochs"),
    ("--batch-size", "-4", "-4"),
    ("--precision", "fp8", "fp8"),
    ("--train-limit", "0", "train_limit"),
])
def test_bad_values(capsys, paths, flag, value, named):
    expect_user_error(capsys, train_args(paths, flag, value), named)
    assert_nothing_written(paths)


def test_bad_switch_spec(capsys, paths):
    expect_user_error(capsys, train_args(paths, "--prior", "random", "--switch", "constant:2"), "constant:2")
    assert_nothing_written(paths)


def test_unknown_dataset_lists_choices(capsys, paths):
    err = expect_user_error(capsys, train_args(paths, "--dataset", "cifar11"), "cifar11")
    assert "fashion-mnist" in err and "synthetic" in err


def test_missing_fashion_mnist_files(capsys, paths, tmp_path, monkeypatch):
    monkeypatch.delenv("RELA_DATA", raising=False)
    empty = tmp_path / "empty-data-root"
    empty.mkdir()
    expect_user_error(capsys, train_args(paths, "--dataset", "fashion-mnist", "--data-root", str(empty)), str(empty))
    assert_nothing_written(paths)


def test_unreadable_checkpoint_prior(capsys, paths, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    expect_user_error(capsys, train_args(paths, "--prior", f"checkpoint:{garbage}"), str(garbage))
    assert_nothing_written(paths)


def test_missing_prior_weights(capsys, paths, tmp_path):
    missing = tmp_path / "resnet18-missing.pth"
    expect_user_error(capsys, train_args(paths, "--prior", "torchvision:resnet18", "--prior-weights", str(missing)),
                      str(missing))
    assert_nothing_written(paths)


def test_bank_made_for_another_dataset(capsys, paths, tmp_path):
    other = load_dataset("synthetic:80")
    prior = build_prior("random", learner_arch="convnet", channels=3, image_size=16, mean=other.mean,
                        std=other.std, seed=1)
    bank = tmp_path / "other-dataset-bank.pt"
    load_or_extract(prior, other, path=bank, progress=False)
    err = expect_user_error(capsys, train_args(paths, "--prior", "random", "--bank", str(bank)), str(bank))
    assert "made for" in err
    assert_nothing_written(paths)
    assert bank.is_file()  # the user's file is left alone


def test_malformed_yaml_config(capsys, paths, tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("dataset: synthetic\nepochs: [1, 2\n")
    expect_user_error(capsys, train_args(paths, "--config", str(config)), str(config), "YAML")
    assert_nothing_written(paths)


def test_config_that_is_not_a_mapping(capsys, paths, tmp_path):
    config = tmp_path / "list.yaml"
    config.write_text("- synthetic\n- 3\n")
    expect_user_error(capsys, train_args(paths, "--config", str(config)), str(config))
    assert_nothing_written(paths)


def test_missing_config_file(capsys, paths, tmp_path):
    expect_user_error(capsys, train_args(paths, "--config", str(tmp_path / "nope.yaml")), "nope.yaml")
    assert_nothing_written(paths)


def test_unknown_config_field(capsys, paths, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("dataset: synthetic\nepocs: 3\n")
    expect_user_error(capsys, train_args(paths, "--config", str(config)), "epocs")
    assert_nothing_written(paths)


def test_config_value_of_wrong_type(capsys, paths, tmp_path):
    config = tmp_path / "types.yaml"
    config.write_text("dataset: synthetic\nlr: fast\n")
    expect_user_error(capsys, train_args(paths, "--config", str(config)), "lr")
    assert_nothing_written(paths)


def test_config_number_that_yaml_reads_as_a_string_is_accepted(tmp_path):
    # PyYAML reads 1e-3 (no dot) as the string '1e-3'; users mean the number.
    config = tmp_path / "types.yaml"
    config.write_text("dataset: synthetic\nlr: 1e-3\nepochs: 2\n")
    from rela.config import TrainConfig
    cfg = TrainConfig.from_yaml(config)
    assert cfg.lr == 0.001 and isinstance(cfg.lr, float) and cfg.epochs == 2


def test_bad_accelerator(capsys, paths):
    expect_user_error(capsys, train_args(paths, "--accelerator", "quantum"), "quantum")
    assert_nothing_written(paths)


def test_out_dir_holding_a_run_needs_resume(capsys, random_run):
    metrics = (random_run / "metrics.json").read_bytes()
    checkpoint = (random_run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    args = ["train", *TINY, "--out", str(random_run), "--cache-dir", str(random_run.parent / "cache")]
    err = expect_user_error(capsys, args, str(random_run))
    assert "--resume" in err
    assert (random_run / "metrics.json").read_bytes() == metrics
    assert (random_run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == checkpoint


def test_out_path_that_is_a_file(capsys, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    expect_user_error(capsys, ["train", *TINY, "--out", str(target)], str(target))
    assert target.read_text() == "x"


def test_eval_on_a_folder_that_is_not_a_run(capsys, tmp_path):
    folder = tmp_path / "just-a-folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    expect_user_error(capsys, ["eval", str(folder), "--no-progress"], str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    expect_user_error(capsys, ["eval", str(tmp_path / "missing-run"), "--no-progress"], "missing-run")


def test_eval_on_a_run_without_backbone(capsys, tmp_path, random_run):
    run = tmp_path / "half-run"
    run.mkdir()
    (run / "config.yaml").write_bytes((random_run / "config.yaml").read_bytes())
    expect_user_error(capsys, ["eval", str(run), "--no-progress"], "backbone.pt")


def test_train_prints_a_summary(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--probe-every", "0", "--out", str(out),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    stdout = capsys.readouterr().out
    assert f"{round(0.3 * 512) // 32} steps" in stdout and str(out) in stdout


def test_console_script_exit_code_without_traceback(tmp_path):
    out = tmp_path / "never-created"
    env = {k: v for k, v in os.environ.items() if k != "RELA_DATA"}
    proc = subprocess.run(
        [sys.executable, "-m", "rela", "train", "--dataset", "no-such-dataset", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "rela: error:" in proc.stderr and "no-such-dataset" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "three"])
    assert e.value.code == 2
    assert "three" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_version_and_no_bench_subcommand(capsys):
    import rela

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"rela {rela.__version__}"
    with pytest.raises(SystemExit) as e:  # benchmarks are scripts of the checkout, not commands of the package
        main(["bench", "table1"])
    assert e.value.code == 2
