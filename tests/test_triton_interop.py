"""The cloud model on a real Triton Inference Server (nvidia-pytriton) answers v2 requests like ours.

Triton parses, validates, queues and batches the requests (NVIDIA's C++ server); only the batched
model call is our Python. Probabilities must equal ``OnnxClassifier.predict_proba`` on the same
inputs, so the router can escalate to Triton and get the same answers.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton not installed")

from oip.protocol import InferenceResponse, decode_tensor, encode_tensor, model_path  # noqa: E402
from cloud_service.triton import MODEL_NAME, TritonModelServer  # noqa: E402
from router_tools.datasets import load_test  # noqa: E402

pytestmark = pytest.mark.timeout(120)

HTTP_TIMEOUT = httpx.Timeout(20.0)
BATCH_WINDOW_US = 200_000  # a wide batching window so concurrent requests surely share executions


@pytest.fixture(scope="module")
def triton_fp32():
    with TritonModelServer(max_batch_size=16, max_queue_delay_us=BATCH_WINDOW_US, startup_timeout_s=90) as srv:
        yield srv


@pytest.fixture(scope="module")
def triton_uint8():
    with TritonModelServer(input_datatype="UINT8", max_batch_size=8, max_queue_delay_us=0, startup_timeout_s=90) as srv:
        yield srv


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_test().images[:12]


def _infer(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + model_path(MODEL_NAME) + "/infer", json=body, timeout=HTTP_TIMEOUT)


def test_health_and_metadata(triton_fp32):
    base = triton_fp32.url
    assert base.startswith("http://127.0.0.1:")
    for path in ("/v2/health/live", "/v2/health/ready", model_path(MODEL_NAME) + "/ready"):
        assert httpx.get(base + path, timeout=HTTP_TIMEOUT).status_code == 200, path
    server = httpx.get(base + "/v2", timeout=HTTP_TIMEOUT).json()
    assert server["name"] == "triton"  # the one thing that tells it apart from our service
    meta = httpx.get(base + model_path(MODEL_NAME), timeout=HTTP_TIMEOUT).json()
    assert meta["name"] == MODEL_NAME
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
    ]
    assert httpx.get(base + model_path("no-such-model"), timeout=HTTP_TIMEOUT).status_code == 404


def test_probabilities_equal_onnx_classifier(triton_fp32, images):
    clf = triton_fp32.classifier
    x = clf.preprocess_batch(list(images))
    response = _infer(triton_fp32.url, {
        "id": "req-7",
        "inputs": [encode_tensor("input", x)],
        "outputs": [{"name": "probabilities"}],
    })
    assert response.status_code == 200, response.text
    parsed = InferenceResponse.model_validate(response.json())
    assert parsed.id == "req-7" and parsed.model_name == MODEL_NAME
    (out,) = parsed.outputs
    assert out.name == "probabilities" and out.datatype == "FP32" and out.shape == [len(images), 10]
    probs = decode_tensor(out)
    np.testing.assert_allclose(probs, clf.predict_proba(x), atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_nested_data_budget_parameter_and_all_outputs(triton_fp32, images):
    clf = triton_fp32.classifier
    x = clf.preprocess_batch(list(images[:2]))
    body = {
        "parameters": {"timeout": 5_000_000},  # the router's remaining budget, µs
        "inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": x.tolist()}],
    }
    response = _infer(triton_fp32.url, body)
    assert response.status_code == 200, response.text
    outputs = {o.name: decode_tensor(o) for o in InferenceResponse.model_validate(response.json()).outputs}
    assert set(outputs) == {"probabilities", "logits"}  # no `outputs` in the request: all of them
    np.testing.assert_allclose(outputs["probabilities"], clf.predict_proba(x), atol=1e-5)
    np.testing.assert_allclose(outputs["logits"], clf.logits(x), atol=1e-5)


def test_independent_client_library(triton_fp32, images):
    tritonclient_http = pytest.importorskip("tritonclient.http")
    clf = triton_fp32.classifier
    x = clf.preprocess_batch(list(images[:3]))
    client = tritonclient_http.InferenceServerClient(triton_fp32.url.removeprefix("http://"), network_timeout=20.0)
    try:
        assert client.is_model_ready(MODEL_NAME)
        tensor = tritonclient_http.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)  # the binary tensor extension
        result = client.infer(MODEL_NAME, [tensor], outputs=[tritonclient_http.InferRequestedOutput("probabilities")])
        np.testing.assert_allclose(result.as_numpy("probabilities"), clf.predict_proba(x), atol=1e-5)
    finally:
        client.close()


def test_bad_requests_are_rejected_and_server_stays_healthy(triton_fp32):
    url = triton_fp32.url
    wrong_shape = {"inputs": [{"name": "input", "shape": [1, 1, 28, 27], "datatype": "FP32", "data": [0.0] * 756}]}
    wrong_type = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]}
    for body in (wrong_shape, wrong_type):
        response = _infer(url, body)
        assert response.status_code == 400, response.text
        assert "error" in response.json()
    # Triton answers these with 500, not 400: clients must not read 500 as "server broken".
    short = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 10}]}
    assert _infer(url, short).status_code >= 400
    assert httpx.get(url + "/v2/health/ready", timeout=HTTP_TIMEOUT).status_code == 200


def test_dynamic_batching_coalesces_concurrent_requests(triton_fp32, images):
    clf = triton_fp32.classifier
    x = clf.preprocess_batch(list(images[:8]))
    before = _counts(triton_fp32.metrics_url)

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=triton_fp32.url, timeout=HTTP_TIMEOUT) as client:
            return await asyncio.gather(*(
                client.post(model_path(MODEL_NAME) + "/infer", json={"inputs": [encode_tensor("input", x[i:i + 1])]})
                for i in range(len(x))
            ))

    responses = asyncio.run(fire())
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(_probabilities(response), clf.predict_proba(x[i:i + 1]), atol=1e-5)
    after = _counts(triton_fp32.metrics_url)
    inferences = after["nv_inference_count"] - before["nv_inference_count"]
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert inferences == len(x)
    assert executions < inferences, f"{inferences} requests ran in {executions} executions: no batching"


def test_uint8_input_when_declared(triton_uint8, images):
    meta = httpx.get(triton_uint8.url + model_path(MODEL_NAME), timeout=HTTP_TIMEOUT).json()
    assert meta["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    clf = triton_uint8.classifier
    pixels = np.ascontiguousarray(images[:4, None])  # raw uint8 [N, 1, 28, 28]
    response = _infer(triton_uint8.url, {"inputs": [encode_tensor("input", pixels)]})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(_probabilities(response), clf.classify(list(images[:4])), atol=1e-5)
    # One datatype per input on Triton: FP32 to a UINT8 input is refused.
    fp32 = {"inputs": [encode_tensor("input", clf.preprocess_batch(list(images[:1])))]}
    assert _infer(triton_uint8.url, fp32).status_code == 400


def _probabilities(response: httpx.Response) -> np.ndarray:
    outputs = InferenceResponse.model_validate(response.json()).outputs
    return decode_tensor(next(o for o in outputs if o.name == "probabilities"))


def _counts(metrics_url: str) -> dict[str, float]:
    text = httpx.get(metrics_url, timeout=HTTP_TIMEOUT).text
    counts = {"nv_inference_count": 0.0, "nv_inference_exec_count": 0.0}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in counts and f'model="{MODEL_NAME}"' in rest:
            counts[name] += float(line.rsplit(" ", 1)[1])
    return counts


@pytest.mark.parametrize("server", ["triton_fp32", "triton_uint8"])
def test_router_escalates_to_triton(server, images, request):
    """The router, pointed at Triton, follows its metadata (FP32 or UINT8 input) and gets our answers."""
    from router import Router
    from router.policy import parse_policy

    srv = request.getfixturevalue(server)
    policy = parse_policy({
        "mode": "cloud_only",
        "default_deadline_ms": 10_000,  # a hang bound on a busy 2-core machine, not a speed goal
        "cloud": {"endpoints": [{"name": "triton", "url": srv.url, "model": MODEL_NAME, "input_datatype": "auto"}],
                  "per_try_timeout_ms": 10_000},
        "decision_log": False,
    })
    expected = srv.classifier.classify(list(images[:5]))
    with Router(policy) as router:
        predictions = router.predict_batch(list(images[:5]))
    for p, want in zip(predictions, expected):
        assert p.source == "cloud" and not p.fallback, p
        assert p.endpoint == "triton"
        np.testing.assert_allclose(p.probabilities, want, atol=1e-5)
        assert p.class_index == int(np.argmax(want))
