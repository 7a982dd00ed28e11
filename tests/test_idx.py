"""IDX reader: round trips on real files, and every way a data file can be broken."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from edge_model.errors import DatasetError
from router_tools.idx import encode_idx, parse_idx, read_idx, write_idx_gz


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)


def test_round_trip_gzip(tmp_path, images):
    path = tmp_path / "x-images-idx3-ubyte.gz"
    write_idx_gz(path, images)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (5, 28, 28)
    np.testing.assert_array_equal(out, images)


def test_round_trip_plain(tmp_path, images):
    path = tmp_path / "x-images-idx3-ubyte"
    path.write_bytes(encode_idx(images))
    np.testing.assert_array_equal(read_idx(path), images)


def test_gzip_output_is_reproducible(tmp_path, images):
    # Same file name in two places: the gzip header records the name, and mtime is pinned to 0.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "x.gz", tmp_path / "b" / "x.gz"
    write_idx_gz(a, images)
    write_idx_gz(b, images)
    assert a.read_bytes() == b.read_bytes()


def test_labels_header_is_8_bytes(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    raw = encode_idx(labels)
    assert raw[:8] == b"\x00\x00\x08\x01" + struct.pack(">I", 10) and len(raw) == 18
    np.testing.assert_array_equal(parse_idx(raw), labels)


def test_big_endian_dtypes_are_native_after_parse():
    values = np.array([1, -2, 300000], dtype=">i4")
    raw = b"\x00\x00\x0c\x01" + struct.pack(">I", 3) + values.tobytes()
    out = parse_idx(raw)
    assert out.dtype == np.dtype("int32") and out.dtype.isnative
    assert out.tolist() == [1, -2, 300000]


def test_encode_refuses_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        encode_idx(np.zeros(3, dtype=np.int32))


def test_missing_file(tmp_path):
    path = tmp_path / "nope-idx3-ubyte.gz"
    with pytest.raises(DatasetError, match="file not found") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DatasetError, match="cannot read") as info:
        read_idx(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_corrupt_gzip_stream(tmp_path, images):
    data = bytearray(gzip.compress(encode_idx(images)))
    data[20:40] = bytes(b ^ 0xFF for b in data[20:40])  # damage the deflate stream
    path = tmp_path / "bad.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="corrupt gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_gzip_crc_mismatch(tmp_path, images):
    data = bytearray(gzip.compress(encode_idx(images)))
    data[-6] ^= 0x01  # the CRC32 trailer
    path = tmp_path / "crc.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="corrupt gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip(tmp_path, images):
    data = gzip.compress(encode_idx(images))
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="corrupt gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x01\x00\x08\x03" + b"\x00" * 12,  # non-zero leading bytes
        b"\x00\x00\x07\x03" + b"\x00" * 12,  # unknown dtype code
        b"\x00\x00\x08\x00",  # zero dimensions
        b"PK\x03\x04" + b"\x00" * 12,  # a zip file
    ],
    ids=["nonzero", "dtype", "ndim0", "zip"],
)
def test_bad_magic(tmp_path, raw):
    path = tmp_path / "bad-magic"
    path.write_bytes(raw)
    with pytest.raises(DatasetError, match="bad magic") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_too_short(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DatasetError, match="too short") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_header(tmp_path, images):
    path = tmp_path / "header.gz"
    path.write_bytes(gzip.compress(encode_idx(images)[:10]))  # 3 dims need 16 header bytes
    with pytest.raises(DatasetError, match="truncated IDX header") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_payload(tmp_path, images):
    path = tmp_path / "payload.gz"
    path.write_bytes(gzip.compress(encode_idx(images)[:-1]))
    with pytest.raises(DatasetError, match=r"payload is 3919 bytes but dimensions \[5, 28, 28\] need 3920") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_trailing_garbage(tmp_path, images):
    path = tmp_path / "extra"
    path.write_bytes(encode_idx(images) + b"\x00")
    with pytest.raises(DatasetError, match="payload is 3921 bytes"):
        read_idx(path)


def test_forged_huge_dimensions_do_not_allocate():
    # 4 x 2^32-1 dims: the size check must be done in exact integers, not wrapped int64.
    raw = b"\x00\x00\x08\x04" + struct.pack(">4I", *([0xFFFFFFFF] * 4)) + b"\x00" * 8
    with pytest.raises(DatasetError, match="payload is 8 bytes"):
        parse_idx(raw)
