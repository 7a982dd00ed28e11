"""Shared helpers for tests that run the real cloud service (``tests/test_cloud_*.py``).

Services are real: ``LocalService`` starts ``python -m cloud_service`` on a loopback socket it
bound itself and waits for ``/v2/health/ready``; tests talk to it with httpx over sockets.
"""

from __future__ import annotations

import io
import struct
import zlib
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator, Optional

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from cloud_service.launch import LocalService

MODEL = "fashion-mnist"
TIMEOUT = httpx.Timeout(20.0)


@contextmanager
def running_service(overrides: Optional[dict[str, Any]] = None, **kwargs) -> Iterator[LocalService]:
    """A started service; stopped (gracefully) on exit whatever happens."""
    svc = LocalService(overrides=overrides, **kwargs)
    try:
        yield svc.start()
    finally:
        svc.stop()


def client(svc: LocalService, **kwargs) -> httpx.Client:
    return httpx.Client(base_url=svc.url, timeout=TIMEOUT, trust_env=False, **kwargs)


def async_client(svc: LocalService, **kwargs) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    return httpx.AsyncClient(base_url=svc.url, timeout=TIMEOUT, trust_env=False, limits=limits, **kwargs)


def infer_path(model: str = MODEL, version: Optional[str] = None) -> str:
    from oip.protocol import model_path

    return model_path(model, version) + "/infer"


def v2_body(
    arr: np.ndarray,
    *,
    datatype: Optional[str] = None,
    nested: bool = False,
    request_id: Optional[str] = None,
    outputs: Optional[list[str]] = None,
    timeout_us: Optional[int] = None,
    name: str = "input",
) -> dict:
    """A v2 JSON inference request for ``arr`` (its shape is the tensor shape)."""
    datatype = datatype or {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32"}[arr.dtype]
    body: dict[str, Any] = {
        "inputs": [{"name": name, "shape": list(arr.shape), "datatype": datatype,
                    "data": arr.tolist() if nested else arr.ravel().tolist()}]
    }
    if request_id is not None:
        body["id"] = request_id
    if outputs is not None:
        body["outputs"] = [{"name": n} for n in outputs]
    if timeout_us is not None:
        body["parameters"] = {"timeout": timeout_us}
    return body


def output(response_json: dict, name: str) -> np.ndarray:
    from oip.protocol import ResponseOutput, decode_tensor

    for out in response_json["outputs"]:
        if out["name"] == name:
            return decode_tensor(ResponseOutput.model_validate(out))
    raise KeyError(name)


def metrics(svc: LocalService) -> dict[tuple[str, tuple], float]:
    """``/metrics`` as ``{(sample_name, sorted label items): value}``."""
    text = httpx.get(svc.url + "/metrics", timeout=TIMEOUT, trust_env=False).text
    values: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def metric(values: dict, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def assert_healthy(svc: LocalService) -> None:
    """The process is alive and still answers readiness (after a hostile request)."""
    assert svc.running, f"service died:\n{svc.log_text()[-2000:]}"
    r = httpx.get(svc.url + "/v2/health/ready", timeout=TIMEOUT, trust_env=False)
    assert r.status_code == 200


# ----------------------------------------------------------------------------- images

@lru_cache(maxsize=1)
def _test_images() -> np.ndarray:
    from router_tools.datasets import load_test

    images = np.ascontiguousarray(load_test().images[:64])
    images.flags.writeable = False
    return images


def sample_pixels(n: int) -> np.ndarray:
    """``n`` (<= 64) real test-split images, ``uint8 [n, 28, 28]``."""
    return _test_images()[:n].copy()


def encode_image(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    """A syntactically valid grayscale PNG whose header claims ``width x height`` (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def zero_png(width: int, height: int) -> bytes:
    """A complete all-black PNG compressed row by row: megapixels in kilobytes."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    return png_declaring(width, height, b"".join(comp.compress(row) for _ in range(height)) + comp.flush())


def noisy_image(size: int = 96) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
