"""``hybrid-router train edge|cloud`` -> :mod:`router_tools.train` (imports torch only in ``run``)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["edge", "cloud"])
    p.add_argument("--recipe", metavar="NAME",
                   help="a named recipe of that kind instead of its default, e.g. edge-1.1 (edge model 1.1.0, "
                        "written to router_tools/data/releases/edge-1.1.0/ unless --out says otherwise)")
    p.add_argument("--data-dir", help="directory with train-*-ubyte.gz (default: the Debian dataset-fashion-mnist path)")
    p.add_argument("--epochs", type=int, help="override the recipe's epoch count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="artifact directory (default: the package's artifacts/)")
    p.add_argument("--train-limit", type=int, help="train on the first N images only (smoke runs)")
    p.add_argument("--version", help="version string written into the manifest")
    p.add_argument("--member", type=int, action="append", metavar="I",
                   help="train only ensemble member I (repeatable); run members in parallel processes, then --package")
    p.add_argument("--package", action="store_true",
                   help="do not train: export and package from the member weights already in --out")
    p.add_argument("--apply-flip-tta", action="store_true",
                   help="do not train: turn the model already in --out (default: the shipped one) into its "
                        "horizontal-flip test-time-augmented version and re-measure it")


def run(args: argparse.Namespace) -> int:
    try:
        from router_tools import train
    except ImportError as exc:
        raise SystemExit(f"training needs torch and onnx: pip install torch==2.13.0 'hybrid-edge-router-tools[train]' ({exc})") from None
    if args.recipe and args.recipe not in train.RECIPES:
        raise SystemExit(f"unknown recipe {args.recipe!r}: choose one of {', '.join(train.RECIPES)}")
    if args.apply_flip_tta:
        from pathlib import Path

        out = Path(args.out) if args.out else train.DEFAULT_OUT[args.kind]
        train.apply_flip_tta(out / f"{args.kind}-fp32.json")
        return 0
    members = [] if args.package else args.member
    train.run(args.kind, data_dir=args.data_dir, epochs=args.epochs, seed=args.seed, out=args.out,
              train_limit=args.train_limit, version=args.version, members=members,
              recipe=args.recipe)
    return 0
