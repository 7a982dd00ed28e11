"""Hostile input, limits, API keys and privacy of the real service.

Every hostile request must get a clear 4xx JSON answer quickly and leave the process healthy.
"""

from __future__ import annotations

import io
import json
import socket
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from cloud_service.launch import ServiceStartError
from cloud_service.settings import DEFAULT_MANIFEST
from edge_model.runtime import OnnxClassifier
from tests.support.cloud import (
    MODEL,
    assert_healthy,
    client,
    encode_image,
    infer_path,
    noisy_image,
    png_declaring,
    running_service,
    sample_pixels,
    v2_body,
    zero_png,
)

pytestmark = pytest.mark.timeout(60)

BODY_LIMIT = 256 * 1024
PIXEL_LIMIT = 4_000_000


@pytest.fixture(scope="module")
def svc():
    with running_service({"limits.max_body_bytes": BODY_LIMIT, "limits.max_pixels": PIXEL_LIMIT}) as s:
        yield s


@pytest.fixture(scope="module")
def http(svc):
    with client(svc) as c:
        yield c


@pytest.fixture(scope="module")
def clf() -> OnnxClassifier:
    return OnnxClassifier(DEFAULT_MANIFEST)


@pytest.fixture(scope="module")
def shirt_png() -> bytes:
    return encode_image(Image.fromarray(sample_pixels(1)[0]), "PNG")


# ----------------------------------------------------------------------------- /v1/classify

def _check_classification(body: dict, clf: OnnxClassifier, image: bytes) -> None:
    assert set(body) >= {"label", "class_index", "confidence", "probabilities", "model_version"}
    expected = clf.classify([image])[0]
    np.testing.assert_allclose(body["probabilities"], expected, atol=1e-5)
    assert body["class_index"] == int(np.argmax(expected))
    assert body["label"] == clf.labels[body["class_index"]]
    assert body["confidence"] == pytest.approx(float(expected.max()), abs=1e-5)
    assert body["model_version"] == clf.version


