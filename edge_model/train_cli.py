"""``hybrid-router train edge|cloud`` -> :mod:`edge_model.train` (imports torch only in ``run``)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["edge", "cloud"])
    p.add_argument("--data-dir", help="directory with train-*-ubyte.gz (default: the Debian dataset-fashion-mnist path)")
    p.add_argument("--epochs", type=int, help="override the recipe's epoch count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="artifact directory (default: the package's artifacts/)")
    p.add_argument("--train-limit", type=int, help="train on the first N images only (smoke runs)")
    p.add_argument("--version", help="version string written into the manifest")


def run(args: argparse.Namespace) -> int:
    try:
        from edge_model import train
    except ImportError as exc:
        raise SystemExit(f"training needs the train extra: pip install -e '.[train]' ({exc})") from None
    train.run(args.kind, data_dir=args.data_dir, epochs=args.epochs, seed=args.seed, out=args.out,
              train_limit=args.train_limit, version=args.version)
    return 0
