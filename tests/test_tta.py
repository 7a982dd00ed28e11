"""Flip test-time augmentation as an ONNX graph rewrite (needs the onnx package of the train extra)."""

import shutil

import numpy as np
import pytest

pytest.importorskip("onnx")

from edge_model.runtime import OnnxClassifier  # noqa: E402
from router_tools.train import add_flip_tta  # noqa: E402

SRC = "cloud_service/artifacts/cloud-fp32"


def test_tta_graph_averages_the_image_and_its_mirror(tmp_path):
    shutil.copy(f"{SRC}.onnx", tmp_path / "m.onnx")
    add_flip_tta(tmp_path / "m.onnx", tmp_path / "tta.onnx")
    import onnxruntime as ort

    plain = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    tta = ort.InferenceSession(str(tmp_path / "tta.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n in (1, 3, 8):  # the batch dimension stays dynamic
        x = rng.standard_normal((n, 1, 28, 28), dtype=np.float32)
        want = (plain.run(None, {"input": x})[0] + plain.run(None, {"input": x[..., ::-1].copy()})[0]) / 2
        got = tta.run(None, {"input": x})[0]
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, want, atol=1e-5)
    # a mirror image gets exactly the same answer
    x = rng.standard_normal((2, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(tta.run(None, {"input": x})[0], tta.run(None, {"input": x[..., ::-1].copy()})[0], atol=1e-5)
