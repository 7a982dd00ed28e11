"""Reader for the IDX files of (Fashion-)MNIST, plain or gzip-compressed.

Format (http://yann.lecun.com/exdb/mnist/): a 4-byte magic ``0x00 0x00 <dtype> <ndim>``,
``ndim`` big-endian uint32 dimensions, then the row-major payload. Fashion-MNIST images
are ``uint8 [N, 28, 28]`` (16-byte header), labels ``uint8 [N]`` (8-byte header).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from edge_model.errors import DatasetError

# IDX dtype codes -> big-endian numpy dtypes.
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(raw: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Parse an uncompressed IDX payload into a native-endian array."""
    if len(raw) < 4:
        raise DatasetError(f"{source}: too short to be an IDX file ({len(raw)} bytes)")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _DTYPES or ndim == 0:
        raise DatasetError(f"{source}: not an IDX file (bad magic {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{source}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _DTYPES[code]
    # Python ints: a forged header cannot overflow the size check.
    expected = math.prod(dims) * dtype.itemsize
    payload = len(raw) - header
    if payload != expected:
        raise DatasetError(
            f"{source}: IDX payload is {payload} bytes but dimensions {list(dims)} need {expected}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain). Raises :class:`DatasetError` with the path on failure."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; bad deflate data is zlib.error
            raise DatasetError(f"{path}: corrupt gzip stream ({exc})") from exc
    return parse_idx(data, source=str(path))


def encode_idx(arr: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX payload (used to write the shipped splits)."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype != np.uint8:
        raise ValueError("encode_idx writes uint8 arrays only")
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.tobytes()


def write_idx_gz(path: str | Path, arr: np.ndarray) -> None:
    # mtime=0 keeps the shipped files byte-for-byte reproducible.
    with open(path, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0) as gz:
        gz.write(encode_idx(arr))
