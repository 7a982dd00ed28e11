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


def shipped_cloud_manifest():
    """The cloud model's manifest as installed with the server distribution.

    Raises a one-line ``ConfigError`` naming the install (or the options that avoid it) when the
    server is not installed: the tools run without it as long as they are given a cloud model.
    """
    try:
        from cloud_service.settings import DEFAULT_MANIFEST
    except ModuleNotFoundError:
        from router.errors import ConfigError

        raise ConfigError("the shipped cloud model comes with the server: pip install hybrid-edge-router-server, "
                          "or pass --cloud-manifest PATH (or --cloud-url URL)") from None
    return DEFAULT_MANIFEST
