"""The edge model 1.1.0 release shipped in router_tools/data/releases/edge-1.1.0/ (published through
the signed channel, not bundled): integrity, the accuracy its manifest records, the FLOPs rule, the
7-bit weights every x86 CPU computes alike, and that the release command takes it.

Accuracy targets are not asserted (like tests/test_runtime.py): the runtime re-measures what
training recorded. Recounting FLOPs from the recipe's network needs torch (the ``train`` extra).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from router_tools import datasets as data
from edge_model.manifest import Manifest, sha256_file
from edge_model.preprocess import preprocess_batch
from edge_model.runtime import DEFAULT_EDGE_MANIFEST, OnnxClassifier, SessionOptions

REPO = Path(__file__).resolve().parent.parent
RELEASE = REPO / "router_tools" / "data" / "releases" / "edge-1.1.0"
INT8, FP32 = RELEASE / "edge-int8.json", RELEASE / "edge-fp32.json"
CLOUD_MANIFEST = REPO / "cloud_service" / "artifacts" / "cloud-fp32.json"
FAST = SessionOptions(warmup_runs=0)

pytestmark = pytest.mark.skipif(
    not INT8.is_file(), reason=f"edge 1.1.0 is not in {RELEASE} yet (hybrid-router train edge --recipe edge-1.1)"
)


@pytest.fixture(scope="module")
def test_inputs() -> tuple[np.ndarray, np.ndarray]:
    split = data.load_test()
    return preprocess_batch(split.images), split.labels


@pytest.mark.parametrize("path", [INT8, FP32], ids=lambda p: p.stem)
def test_release_files_match_their_manifest(path):
    m = Manifest.load(path)
    assert m.version == "1.1.0" and m.name == Manifest.load(DEFAULT_EDGE_MANIFEST).name
    assert m.sha256 == sha256_file(RELEASE / m.file)
    assert m.labels == list(data.LABELS) == Manifest.load(DEFAULT_EDGE_MANIFEST).labels
    assert m.input == Manifest.load(DEFAULT_EDGE_MANIFEST).input  # a drop-in for the bundled 1.0.1
    assert m.metrics["file_bytes"] == (RELEASE / m.file).stat().st_size


def test_int8_names_its_fp32_twin_and_calibration():
    int8, fp32 = Manifest.load(INT8), Manifest.load(FP32)
    assert int8.precision == "int8" and fp32.precision == "fp32" and int8.twin == fp32.file
    assert int8.flops == fp32.flops and int8.params == fp32.params
    assert int8.recipe["recipe_name"] == "edge-1.1" and int8.recipe["quantization"]["reduce_range"] is True
    cal = int8.calibration
    assert cal is not None and 0 < cal.threshold < 1 and cal.expected_escalation == pytest.approx(0.25, abs=0.01)


def test_flops_within_a_twentieth_of_the_cloud():
    assert 20 * Manifest.load(INT8).flops <= Manifest.load(CLOUD_MANIFEST).flops


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="recounting FLOPs needs torch (the train extra)")
def test_flops_are_the_recipe_networks():
    from router_tools import train

    assert Manifest.load(INT8).flops == train.count_flops(train.build_model("edge-1.1"))[0]


def test_int8_weights_are_7_bit():
    """reduce_range: weights in [-64, 64] keep onnxruntime's U8S8 int16 pair sums from saturating
    on x86 CPUs without VNNI, so every CPU computes the same answers (router_tools/train.py)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(RELEASE / Manifest.load(INT8).file)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    ops = [n for n in g.node if n.op_type in ("QLinearConv", "QGemm", "QLinearMatMul")]
    assert {n.op_type for n in ops} >= {"QLinearConv"}
    for n in ops:
        w = weights[n.input[3]]  # (x, x_scale, x_zero_point, w, ...) in all three
        assert w.dtype == np.int8 and -64 <= int(w.min()) and int(w.max()) <= 64, n.name


@pytest.mark.parametrize("path", [INT8, FP32], ids=lambda p: p.stem)
def test_manifest_accuracy_is_reproduced(path, test_inputs):
    model = OnnxClassifier(path, FAST)  # verifies the sha256 again
    x, labels = test_inputs
    pred = np.concatenate([model.predict_proba(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    # INT8 kernels may differ by CPU feature set, flipping a handful of borderline images.
    assert abs(float((pred == labels).mean()) - model.manifest.metrics["test"]["accuracy"]) <= 0.003


def test_release_command_publishes_it(tmp_path):
    pytest.importorskip("tuf", reason="publishing needs the release extra (tuf)")
    from router_tools import release as rel

    repo = rel.Repo.at(tmp_path / "rel")
    rel.create_keys(repo)
    golden = rel.golden_bytes(*rel.golden_from_test_split(INT8, 16))
    entry = rel.publish(repo, INT8, rollout=0.05, golden=golden)
    assert entry["version"] == "1.1.0" and entry["sha256"] == Manifest.load(INT8).sha256
    assert (repo.public / "targets").is_dir()


def test_bench_compares_the_release_with_the_bundled_model(tmp_path):
    """bench/edge_latency.py --edge <release> --compare <bundled> runs (a tiny run; no speed asserted)."""
    import json
    import runpy

    main = runpy.run_path(str(REPO / "bench" / "edge_latency.py"))["main"]
    out = tmp_path / "bench.json"
    args = ["--rounds", "2", "--per-round", "3", "--images", "4", "--accuracy-limit", "200", "--no-cloud-accuracy"]
    assert main([*args, "--edge", str(INT8), "--compare", str(DEFAULT_EDGE_MANIFEST), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["models"]["edge"].endswith("1.1.0") and r["models"]["compare"].endswith(Manifest.load(DEFAULT_EDGE_MANIFEST).version)
    assert {"cmp-int8", "cmp-fp32"} <= set(r["latency"]) and "cmp-int8 / cmp-fp32" in r["ratios"]
    assert 0 <= r["accuracy"]["agreement int8 / cmp-int8"] <= 1
