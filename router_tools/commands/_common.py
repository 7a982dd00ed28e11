"""Command-line options shared by the commands (stdlib only: building a parser stays cheap)."""

from __future__ import annotations

import argparse


def add_data_arguments(p: argparse.ArgumentParser, default_split: str) -> None:
    """``--data DIR|CSV``, ``--split``, ``--limit``: the labeled set of calibrate and eval."""
    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="DIR|CSV",
                      help="labeled images: DIR/<label>/*.png|jpg or a CSV of path,label (default: the shipped split)")
    data.add_argument("--split", choices=["validation", "test"], default=default_split,
                      help=f"shipped split used without --data (default: {default_split})")
    data.add_argument("--limit", type=int, help="use only the first N images")
