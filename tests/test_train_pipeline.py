"""The whole pipeline on a small subset: train -> export ONNX -> quantize INT8 -> calibrate -> load -> predict.

Needs the ``train`` extra (torch, onnx) and the Debian Fashion-MNIST training files.
The pipeline is real; only the evaluation splits are cut to their first images
(``router_tools.train.run`` scores every artifact on the whole validation and test splits,
which would take most of the time here).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from router_tools import datasets as data
from edge_model.manifest import Manifest, sha256_file
from edge_model.preprocess import preprocess_batch
from edge_model.runtime import OnnxClassifier, SessionOptions

_missing = [m for m in ("torch", "onnx") if importlib.util.find_spec(m) is None]
_train_files = [data.DEBIAN_DIR / f"train-{k}-ubyte.gz" for k in ("images-idx3", "labels-idx1")]

pytestmark = [
    pytest.mark.train,
    pytest.mark.timeout(300),
    pytest.mark.skipif(bool(_missing), reason=f"the train extra is not installed (missing: {', '.join(_missing)})"),
    pytest.mark.skipif(
        not all(p.is_file() for p in _train_files),
        reason=f"Fashion-MNIST training files not found in {data.DEBIAN_DIR} (Debian package dataset-fashion-mnist)",
    ),
]

EVAL_IMAGES = 600


@pytest.fixture(scope="module")
def edge_run(tmp_path_factory):
    from router_tools import train

    out = tmp_path_factory.mktemp("edge")
    manifest = train.run("edge", epochs=1, train_limit=2000, eval_limit=EVAL_IMAGES, out=out, version="test-edge", log=lambda _: None)
    return out, manifest


@pytest.fixture(scope="module")
def cloud_run(tmp_path_factory):
    from router_tools import train

    out = tmp_path_factory.mktemp("cloud")
    manifest = train.run("cloud", epochs=1, train_limit=384, eval_limit=EVAL_IMAGES, out=out, version="test-cloud", log=lambda _: None)
    return out, manifest


@pytest.fixture(scope="module")
def eval_inputs():
    split = data.load_test().head(EVAL_IMAGES)
    return preprocess_batch(split.images), split.labels


def _check_artifact(manifest_path, eval_inputs) -> OnnxClassifier:
    m = Manifest.load(manifest_path)
    onnx = manifest_path.parent / m.file
    assert m.sha256 == sha256_file(onnx)
    assert m.labels == list(data.LABELS) and m.temperature > 0 and m.input.shape == [-1, 1, 28, 28]
    model = OnnxClassifier(manifest_path, SessionOptions(warmup_runs=1))  # verifies the sha256 again
    assert model.session.get_inputs()[0].shape[0] not in (1, None)  # a named dynamic batch axis
    x, labels = eval_inputs
    whole = model.predict_proba(x[:7])
    one = model.predict_proba(x[:1])
    assert one.shape == (1, 10) and whole.shape == (7, 10)
    np.testing.assert_allclose(one[0], whole[0], atol=1e-5)
    np.testing.assert_allclose(whole.sum(1), 1.0, atol=1e-5)
    # The runtime with the shared preprocessing reproduces the accuracy training recorded.
    accuracy = float((model.predict_proba(x).argmax(1) == labels).mean())
    assert abs(accuracy - m.metrics["test"]["accuracy"]) <= 0.005
    return model


def test_edge_pipeline(edge_run, eval_inputs):
    import onnx

    out, manifest = edge_run
    assert manifest.precision == "int8" and manifest.twin == "edge-fp32.onnx"
    assert manifest.recipe["epochs"] == 1 and manifest.recipe["train_images"] == 2000
    int8 = _check_artifact(out / "edge-int8.json", eval_inputs)
    fp32 = _check_artifact(out / "edge-fp32.json", eval_inputs)

    int8_bytes, fp32_bytes = (out / "edge-int8.onnx").stat().st_size, (out / "edge-fp32.onnx").stat().st_size
    assert int8_bytes < fp32_bytes
    ops = {node.op_type for node in onnx.load(str(out / "edge-int8.onnx")).graph.node}
    assert {"QLinearConv", "QuantizeLinear"} <= ops, ops  # static quantization, QOperator format
    assert not list(out.glob("*.pre.onnx"))  # the intermediate is cleaned up

    x, labels = eval_inputs
    for model in (int8, fp32):
        accuracy = float((model.predict_proba(x).argmax(1) == labels).mean())
        assert accuracy > 0.3, f"{model.manifest.precision}: {accuracy:.3f} is not above chance (0.1)"
    agree = (int8.predict_proba(x).argmax(1) == fp32.predict_proba(x).argmax(1)).mean()
    assert agree > 0.8  # quantization keeps the network's answers


def test_cloud_pipeline(cloud_run, edge_run, eval_inputs):
    out, manifest = cloud_run
    assert manifest.precision == "fp32" and manifest.twin is None
    assert sorted(p.name for p in out.iterdir()) == ["cloud-fp32.json", "cloud-fp32.onnx", "cloud-m0.pt", "cloud-m1.pt"]
    _check_artifact(out / "cloud-fp32.json", eval_inputs)
    assert edge_run[1].flops * 10 < manifest.flops  # the edge network is an order of magnitude cheaper
    members = manifest.recipe["members"]
    assert [m["seed"] for m in members] == [0, 1] and members[0]["dropout"] != members[1]["dropout"]
    assert all(0.0 <= m["val_accuracy"] <= 1.0 for m in members)
    assert manifest.recipe["train_seconds"] == sum(m["train_seconds"] for m in members)
    # One graph running both members (no flip TTA in the shipped recipe).
    from router_tools import train

    assert "tta" not in manifest.recipe and manifest.flops == 2 * train.count_flops(train.build_model("cloud"))[0]


def test_recipe_flip_tta_writes_mirror_averaging_into_the_graph(tmp_path, monkeypatch, eval_inputs):
    from dataclasses import replace

    from router_tools import train

    monkeypatch.setitem(train.RECIPES, "edge", replace(train.RECIPES["edge"], flip_tta=True))
    m = train.run("edge", epochs=1, train_limit=256, eval_limit=200, out=tmp_path, version="t", log=lambda _: None)
    assert m.recipe["tta"] == "hflip" and m.flops == 2 * train.count_flops(train.build_model("edge"))[0]
    fp32 = OnnxClassifier(tmp_path / "edge-fp32.json")
    x = eval_inputs[0][:5]
    np.testing.assert_allclose(fp32.predict_proba(x), fp32.predict_proba(x[..., ::-1].copy()), atol=1e-5)


def test_cloud_members_trained_apart_package_to_the_same_model(cloud_run, tmp_path, eval_inputs):
    """``--member 1``, then ``--member 0`` (another process in practice), then ``--package``
    give the model that one sequential run gives."""
    from router_tools import train

    kw = dict(epochs=1, train_limit=384, eval_limit=EVAL_IMAGES, out=tmp_path, version="test-cloud", log=lambda _: None)
    assert train.run("cloud", members=[1], **kw) is None  # member 0 missing: nothing packaged yet
    assert not (tmp_path / "cloud-fp32.onnx").exists()
    assert train.run("cloud", members=[0], **kw) is not None
    x = eval_inputs[0][:50]
    apart = OnnxClassifier(tmp_path / "cloud-fp32.json").predict_proba(x)
    assert train.run("cloud", members=[], **kw) is not None  # --package alone
    repackaged = OnnxClassifier(tmp_path / "cloud-fp32.json").predict_proba(x)
    together = OnnxClassifier(cloud_run[0] / "cloud-fp32.json").predict_proba(x)
    np.testing.assert_allclose(apart, together, atol=1e-5)
    np.testing.assert_allclose(repackaged, together, atol=1e-5)
    with pytest.raises(SystemExit, match="members 0..1"):
        train.run("cloud", members=[2], **kw)


def test_named_recipe_edge_1_1(tmp_path, eval_inputs):
    """``hybrid-router train edge --recipe edge-1.1``: its own network, version and calibration."""
    from router_tools import train

    m = train.run("edge", recipe="edge-1.1", epochs=1, train_limit=256, eval_limit=EVAL_IMAGES, out=tmp_path,
                  log=lambda _: None)
    assert m.version == "1.1.0" and m.precision == "int8" and m.twin == "edge-fp32.onnx"
    assert m.recipe["recipe_name"] == "edge-1.1" and m.recipe["arch"] == "edge-1.1"
    assert m.flops == train.count_flops(train.build_model("edge-1.1"))[0] != train.count_flops(train.build_model("edge"))[0]
    assert m.calibration is not None and m.calibration.expected_escalation == pytest.approx(0.25, abs=0.01)
    assert Manifest.load(tmp_path / "edge-int8.json").calibration == m.calibration
    _check_artifact(tmp_path / "edge-int8.json", eval_inputs)
    with pytest.raises(SystemExit, match="unknown edge recipe 'cloud'"):
        train.run("edge", recipe="cloud", out=tmp_path, log=lambda _: None)
