"""``cloud_service.export_triton`` writes a stock-Triton/KServe model repository with calibration in the graph."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="exporting needs the onnx package (train extra)")

from cloud_service.export_triton import DEFAULT_MANIFEST, ExportError, export_model_repository  # noqa: E402
from router_tools.datasets import load_test  # noqa: E402
from edge_model.runtime import OnnxClassifier  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    out = tmp_path_factory.mktemp("model_repository")
    onnx_path = export_model_repository(out, max_batch_size=16, max_queue_size=8)
    return out, onnx_path


def test_layout_and_config(repository):
    out, onnx_path = repository
    assert onnx_path == out / "fashion-mnist" / "1" / "model.onnx"
    config = (out / "fashion-mnist" / "config.pbtxt").read_text()
    for needle in ('name: "fashion-mnist"', 'backend: "onnxruntime"', "max_batch_size: 16", 'name: "input"',
                   "dims: [ 1, 28, 28 ]", 'name: "probabilities"', 'name: "logits"', "dims: [ 10 ]", "dynamic_batching",
                   "max_queue_size: 8", "allow_timeout_override: true", "KIND_CPU"):
        assert needle in config, needle
    clf = OnnxClassifier(DEFAULT_MANIFEST)
    assert (out / "fashion-mnist" / "labels.txt").read_text().splitlines() == list(clf.labels)


def test_exported_graph_serves_calibrated_probabilities(repository):
    import onnxruntime as ort

    _, onnx_path = repository
    model = onnx.load(str(onnx_path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["probabilities", "logits"]
    clf = OnnxClassifier(DEFAULT_MANIFEST)
    x = clf.preprocess_batch(list(load_test().images[:32]))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probs, logits = session.run(["probabilities", "logits"], {"input": x})
    np.testing.assert_allclose(probs, clf.predict_proba(x), atol=1e-5)
    np.testing.assert_allclose(logits, clf.logits(x), atol=1e-5)


def test_refuses_to_overwrite(repository):
    out, _ = repository
    with pytest.raises(ExportError, match="exists"):
        export_model_repository(out)


def test_real_triton_parses_the_config(repository):
    """The tritonserver bundled by pytriton has no onnxruntime backend, but its parser is the real one."""
    pytest.importorskip("pytriton")
    from pytriton.triton import TRITONSERVER_DIST_DIR
    from pytriton.utils.distribution import get_libs_path

    out, _ = repository
    env = dict(os.environ, LD_LIBRARY_PATH=str(get_libs_path()))
    cmd = [str(TRITONSERVER_DIST_DIR / "bin" / "tritonserver"), f"--model-repository={out}",
           f"--backend-directory={TRITONSERVER_DIST_DIR / 'backends'}", "--allow-http=false", "--allow-grpc=false",
           "--allow-metrics=false", "--exit-on-error=true", "--exit-timeout-secs=1"]
    try:
        log = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30).stdout
    except subprocess.TimeoutExpired as exc:  # a build with the onnxruntime backend loads it and keeps serving
        log = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    assert "fashion-mnist" in log
    assert "Error parsing text-format" not in log and "failed to read text proto" not in log, log[-2000:]