def test_classify_raw_body(http, clf, shirt_png):
    r = http.post("/v1/classify", content=shirt_png, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    _check_classification(r.json(), clf, shirt_png)


def test_classify_multipart_file(http, clf, shirt_png):
    r = http.post("/v1/classify", files={"file": ("shirt.png", shirt_png, "image/png")})
    assert r.status_code == 200, r.text
    _check_classification(r.json(), clf, shirt_png)


def test_classify_multipart_without_file_field_is_400(http, shirt_png):
    r = http.post("/v1/classify", files={"image": ("shirt.png", shirt_png, "image/png")})
    assert r.status_code == 400 and "'file'" in r.json()["error"]
    r = http.post("/v1/classify", data={"file": "not a file"}, files={"other": ("x", b"x")})
    assert r.status_code == 400


def _modes() -> list[tuple[str, bytes]]:
    rgb = Image.fromarray(np.stack([sample_pixels(1)[0]] * 3, axis=-1), "RGB")
    gray = rgb.convert("L")
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(200)
    return [
        ("RGB JPEG", encode_image(rgb, "JPEG", quality=90)),
        ("CMYK JPEG", encode_image(rgb.convert("CMYK"), "JPEG")),
        ("RGBA PNG", encode_image(rgba, "PNG")),
        ("LA PNG", encode_image(gray.convert("LA"), "PNG")),
        ("16-bit PNG", encode_image(sixteen, "PNG")),
        ("palette GIF", encode_image(rgb.convert("P"), "GIF")),
        ("1-bit BMP", encode_image(gray.convert("1"), "BMP")),
        ("big white-background photo", encode_image(Image.new("RGB", (1200, 900), "white"), "JPEG")),
    ]


@pytest.mark.parametrize("name, image", _modes(), ids=[m[0] for m in _modes()])
def test_wrong_modes_still_classify(svc, http, clf, name, image):
    r = http.post("/v1/classify", content=image)
    assert r.status_code == 200, f"{name}: {r.text}"
    _check_classification(r.json(), clf, image)
    assert_healthy(svc)


def _truncated(fmt: str) -> bytes:
    blob = encode_image(noisy_image(), fmt)
    return blob[: int(len(blob) * 0.6)]


@pytest.mark.parametrize("image, status", [
    (b"", 400),
    (b"\x00" * 100, 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"%PDF-1.7\n" + bytes(range(256)), 400),
    (_truncated("PNG"), 400),
    (_truncated("JPEG"), 400),
    (png_declaring(100_000, 100_000), 413),  # decompression bomb: 10^10 pixels declared in ~60 bytes
    (zero_png(3000, 3000), 413),  # 9 M real pixels in a few kB
], ids=["zero-bytes", "zeros", "http", "pdf", "truncated-png", "truncated-jpeg", "bomb-header", "bomb-compressed"])
def test_hostile_images_are_refused_quickly_and_the_service_survives(svc, http, image, status):
    t0 = time.monotonic()
    r = http.post("/v1/classify", content=image)
    elapsed = time.monotonic() - t0
    assert r.status_code == status, r.text
    assert r.json()["error"]
    assert elapsed < 10  # refused from the header, never decoded (a hang guard, not a speed test)
    assert_healthy(svc)


def test_bomb_in_multipart_is_refused(svc, http):
    r = http.post("/v1/classify", files={"file": ("bomb.png", png_declaring(50_000, 50_000), "image/png")})
    assert r.status_code == 413
    assert_healthy(svc)


# ----------------------------------------------------------------------------- body limit (413)

def test_body_over_limit_by_content_length_is_413(svc, http):
    r = http.post(infer_path(), content=b"{" + b" " * (BODY_LIMIT + 10) + b"}", headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    r = http.post("/v1/classify", content=b"\x00" * (BODY_LIMIT * 8))
    assert r.status_code == 413
    r = http.post("/v1/classify", files={"file": ("big.png", b"\x00" * (BODY_LIMIT * 2), "image/png")})
    assert r.status_code == 413
    assert_healthy(svc)


def test_declared_length_is_refused_before_the_body_is_sent(svc):
    """Only headers go out: the service must answer 413 without waiting for 10 GB."""
    with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as s:
        s.sendall(b"POST " + infer_path().encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10000000000\r\n\r\n{")
        reply = s.recv(65536).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply
    assert_healthy(svc)


def test_streamed_body_without_length_is_cut_at_the_limit(svc, http):
    sent = 0

    def chunks():
        nonlocal sent
        for _ in range(64):  # 4x the limit, chunked, no Content-Length
            sent += 16384
            yield b"\x00" * 16384

    r = http.post("/v1/classify", content=chunks())
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413
    assert_healthy(svc)


def test_batch_larger_than_max_batch_size_within_limits_is_served(http):
    pixels = np.tile(sample_pixels(16), (3, 1, 1))  # 48 rows (> max_batch_size 32) of UINT8 JSON, ~170 kB
    content = json.dumps(v2_body(pixels, outputs=["probabilities"])).encode()
    assert len(content) < BODY_LIMIT
    r = http.post(infer_path(), content=content)
    assert r.status_code == 200
    assert r.json()["outputs"][0]["shape"] == [48, 10]


# ----------------------------------------------------------------------------- API keys

KEY_FILE = "k" * 20 + "-from-settings"
KEY_ENV_A = "a" * 24
KEY_ENV_B = "b" * 24


@pytest.fixture(scope="module")
def secured():
    with running_service({"auth.api_keys": [KEY_FILE], "auth.api_keys_env": "TEST_CLOUD_KEYS"},
                         env={"TEST_CLOUD_KEYS": f"{KEY_ENV_A}, {KEY_ENV_B}"}) as s:
        yield s


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_health_and_metrics_stay_open(secured):
    with client(secured) as c:
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 200
        assert c.get("/metrics").status_code == 200


@pytest.mark.parametrize("headers", [
    {}, _auth("wrong-key-of-sufficient-length"), {"Authorization": KEY_ENV_A}, {"Authorization": f"Basic {KEY_ENV_A}"},
    _auth(KEY_ENV_A[:-1]), _auth(KEY_ENV_A + "x"), {"Authorization": "Bearer"},
], ids=["none", "wrong", "no-scheme", "basic", "prefix", "longer", "empty"])
def test_missing_or_wrong_key_is_401(secured, headers):
    with client(secured, headers=headers) as c:
        for method, path, kwargs in (
            ("GET", "/v2", {}),
            ("GET", f"/v2/models/{MODEL}", {}),
            ("GET", f"/v2/models/{MODEL}/ready", {}),
            ("POST", infer_path(), {"json": v2_body(sample_pixels(1))}),
            ("POST", "/v1/classify", {"content": b"x"}),
        ):
            r = c.request(method, path, **kwargs)
            assert r.status_code == 401, (path, r.text)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert "error" in r.json()


@pytest.mark.parametrize("key", [KEY_FILE, KEY_ENV_A, KEY_ENV_B])
def test_every_configured_key_works(secured, key):
    with client(secured, headers=_auth(key)) as c:
        assert c.get("/v2").status_code == 200
        assert c.post(infer_path(), json=v2_body(sample_pixels(1))).status_code == 200


def test_missing_key_variable_fails_closed():
    with pytest.raises(ServiceStartError) as info:
        with running_service({"auth.api_keys_env": "TEST_CLOUD_UNSET_VARIABLE"}, ready_timeout=30):
            pass
    assert "TEST_CLOUD_UNSET_VARIABLE" in str(info.value)


# ----------------------------------------------------------------------------- privacy

def test_no_payload_or_key_in_the_logs():
    """Run requests carrying distinctive values at debug log level; none of them may reach the log."""
    key = "privacy-test-key-" + "z" * 16
    marker_float = 0.7183459281
    marker_int = 187
    marker_id = "req-id-5550123"
    pixels = np.full((1, 28, 28), marker_int, np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels[0]).save(png, "PNG", optimize=False)
    image_text = b"tEXt-secret-marker-9911"
    with running_service({"server.log_level": "debug", "server.access_log": True, "auth.api_keys": [key]}) as svc:
        with client(svc, headers=_auth(key)) as c:
            x = np.full((1, 1, 28, 28), marker_float, np.float32)
            assert c.post(infer_path(), json=v2_body(x, request_id=marker_id)).status_code == 200
            assert c.post(infer_path(), json=v2_body(pixels)).status_code == 200
            assert c.post("/v1/classify", content=png.getvalue()).status_code == 200
            bad = v2_body(np.zeros((1, 28, 28), np.uint8))
            bad["inputs"][0]["data"] = [9876543] * 784
            assert c.post(infer_path(), json=bad).status_code == 400
            assert c.post("/v1/classify", content=image_text).status_code == 400
            raw = json.dumps(v2_body(x)).encode()
            assert c.post(infer_path(), content=raw[:-7]).status_code == 400  # malformed JSON
        with client(svc) as c:  # a wrong key
            assert c.get("/v2", headers=_auth(key[::-1])).status_code == 401
        logs = svc.log_text()
    assert "ready" in logs and "POST" in logs  # the log was captured, at debug level, with access lines
    for forbidden in (str(marker_float)[:8], f"{marker_int}, {marker_int}", f"{marker_int},{marker_int}",
                      "9876543", "secret-marker", key, key[::-1], marker_id):
        assert forbidden not in logs, f"{forbidden!r} leaked into the service log"
