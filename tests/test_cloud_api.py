"""The cloud service's Open Inference Protocol v2 REST API, over real sockets.

One real service (uvicorn in a subprocess, loopback) for the module. Answers are compared with
``OnnxClassifier`` run in the test process on the same inputs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from oip.protocol import InferenceResponse, ModelMetadataResponse, ServerMetadataResponse
from edge_model.preprocess import normalise
from edge_model.runtime import OnnxClassifier
from tests.support.cloud import (
    MODEL,
    client,
    infer_path,
    metric,
    metrics,
    output,
    running_service,
    sample_pixels,
    v2_body,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def svc():
    with running_service() as s:
        yield s


@pytest.fixture(scope="module")
def http(svc):
    with client(svc) as c:
        yield c


@pytest.fixture(scope="module")
def clf() -> OnnxClassifier:
    from cloud_service.settings import DEFAULT_MANIFEST

    return OnnxClassifier(DEFAULT_MANIFEST)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return sample_pixels(5)


# ----------------------------------------------------------------------------- health and metadata

def test_health(http):
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200
    assert http.get(f"/v2/models/{MODEL}/ready").status_code == 200


def test_server_metadata(http):
    r = http.get("/v2")
    assert r.status_code == 200
    meta = ServerMetadataResponse.model_validate(r.json())
    assert meta.name and meta.version
    assert "binary_tensor_data" in meta.extensions


def test_model_metadata(http, clf):
    r = http.get(f"/v2/models/{MODEL}")
    assert r.status_code == 200
    raw = r.json()
    meta = ModelMetadataResponse.model_validate(raw)
    assert meta.name == MODEL
    assert meta.versions == [clf.version]  # from the manifest, not hard-coded
    assert meta.platform == "onnx_onnxv1"
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("input", "FP32", [-1, 1, 28, 28])]
    assert ("probabilities", "FP32", [-1, 10]) in [(t.name, t.datatype, t.shape) for t in meta.outputs]
    assert "UINT8" in raw["inputs"][0]["parameters"]["accepted_datatypes"]
    assert raw["parameters"]["accepts_uint8_pixels"] is True


def test_version_routes(http, clf):
    v = clf.version
    assert http.get(f"/v2/models/{MODEL}/versions/{v}").json()["name"] == MODEL
    assert http.get(f"/v2/models/{MODEL}/versions/{v}/ready").status_code == 200
    r = http.post(infer_path(MODEL, v), json=v2_body(sample_pixels(1)))
    assert r.status_code == 200 and r.json()["model_version"] == v


@pytest.mark.parametrize("path", [
    "/v2/models/nope", "/v2/models/nope/ready", "/v2/models/fashion-mnist/versions/999",
    "/v2/models/fashion-mnist/versions/999/ready",
])
def test_unknown_model_or_version_is_404(http, path):
    r = http.get(path)
    assert r.status_code == 404
    assert "error" in r.json()


def test_infer_unknown_model_or_version_is_404(http):
    for path in (infer_path("nope"), infer_path(MODEL, "999")):
        r = http.post(path, json=v2_body(sample_pixels(1)))
        assert r.status_code == 404 and "error" in r.json()


def test_unknown_endpoint_and_method_answer_json(http):
    r = http.get("/v2/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = http.get(infer_path())  # infer is POST only
    assert r.status_code == 405 and "error" in r.json()


# ----------------------------------------------------------------------------- inference

@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("layout", ["NCHW", "NHW"])
def test_uint8_pixels(http, clf, pixels, nested, layout):
    arr = pixels[:, None] if layout == "NCHW" else pixels
    r = http.post(infer_path(), json=v2_body(arr, nested=nested, request_id="u8"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "u8" and body["model_name"] == MODEL and body["model_version"] == clf.version
    probs = output(body, "probabilities")
    assert probs.shape == (len(pixels), 10) and probs.dtype == np.float32
    expected = clf.predict_proba(normalise(pixels[:, None], clf.preprocess_config))
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_fp32_normalised(http, clf, pixels, nested):
    x = clf.preprocess_batch(list(pixels))
    r = http.post(infer_path(), json=v2_body(x, nested=nested))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(output(r.json(), "probabilities"), clf.predict_proba(x), atol=1e-5)


def test_single_image_and_outputs_filter(http, clf, pixels):
    x = clf.preprocess_batch(list(pixels[:1]))
    r = http.post(infer_path(), json=v2_body(x, outputs=["probabilities"]))
    assert [o["name"] for o in r.json()["outputs"]] == ["probabilities"]
    r = http.post(infer_path(), json=v2_body(x, outputs=["logits"]))
    assert [o["name"] for o in r.json()["outputs"]] == ["logits"]
    np.testing.assert_allclose(output(r.json(), "logits"), clf.logits(x), atol=1e-4)
    r = http.post(infer_path(), json=v2_body(x))  # none requested: all outputs, as the protocol says
    assert sorted(o["name"] for o in r.json()["outputs"]) == ["logits", "probabilities"]
    assert "id" not in r.json()  # none sent, none echoed


def test_response_parses_as_protocol_type(http, pixels):
    r = http.post(infer_path(), json=v2_body(pixels, request_id="x"))
    resp = InferenceResponse.model_validate_json(r.content)
    assert resp.id == "x" and resp.outputs[0].shape[0] == len(pixels)


def test_timeout_parameter_with_budget_is_served(http, pixels):
    r = http.post(infer_path(), json=v2_body(pixels[:1], timeout_us=5_000_000))
    assert r.status_code == 200


def test_binary_tensor_extension(http, clf, pixels):
    """Triton's binary extension: JSON header + raw tensor bytes, both ways."""
    header = {
        "id": "bin",
        "inputs": [{"name": "input", "shape": [len(pixels), 28, 28], "datatype": "UINT8",
                    "parameters": {"binary_data_size": pixels.nbytes}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    r = http.post(infer_path(), content=head + pixels.tobytes(),
                  headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(r.content[:n])
    assert meta["id"] == "bin"
    (out,) = meta["outputs"]
    assert out["parameters"]["binary_data_size"] == len(pixels) * 10 * 4
    probs = np.frombuffer(r.content[n:], dtype="<f4").reshape(out["shape"])
    np.testing.assert_allclose(probs, clf.predict_proba(normalise(pixels[:, None], clf.preprocess_config)), atol=1e-5)


def test_binary_extension_size_mismatch_is_400(http, pixels):
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8",
                                   "parameters": {"binary_data_size": 784}}]}).encode()
    for tail in (pixels[0].tobytes()[:700], pixels[0].tobytes() + b"extra"):
        r = http.post(infer_path(), content=head + tail, headers={"Inference-Header-Content-Length": str(len(head))})
        assert r.status_code == 400 and "error" in r.json()


