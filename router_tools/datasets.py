"""The embedded default data set: Fashion-MNIST, shipped splits and the Debian source.

Shipped inside the package (``router_tools/data/fashion-mnist/``), so nothing is downloaded:

* ``t10k-*``: the official 10k test split, byte-identical to the upstream files;
* ``val-*``: 5k images held out of the 60k training set (never trained on), for temperature
  scaling and threshold calibration; ``splits.json`` records which training indices they are.

Training reads the 60k training set from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``) or a directory given on the command line and drops
the validation indices, leaving the 55k remainder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_model.errors import DatasetError
from router_tools.idx import read_idx

LABELS: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SHIPPED_DIR = Path(__file__).resolve().parent / "data" / "fashion-mnist"
SAMPLES_DIR = Path(__file__).resolve().parent / "data" / "samples"
VAL_SIZE = 5000
SPLIT_SEED = 20260


@dataclass(frozen=True)
class Split:
    """Images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` of one split."""

    name: str
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> "Split":
        if n is None or n >= len(self):
            return self
        return Split(self.name, self.images[:n], self.labels[:n])


def _load_pair(directory: Path, prefix: str, name: str) -> Split:
    images = read_idx(directory / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DatasetError(f"{directory}/{prefix}-images: expected uint8 [N, 28, 28], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(f"{directory}/{prefix}: {len(images)} images but labels of shape {labels.shape}")
    if labels.size and int(labels.max()) >= len(LABELS):
        raise DatasetError(f"{directory}/{prefix}-labels: label {int(labels.max())} out of range")
    return Split(name, images, labels.astype(np.int64))


def load_test() -> Split:
    """The official 10k test split shipped with the package."""
    return _load_pair(SHIPPED_DIR, "t10k", "test")


def load_validation() -> Split:
    """The 5k validation split held out of the training set, shipped with the package."""
    return _load_pair(SHIPPED_DIR, "val", "validation")


def load_split(name: str) -> Split:
    loaders = {"test": load_test, "validation": load_validation, "val": load_validation}
    try:
        return loaders[name]()
    except KeyError:
        raise DatasetError(f"unknown split {name!r}; choose one of test, validation") from None


def validation_indices() -> np.ndarray:
    """The indices into the upstream 60k training set that form the shipped validation split."""
    path = SHIPPED_DIR / "splits.json"
    try:
        meta = json.loads(path.read_text())
        idx = np.asarray(meta["validation_indices"], dtype=np.int64)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: unreadable split definition ({exc!r})") from exc
    if idx.ndim != 1 or len(np.unique(idx)) != len(idx) or (idx.size and idx.min() < 0):
        raise DatasetError(f"{path}: validation_indices must be unique non-negative integers")
    return idx


def load_train(source_dir: str | Path | None = None) -> Split:
    """The 55k training remainder: the upstream 60k minus the shipped validation indices."""
    directory = Path(source_dir or os.environ.get("FASHION_MNIST_DIR") or DEBIAN_DIR)
    full = _load_pair(directory, "train", "train-full")
    held_out = validation_indices()
    if held_out.size and held_out.max() >= len(full):
        # A different training file: the shipped indices would not mark the validation images.
        raise DatasetError(
            f"{directory}: training set has {len(full)} images but the shipped validation split "
            f"refers to index {int(held_out.max())}; expected the upstream 60k Fashion-MNIST training files"
        )
    keep = np.ones(len(full), dtype=bool)
    keep[held_out] = False
    return Split("train", full.images[keep], full.labels[keep])


def make_splits(source_dir: str | Path = DEBIAN_DIR, out_dir: str | Path = SHIPPED_DIR) -> None:
    """Write the shipped test/validation splits from the upstream files (run once by maintainers)."""
    import shutil

    from router_tools.idx import write_idx_gz

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = _load_pair(source_dir, "train", "train-full")
    rng = np.random.default_rng(SPLIT_SEED)
    # Stratified: 500 per class, so the validation split mirrors the test split's balance.
    idx = np.sort(
        np.concatenate(
            [rng.choice(np.flatnonzero(full.labels == c), VAL_SIZE // len(LABELS), replace=False) for c in range(len(LABELS))]
        )
    )
    write_idx_gz(out_dir / "val-images-idx3-ubyte.gz", full.images[idx])
    write_idx_gz(out_dir / "val-labels-idx1-ubyte.gz", full.labels[idx].astype(np.uint8))
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copyfile(source_dir / name, out_dir / name)
    (out_dir / "splits.json").write_text(
        json.dumps({"seed": SPLIT_SEED, "source": "train-images-idx3-ubyte.gz", "validation_indices": idx.tolist()})
    )
