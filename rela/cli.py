"""Command line: ``rela train``, ``eval``, ``export``, ``demo``, ``diagnose``, ``rank-priors``, ``shard``.

User errors (bad names, missing files, values out of range) print one line and
exit with code 2; nothing is written before the inputs have been checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from rela.config import (DEFAULT_WHY, MOMENTUM_AFTER_SWITCH, RELA_AUGMENTS, SWITCH_AUG_AT, TRANSFER_HEADS, TrainConfig,
                         read_yaml)
from rela.console import console_scope
from rela.errors import RelaError
from rela.registry import (BACKBONES, BANK_DTYPES, DATASETS, LOGGERS, LR_SCHEDULES, METHODS, MOMENTUM_SCHEDULES,
                           PRESETS, PRIORS, SUBSETS, SWITCHES, Registry)

# CLI flag -> (type, help); a registry as help lists its names. Flags left out keep the config
# file's or the default value.
TRAIN_FLAGS = {
    "--dataset": (str, DATASETS),
    "--data-root": (str, "folder holding the dataset files (default: $RELA_DATA, then system paths)"),
    "--train-limit": (int, "use only the first N training images"),
    "--test-limit": (int, "use only the first N test images"),
    "--image-size": (int, "imagefolder: side length images are resized to"),
    "--data-mode": (str, "auto | memory | stream: decode the whole set into RAM, or per sample in DataLoader "
                         "workers (auto: memory when the decoded set fits 25%% of RAM)"),
    "--num-workers": (int, "stream mode: DataLoader worker processes (default: cores - 1, at most 8)"),
    "--prefetch-factor": (int, "stream mode: batches each worker prepares ahead (default 2)"),
    "--augment-on": (str, "stream mode: device (default: workers decode, the training device augments whole batches as in memory mode) | workers (workers also augment each sample, torchvision v2)"),
    "--labels": (str, "auto | folders | none: how imagefolder:DIR is labelled; auto: one sub-folder per class, "
                      "or unlabelled when images sit directly in DIR; folders: require class folders; none: every "
                      "image under DIR, unlabelled (nested folders that are not classes)"),
    "--holdout": (int, "validation mode: train without the last N training images and evaluate on them"),
    "--backbone": (str, BACKBONES),
    "--method": (str, METHODS),
    "--prior": (str, PRIORS),
    "--prior-weights": (str, "local state_dict file for a torchvision/timm prior (offline use)"),
    "--prior-seed": (int, "seed of a random prior (default: --seed + 1)"),
    "--switch": (str, SWITCHES),
    "--bank": (str, "explicit bank file (default: content-keyed file in --cache-dir)"),
    "--cache-dir": (str, "folder for cached representation banks"),
    "--bank-dtype": (str, BANK_DTYPES),
    "--target-variance": (float, "keep the top target components explaining this share of the prior's variance, "
                                 "in (0, 1]; 1: all min(d, k)"),
    "--transfer-head": (str, f"{' | '.join(TRANSFER_HEADS)}: train the ReLA transfer head, or keep it a fixed "
                             "random map (the authors' code)"),
    "--switch-aug-at": (str, f"{' | '.join(SWITCH_AUG_AT)}: the base method's augmentations replace ReLA's from the "
                             "first step after the switch, or from the next epoch (the authors' code)"),
    "--rela-augment": (str, f"{' | '.join(RELA_AUGMENTS)}: the ReLA phase's views: the spec's (mild crops, strong "
                            "colour jitter), crops and flips only, or the base method's first view"),
    "--momentum-after-switch": (str, f"{' | '.join(MOMENTUM_AFTER_SWITCH)}: the momentum networks' schedule runs "
                                     "on across the hand-over, or starts again where the method's loss does"),
    "--ratio": (float, "fraction of the data drawn afresh every epoch, in (0, 1]"),
    "--subset": (str, SUBSETS),
    "--epochs": (int, "number of epochs (each over ratio * N images)"),
    "--max-steps": (int, "stop after this many optimizer steps (LR schedule spans them); 0: no training, the learner as initialised"),
    "--batch-size": (int, "images per optimizer step"),
    "--lr": (float, "peak AdamW learning rate (cosine schedule over the run's steps)"),
    "--weight-decay": (float, "AdamW weight decay"),
    "--warmup": (float, "fraction of steps for linear LR warm-up"),
    "--lr-schedule": (str, LR_SCHEDULES),
    "--momentum-schedule": (str, MOMENTUM_SCHEDULES),
    "--hidden-dim": (int, "hidden width of the base method's heads (default: the method's own, BYOL 1024)"),
    "--seed": (int, "seed for everything (CPU runs repeat exactly)"),
    "--out": (str, "output folder"),
    "--accelerator": (str, "auto | cpu | gpu"),
    "--devices": (int, "number of devices (processes) to train on"),
    "--num-nodes": (int, "number of machines (multi-node DDP; --devices is per machine)"),
    "--precision": (str, "auto | 32-true | 16-mixed | bf16-mixed (auto: bf16 on CUDA, fp32 on CPU)"),
    "--probe-every": (int, "epochs between k-NN probes for the cost curve (0: off)"),
    "--checkpoint-every": (int, "optimizer steps between mid-epoch checkpoints (0: epoch ends only)"),
    "--logger": (str, LOGGERS),
    "--log-every": (int, "optimizer steps between logged rows (losses, lambda, rho, lr, images/s, data wait)"),
}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"a shipped configuration, under --config and flags: {PRESETS.choices_help()}")
    p.add_argument("--config", help="YAML file of TrainConfig fields; flags override it")
    defaults = TrainConfig()
    for flag, (kind, help_text) in TRAIN_FLAGS.items():
        field = flag[2:].replace("-", "_")
        if isinstance(help_text, Registry):
            help_text = f"one of: {help_text.choices_help()}. Default: {getattr(defaults, field)}"
        if field in DEFAULT_WHY:  # the evidence behind the default, so a user can judge whether to change it
            why = DEFAULT_WHY[field].replace("%", "%%")  # argparse formats help with %
            help_text = (help_text if isinstance(help_text, str) and "Default:" in help_text
                         else f"{help_text}. Default: {getattr(defaults, field)}")
            help_text += f" (why: {why})"
        p.add_argument(flag, type=kind, default=None, help=help_text)
    p.add_argument("--download", action="store_true", default=None, help="allow torchvision to download CIFAR")
    p.add_argument("--resume", action="store_true", default=None, help="continue from OUT/checkpoints/last.ckpt")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    p.add_argument("--sync-batchnorm", action=argparse.BooleanOptionalAction, default=None,
                   help="batch-norm statistics over all processes (default: on when training on more than "
                        "one device; --no-sync-batchnorm for per-process statistics)")
    p.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="imagefolder/shards: leave out (and count) files that do not decode instead of stopping")
    p.add_argument("--verify-data", action="store_true", default=None,
                   help="imagefolder/shards: key the bank cache by every file's content (reads all bytes) "
                        "instead of file names, sizes and modification times")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = PRESETS.create(args.preset) if args.preset else {}
    fields.update(read_yaml(args.config) if args.config else {})
    source = " + ".join(s for s in (args.preset and f"preset {args.preset}", args.config) if s) or "config"
    cfg = TrainConfig.from_dict(fields, source=source)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return dataclasses.replace(cfg, **overrides)


def _cmd_train(args) -> int:
    from rela.train import train

    cfg = config_from_args(args)
    metrics = train(cfg)
    if metrics:
        print(f"trained {cfg.method} (prior {cfg.prior}): {metrics['steps']} steps, "
              f"{metrics['images_seen']} images, {metrics['train_seconds']:.1f} s training, "
              f"switch step {metrics['switch_step']}; outputs in {cfg.out}/")
        if metrics.get("skipped_images"):
            print(f"skipped {metrics['skipped_images']} image(s) that do not decode (--skip-bad-images)")
    return 0


def _cmd_eval(args) -> int:
    from rela.evaluate import evaluate_run

    m = evaluate_run(args.run, ks=tuple(args.k), linear_epochs=args.linear_epochs, data_root=args.data_root,
                     progress=args.progress)
    print(json.dumps({k: m[k] for k in sorted(m) if k.endswith("top1")}, indent=2))
    print(f"results added to {args.run}/metrics.json")
    return 0


def _cmd_export(args) -> int:
    from rela.export import export_backbone

    print(f"exported the backbone of {args.run} ({args.format}): {export_backbone(args.run, args.format, args.out)}")
    return 0


def _cmd_demo(args) -> int:
    from rela.demo import run_demo

    run_demo(out=args.out, epochs=args.epochs, ratio=args.ratio, seed=args.seed, data_root=args.data_root,
             train_limit=args.train_limit, progress=args.progress)
    return 0


def _study_data(args, needs_labels: bool):
    """Training and evaluation splits, learner dim and candidate priors of diagnose / rank-priors.

    ``needs_labels``: diagnose scores class labels on the test split; rank-priors is label-free and
    reads no test split (None), so it also ranks priors for an unlabelled folder.
    """
    from rela.build import choose_data_mode, load_data, require_labels
    from rela.diagnose import build_candidates, learner_dim, parse_weights

    cfg = TrainConfig(dataset=args.dataset, data_root=args.data_root, train_limit=args.train_limit,
                      test_limit=args.test_limit, backbone=args.backbone, data_mode=args.data_mode,
                      labels=args.labels, progress=args.progress).validate()
    if needs_labels:
        require_labels(cfg, "diagnose (its k-NN scores class labels; rank-priors is label-free)")
    mode = choose_data_mode(cfg)[0]  # a set too large for memory: features come through the streamed bank path
    train = load_data(cfg, "train", mode)
    test = load_data(cfg, "test", mode) if needs_labels else None
    candidates = build_candidates(args.models, train, backbone=args.backbone, seed=args.seed,
                                  weights=parse_weights(args.prior_weights))
    return train, test, learner_dim(args.backbone, train), candidates


def _cmd_diagnose(args) -> int:
    from rela.diagnose import diagnose, diagnose_markdown, write_diagnose

    train, test, dim, candidates = _study_data(args, needs_labels=True)
    report = diagnose(candidates, train, test, target_dim=dim, cache_dir=args.cache_dir,
                      pair_samples=args.pair_samples, seed=args.seed, progress=args.progress)
    print(diagnose_markdown(report))
    print("written: " + ", ".join(str(f) for f in write_diagnose(report, args.out)))
    return 0


def _cmd_rank_priors(args) -> int:
    from rela.diagnose import rank_markdown, rank_priors, write_rank

    train, _, dim, candidates = _study_data(args, needs_labels=False)
    report = rank_priors(candidates, train, target_dim=dim, cache_dir=args.cache_dir, samples=args.samples,
                         seed=args.seed, progress=args.progress, by=args.score)
    print(rank_markdown(report))
    print("written: " + ", ".join(str(f) for f in write_rank(report, args.out)))
    return 0


def _cmd_shard(args) -> int:
    from pathlib import Path

    from rela.data.files import image_folder, write_shards

    base = Path(args.folder)
    splits = ["train"] + (["test"] if any((base / n).is_dir() for n in ("test", "val")) else [])
    if not (base / "train").is_dir():  # a flat folder (of class folders, or unlabelled): one training split
        splits = ["train"]
    out = Path(args.out)
    for split in splits:
        files = image_folder(args.folder, split, args.labels)
        if files.unlabelled:
            print(f"{split}: unlabelled ({files.unlabelled}): the shards hold images without labels")
        dest = out / split if (base / "train").is_dir() else out
        index = write_shards(files, dest, args.samples_per_shard, progress=args.progress)
        size = sum(s["bytes"] for s in index["shards"])
        print(f"{split}: {index['samples']} images of {files.root} -> {len(index['shards'])} shard(s), "
              f"{size / 2**20:.1f} MiB in {dest}/")
    print(f"train on them with: rela train --dataset shards:{out} --data-mode stream")
    return 0


def _add_study_flags(p: argparse.ArgumentParser, models_flag: str, out: str) -> None:
    p.add_argument(models_flag, dest="models", nargs="+", required=True, metavar="SPEC",
                   help="prior specs, any but none: " + ", ".join(PRIORS.usages()[1:]))
    p.add_argument("--dataset", default="fashion-mnist", help=", ".join(DATASETS.usages()))
    p.add_argument("--data-root", default=None)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--data-mode", default="auto", help="auto | memory | stream, as for train")
    p.add_argument("--labels", default="auto", help="auto | folders | none: how imagefolder:DIR is labelled, "
                                                    "as for train")
    p.add_argument("--backbone", default="convnet",
                   help="learner whose feature dim sets the target dim m: " + ", ".join(BACKBONES.usages()))
    p.add_argument("--prior-weights", nargs="+", default=None, metavar="SPEC=FILE",
                   help="local weights for a torchvision/timm/open_clip model, e.g. timm:resnet18=r18.pth")
    p.add_argument("--seed", type=int, default=0, help="seed of random priors and of the sampling")
    p.add_argument("--cache-dir", default=".cache/rela")
    p.add_argument("--out", default=out)
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _version() -> str:
    """The installed distribution's version; the package's own when rela runs from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rela")
    except PackageNotFoundError:
        from rela import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rela", description="ReLA: the Representation Learning Accelerator")
    parser.add_argument("--version", action="version", version=f"rela {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a learner, with or without a ReLA prior")
    _add_train_flags(p)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("eval", help="k-NN and linear probe of a trained run on the test split")
    p.add_argument("run", help="output folder of 'rela train'")
    p.add_argument("--k", type=int, nargs="+", default=[20, 200], help="k values of the k-NN classifier")
    p.add_argument("--linear-epochs", type=int, default=50)
    p.add_argument("--data-root", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("export", help="write a run's backbone as safetensors or TorchScript, loadable without rela")
    p.add_argument("run", help="output folder of 'rela train' (or its backbone.pt)")
    p.add_argument("--format", default="safetensors", help="safetensors (weights + metadata, default) | "
                   "torchscript (the whole module, torch.jit.load)")
    p.add_argument("--out", default=None, help="file to write (default: RUN/backbone.safetensors or "
                                               "RUN/backbone.torchscript.pt)")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("demo", help="BYOL vs ReLA+BYOL at the same reduced budget on Fashion-MNIST")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--data-root", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("diagnose", help="transportability of models' representations on a dataset")
    _add_study_flags(p, "--models", "runs/diagnose")
    p.add_argument("--pair-samples", type=int, default=10000, help="images used for the pairwise R^2 and CKA")
    p.set_defaults(func=_cmd_diagnose)
    p = sub.add_parser("rank-priors", help="rank candidate priors by a label-free score, without training")
    _add_study_flags(p, "--priors", "runs/rank-priors")
    p.add_argument("--samples", type=int, default=2048, help="augmented views scored per prior")
    p.add_argument("--score", default="stability", help="stability | retrieval | effective_rank")
    p.set_defaults(func=_cmd_rank_priors)
    p = sub.add_parser("shard", help="convert an image folder into WebDataset tar shards (dataset shards:OUT)")
    p.add_argument("folder", help="image folder: one sub-folder per class, images directly inside (unlabelled), "
                                  "or train/ and test/ (or val/) of them")
    p.add_argument("out", help="output folder (train/ and test/ inside when the image folder has them)")
    p.add_argument("--labels", default="auto", help="auto | folders | none: how the folder is labelled, as "
                                                    "for train (auto: class sub-folders, or unlabelled when images "
                                                    "sit directly in it)")
    p.add_argument("--samples-per-shard", type=int, default=10_000,
                   help="images per tar file (default 10000: about 1 GB of ImageNet JPEGs)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_cmd_shard)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with console_scope():  # one-line warnings, third parties' that do not apply silenced: rela.console
            return args.func(args)
    except RelaError as e:
        print(f"rela: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rela: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