# ----------------------------------------------------------------------------- bad requests -> 400

def _bad(**changes):
    body = v2_body(sample_pixels(1))
    body["inputs"][0].update(changes)
    return body


@pytest.mark.parametrize("body, fragment", [
    (_bad(shape=[1, 27, 28]), "shape"),
    (_bad(shape=[1, 784]), "shape"),
    (_bad(shape=[0, 28, 28], data=[]), "batch"),
    (_bad(shape=[2, 28, 28]), "elements"),
    (_bad(datatype="FP64"), "datatype"),
    (_bad(datatype="BYTES"), "datatype"),
    (_bad(datatype="NOPE"), "datatype"),
    (_bad(name="image"), "input"),
    (_bad(data=[300] * 784), "range"),
    (_bad(data=[0.5] * 784), "integer"),
    (_bad(data=["a"] * 784), "number"),
    (_bad(data=[[0] * 28] * 27 + [[0] * 27]), "data"),
    ({"inputs": []}, "input"),
    ({"inputs": [{"name": "input"}]}, "inputs"),
    ({"nothing": 1}, "inputs"),
    ({**v2_body(sample_pixels(1)), "outputs": [{"name": "nope"}]}, "output"),
    ({**v2_body(sample_pixels(1)), "parameters": {"timeout": -5}}, "timeout"),
    ({**v2_body(sample_pixels(1)), "parameters": {"timeout": "soon"}}, "timeout"),
])
def test_bad_requests_are_400_with_error(http, body, fragment):
    r = http.post(infer_path(), json=body)
    assert r.status_code == 400, r.text
    assert fragment.lower() in r.json()["error"].lower()


def test_nan_fp32_is_400(http):
    x = np.zeros((1, 1, 28, 28), np.float32)
    body = v2_body(x)
    raw = json.dumps(body).replace("0.0", "NaN", 1)  # Python's json writes NaN; pydantic reads it
    r = http.post(infer_path(), content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400


NESTING_BOMB = b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize("content", [b"", b"{", b"not json at all", b"[1, 2, 3]", b"\xff\xfe\x00", NESTING_BOMB],
                         ids=["empty", "open", "text", "array", "binary", "nesting-bomb"])
def test_malformed_json_is_400(http, content):
    r = http.post(infer_path(), content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]
    r = http.post(infer_path(), content=content, headers={"Inference-Header-Content-Length": str(len(content))})
    assert r.status_code == 400  # the binary extension's JSON header too
    assert http.get("/v2/health/ready").status_code == 200


def test_fp32_overflow_is_400(http):
    body = v2_body(np.zeros((1, 1, 28, 28), np.float32))
    body["inputs"][0]["data"] = [1e39] * 784  # finite in JSON, infinite as FP32
    r = http.post(infer_path(), json=body)
    assert r.status_code == 400 and "infinite" in r.json()["error"]


def test_errors_do_not_echo_payload(http):
    marker = 123456789
    body = _bad(data=[marker] * 784)  # out of range for UINT8
    r = http.post(infer_path(), json=body)
    assert r.status_code == 400 and str(marker) not in r.text


# ----------------------------------------------------------------------------- /metrics

def test_metrics_count_requests_by_route_and_status(svc, http):
    before = metrics(svc)
    http.post(infer_path(), json=v2_body(sample_pixels(2)))
    http.post(infer_path(), json={"nothing": 1})
    after = metrics(svc)
    route = "/v2/models/{model_name}/infer"
    for status in ("200", "400"):
        key = dict(endpoint=route, status=status)
        assert metric(after, "hybrid_cloud_requests_total", **key) == metric(before, "hybrid_cloud_requests_total", **key) + 1
    assert metric(after, "hybrid_cloud_inference_count_total", model=MODEL) >= metric(before, "hybrid_cloud_inference_count_total", model=MODEL) + 2
    assert any(k[0] == "hybrid_cloud_model_ready" and v == 1 for k, v in after.items())
    assert ("hybrid_cloud_queue_depth", (("model", MODEL),)) in after
