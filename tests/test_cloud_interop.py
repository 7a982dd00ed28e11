"""An independent Open Inference Protocol client (NVIDIA's ``tritonclient.http``) against our service.

tritonclient is written for Triton; if it can read our metadata and run inference -- JSON and
its default binary tensor mode, FP32 and UINT8, with its ``timeout`` parameter -- then standard
v2 clients interoperate with the service.
"""

from __future__ import annotations

import numpy as np
import pytest

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

from cloud_service.settings import DEFAULT_MANIFEST  # noqa: E402
from edge_model.preprocess import normalise  # noqa: E402
from edge_model.runtime import OnnxClassifier  # noqa: E402
from tests.support.cloud import MODEL, running_service, sample_pixels  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def triton_client():
    with running_service() as svc:
        c = httpclient.InferenceServerClient(url=f"127.0.0.1:{svc.port}", connection_timeout=20, network_timeout=20)
        try:
            yield c
        finally:
            c.close()


@pytest.fixture(scope="module")
def clf() -> OnnxClassifier:
    return OnnxClassifier(DEFAULT_MANIFEST)


def test_health_and_metadata(triton_client, clf):
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL)
    assert triton_client.is_model_ready(MODEL, model_version=clf.version)
    assert not triton_client.is_model_ready("no-such-model")
    server = triton_client.get_server_metadata()
    assert "binary_tensor_data" in server["extensions"]
    meta = triton_client.get_model_metadata(MODEL)
    assert meta["platform"] == "onnx_onnxv1" and meta["versions"] == [clf.version]
    assert meta["inputs"][0]["name"] == "input" and meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
    with pytest.raises(InferenceServerException) as info:
        triton_client.get_model_metadata("no-such-model")
    assert "unknown model" in info.value.message()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_fp32(triton_client, clf, binary):
    x = clf.preprocess_batch(list(sample_pixels(4)))
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    result = triton_client.infer(MODEL, [inp], outputs=[out], request_id="tc-1", timeout=5_000_000)
    assert result.get_response()["id"] == "tc-1"
    np.testing.assert_allclose(result.as_numpy("probabilities"), clf.predict_proba(x), atol=1e-5)
    assert result.as_numpy("logits") is None  # only what was asked for


def test_infer_uint8_binary_default_outputs(triton_client, clf):
    pixels = sample_pixels(3)[:, None]
    inp = httpclient.InferInput("input", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)  # tritonclient's default: binary tensor data
    result = triton_client.infer(MODEL, [inp])  # no outputs named: all, as binary
    probs = result.as_numpy("probabilities")
    np.testing.assert_allclose(probs, clf.predict_proba(normalise(pixels, clf.preprocess_config)), atol=1e-5)
    assert result.as_numpy("logits").shape == (3, 10)


def test_errors_surface_as_exceptions(triton_client):
    bad = httpclient.InferInput("input", [1, 27, 28], "UINT8")
    bad.set_data_from_numpy(np.zeros((1, 27, 28), np.uint8))
    with pytest.raises(InferenceServerException) as info:
        triton_client.infer(MODEL, [bad])
    assert info.value.status() == "400" and "shape" in info.value.message()
