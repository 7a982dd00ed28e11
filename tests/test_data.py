"""The shipped Fashion-MNIST splits and the training remainder read from the Debian files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from router_tools import datasets as data
from edge_model.errors import DatasetError
from router_tools.idx import read_idx, write_idx_gz

DEBIAN_TRAIN = data.DEBIAN_DIR / "train-images-idx3-ubyte.gz"
needs_debian = pytest.mark.skipif(
    not (DEBIAN_TRAIN.is_file() and (data.DEBIAN_DIR / "train-labels-idx1-ubyte.gz").is_file()),
    reason=f"Debian dataset-fashion-mnist files not installed in {data.DEBIAN_DIR}",
)


@pytest.fixture(scope="module")
def test_split() -> data.Split:
    return data.load_test()


@pytest.fixture(scope="module")
def val_split() -> data.Split:
    return data.load_validation()


def test_labels():
    assert len(data.LABELS) == 10
    assert len(set(data.LABELS)) == 10
    assert data.LABELS[0] == "T-shirt/top" and data.LABELS[9] == "Ankle boot"


def _check_split(split: data.Split, n: int) -> None:
    assert len(split) == n
    assert split.images.dtype == np.uint8 and split.images.shape == (n, 28, 28)
    assert split.labels.dtype == np.int64 and split.labels.shape == (n,)
    assert split.labels.min() >= 0 and split.labels.max() < len(data.LABELS)
    # Real images, not blank placeholders: dark background, bright objects.
    assert split.images.max() == 255 and 0.2 < split.images.mean() / 255 < 0.4


def test_shipped_test_split(test_split):
    _check_split(test_split, 10_000)
    assert np.bincount(test_split.labels, minlength=10).tolist() == [1000] * 10


def test_shipped_validation_split_is_balanced(val_split):
    _check_split(val_split, 5_000)
    assert np.bincount(val_split.labels, minlength=10).tolist() == [500] * 10


def test_load_split_by_name(val_split):
    assert data.load_split("val").name == "validation"
    assert data.load_split("test").name == "test"
    with pytest.raises(DatasetError, match="unknown split 'train'"):
        data.load_split("train")


def test_head():
    split = data.load_validation()
    assert len(split.head(7)) == 7 and split.head(None) is split and split.head(10**6) is split
    np.testing.assert_array_equal(split.head(7).images, split.images[:7])


def test_splits_json_indices_unique_and_in_range():
    meta = json.loads((data.SHIPPED_DIR / "splits.json").read_text())
    raw = meta["validation_indices"]
    assert len(raw) == data.VAL_SIZE == len(set(raw))
    idx = data.validation_indices()
    assert idx.min() >= 0 and idx.max() < 60_000
    assert np.all(np.diff(idx) > 0)  # sorted, hence unique


def test_validation_and_test_images_are_distinct(val_split, test_split):
    # The validation split is held out of the *training* set: none of its images is a test image.
    test_rows = {img.tobytes() for img in test_split.images}
    overlap = sum(img.tobytes() in test_rows for img in val_split.images)
    assert overlap == 0


@needs_debian
def test_test_split_is_the_upstream_file():
    upstream = read_idx(data.DEBIAN_DIR / "t10k-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(upstream, data.load_test().images)


@needs_debian
def test_load_train_drops_the_validation_indices(val_split):
    full_images = read_idx(DEBIAN_TRAIN)
    full_labels = read_idx(data.DEBIAN_DIR / "train-labels-idx1-ubyte.gz")
    idx = data.validation_indices()
    # The shipped validation split is exactly those training images.
    np.testing.assert_array_equal(full_images[idx], val_split.images)
    np.testing.assert_array_equal(full_labels[idx], val_split.labels)

    train = data.load_train()
    assert len(train) == 55_000 and train.name == "train"
    keep = np.ones(60_000, dtype=bool)
    keep[idx] = False
    np.testing.assert_array_equal(train.images, full_images[keep])
    np.testing.assert_array_equal(train.labels, full_labels[keep])


def test_load_train_missing_directory(tmp_path):
    with pytest.raises(DatasetError, match="file not found") as info:
        data.load_train(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)


def test_load_train_from_a_directory_that_is_not_the_upstream_set(tmp_path):
    # A well-formed but smaller training set cannot have the validation indices removed.
    rng = np.random.default_rng(0)
    write_idx_gz(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (100, 28, 28), dtype=np.uint8))
    write_idx_gz(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 100, dtype=np.uint8))
    with pytest.raises(DatasetError, match="100 images") as info:
        data.load_train(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_mismatched_labels_are_refused(tmp_path):
    write_idx_gz(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28), dtype=np.uint8))
    write_idx_gz(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DatasetError, match="4 images but labels of shape"):
        data.load_train(tmp_path)


def test_out_of_range_labels_are_refused(tmp_path):
    write_idx_gz(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28), dtype=np.uint8))
    write_idx_gz(tmp_path / "train-labels-idx1-ubyte.gz", np.array([3, 10], dtype=np.uint8))
    with pytest.raises(DatasetError, match="label 10 out of range"):
        data.load_train(tmp_path)


def test_wrong_image_shape_is_refused(tmp_path):
    write_idx_gz(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 32, 32), dtype=np.uint8))
    write_idx_gz(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(2, dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"expected uint8 \[N, 28, 28\]"):
        data.load_train(tmp_path)
