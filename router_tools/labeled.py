"""Labeled image sets for ``calibrate`` and ``eval``: a shipped split, a folder or a CSV.

* a shipped split (``validation`` or ``test``, from :mod:`router_tools.datasets`);
* a folder ``DIR/<label>/*.png|jpg|jpeg`` -- ``<label>`` is a class name of the model, matched
  case-insensitively and ignoring punctuation and spaces (``t-shirt_top`` is ``T-shirt/top``,
  whose ``/`` cannot appear in a folder name), or a class index (``0`` .. ``9``);
* a CSV file of ``path,label`` rows (an optional header row ``path,label``); relative paths are
  relative to the CSV file; ``label`` as above.

Every image goes through the shared preprocessing (:func:`edge_model.preprocess.to_pixels`) to
the raw ``uint8 [H, W]`` pixels both models and the router consume. Problems raise
:class:`LabeledDataError` naming the path (and the CSV row); unreadable images are collected
and reported together rather than one per run.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from edge_model.errors import DatasetError, InputError
from edge_model.preprocess import PreprocessConfig, to_pixels
from router.errors import RouterError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # as model quantize reads
SHIPPED_SPLITS = ("validation", "test")
_MAX_LISTED = 5


class LabeledDataError(RouterError, DatasetError):
    """A labeled data set that cannot be used (missing, empty, unknown label, unreadable image)."""


@dataclass(frozen=True)
class LabeledSet:
    """``pixels`` ``uint8 [N, *config.pixel_shape]`` (``[N, H, W]`` for one-channel models) and ``labels`` ``int64 [N]``; ``paths`` when read from files."""

    name: str
    pixels: np.ndarray
    labels: np.ndarray
    paths: Optional[tuple[str, ...]] = None

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: Optional[int]) -> "LabeledSet":
        if n is None or n >= len(self):
            return self
        return LabeledSet(self.name, self.pixels[:n], self.labels[:n], self.paths[:n] if self.paths else None)

    def app_images(self, config: PreprocessConfig) -> np.ndarray:
        """The pixels as an app hands them to the router: ``[N, H, W]`` grey or ``[N, H, W, 3]`` RGB
        (numpy's image order), whatever the model's own layout and channel order."""
        return app_images(self.pixels, config)

    def subset(self, index: np.ndarray) -> "LabeledSet":
        paths = tuple(self.paths[i] for i in index) if self.paths else None
        return LabeledSet(self.name, self.pixels[index], self.labels[index], paths)


def app_images(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """``uint8 [N, *config.pixel_shape]`` (the model's layout and channel order) -> ``[N, H, W]`` or
    ``[N, H, W, 3]`` RGB, the form :meth:`router.Router.predict` takes numpy images in."""
    if config.channels == 1:
        return pixels
    rgb = pixels.transpose(0, 2, 3, 1) if config.layout == "NCHW" else pixels
    if config.color == "BGR":
        rgb = rgb[..., ::-1]
    return np.ascontiguousarray(rgb)


def load_labeled(data: str | os.PathLike | None = None, *, split: str = "validation",
                 labels: Sequence[str] | None = None, config: PreprocessConfig | None = None,
                 limit: Optional[int] = None) -> LabeledSet:
    """A folder or CSV file when ``data`` is given, else the shipped ``split``; the first ``limit``."""
    if limit is not None and limit < 1:
        raise LabeledDataError(f"limit must be a positive number of images; got {limit}")
    if labels is None:
        from router_tools.datasets import LABELS

        labels = LABELS
    if data is None:
        return load_split(split).head(limit)
    path = Path(data)
    if path.is_dir():
        return load_folder(path, labels, config, limit)
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise LabeledDataError(f"{path}: expected a folder DIR/<label>/*.png|jpg or a .csv file of path,label rows")
        return load_csv(path, labels, config, limit)
    raise LabeledDataError(f"{path}: no such folder or CSV file")


def load_split(split: str) -> LabeledSet:
    from router_tools.datasets import load_split as load

    if split not in SHIPPED_SPLITS:
        raise LabeledDataError(f"unknown split {split!r}; choose one of {', '.join(SHIPPED_SPLITS)}")
    try:
        s = load(split)
    except DatasetError as exc:
        raise LabeledDataError(f"shipped {split} split: {exc}") from exc
    return LabeledSet(f"shipped {split} split", s.images, s.labels)


def resolve_label(text: str, labels: Sequence[str]) -> int:
    """A class index from a label name (case/punctuation-insensitive) or an index; ``ValueError`` if neither."""
    raw = str(text).strip()
    if raw.isdigit():
        idx = int(raw)
        if idx < len(labels):
            return idx
        raise ValueError(f"label index {idx} out of range 0..{len(labels) - 1}")
    key = _norm(raw)
    for i, name in enumerate(labels):
        if key and key == _norm(name):
            return i
    raise ValueError(f"unknown label {raw!r} (known: {', '.join(labels)}, or an index 0..{len(labels) - 1})")


def _norm(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def load_folder(root: Path, labels: Sequence[str], config: PreprocessConfig | None = None,
                limit: Optional[int] = None) -> LabeledSet:
    items: list[tuple[Path, int]] = []
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise LabeledDataError(f"{root}: no label folders; expected {root}/<label>/*.png|jpg (label = class name or index)")
    for sub in subdirs:
        try:
            idx = resolve_label(sub.name, labels)
        except ValueError as exc:
            raise LabeledDataError(f"{sub}: folder name is not a class: {exc}") from None
        files = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not p.name.startswith("."))
        items += [(f, idx) for f in files]
    if not items:
        raise LabeledDataError(f"{root}: no images; expected {root}/<label>/*.png|jpg|jpeg")
    # Folders list one class after another: eval and demo would stream one class at a time and
    # --limit N would take one or two classes. Round-robin over the classes instead (deterministic).
    per_class: dict[int, list[tuple[Path, int]]] = {}
    for item in items:
        per_class.setdefault(item[1], []).append(item)
    queues = list(per_class.values())
    items = [q[k] for k in range(max(map(len, queues))) for q in queues if k < len(q)]
    if limit is not None:
        items = items[:limit]
    return _decode(str(root), items, config)


def load_csv(path: Path, labels: Sequence[str], config: PreprocessConfig | None = None,
             limit: Optional[int] = None) -> LabeledSet:
    items: list[tuple[Path, int]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabeledDataError(f"{path}: cannot read CSV ({exc})") from exc
    for lineno, row in enumerate(rows, start=1):
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 2:
            raise LabeledDataError(f"{path}:{lineno}: expected 'path,label', got {','.join(row)!r}")
        file_text, label_text = row[0].strip(), row[1].strip()
        if not items and file_text.lower() in ("path", "file", "filename", "image") and label_text.lower() in ("label", "class"):
            continue  # header
        try:
            idx = resolve_label(label_text, labels)
        except ValueError as exc:
            raise LabeledDataError(f"{path}:{lineno}: {exc}") from None
        file = Path(file_text)
        if not file.is_absolute():
            file = path.parent / file
        if not file.is_file():
            raise LabeledDataError(f"{path}:{lineno}: image file {file} not found")
        items.append((file, idx))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise LabeledDataError(f"{path}: no 'path,label' rows")
    return _decode(str(path), items, config)


def _decode(name: str, items: list[tuple[Path, int]], config: PreprocessConfig | None) -> LabeledSet:
    cfg = config or PreprocessConfig()
    pixels = np.empty((len(items), *cfg.pixel_shape), dtype=np.uint8)
    bad: list[str] = []
    for i, (file, _) in enumerate(items):
        try:
            pixels[i] = to_pixels(file, cfg)
        except InputError as exc:
            bad.append(f"{file}: {exc}")
    if bad:
        listed = "; ".join(bad[:_MAX_LISTED])  # one line: the CLI reports errors in one
        more = f"; ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise LabeledDataError(f"{name}: {len(bad)} of {len(items)} images cannot be read: {listed}{more}")
    return LabeledSet(name, pixels, np.array([idx for _, idx in items], dtype=np.int64),
                      tuple(str(f) for f, _ in items))
