"""The shipped artifacts and the ONNX runtime wrapper: integrity, consistency, calibration, errors, threads.

Accuracy targets are never asserted here (the shipped models are replaced by retraining);
everything is read from the manifests.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from router_tools import datasets as data
from edge_model.calibration import softmax
from edge_model.errors import ArrayInputError, ArtifactError, InferenceError
from edge_model.manifest import Manifest, sha256_file
from edge_model.preprocess import PreprocessConfig, preprocess_batch
from edge_model.runtime import ARTIFACTS_DIR, DEFAULT_EDGE_MANIFEST, EdgeModel, OnnxClassifier, SessionOptions

REPO = Path(__file__).resolve().parent.parent
CLOUD_MANIFEST = REPO / "cloud_service" / "artifacts" / "cloud-fp32.json"
EDGE_FP32_MANIFEST = ARTIFACTS_DIR / "edge-fp32.json"
ALL_MANIFESTS = [DEFAULT_EDGE_MANIFEST, EDGE_FP32_MANIFEST, CLOUD_MANIFEST]
FAST = SessionOptions(warmup_runs=0)


@pytest.fixture(scope="module")
def edge() -> EdgeModel:
    return EdgeModel()


@pytest.fixture(scope="module")
def cloud() -> OnnxClassifier:
    return OnnxClassifier(CLOUD_MANIFEST)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return preprocess_batch(data.load_test().images[:64])


def _copy_artifact(tmp_path: Path, manifest: Path = DEFAULT_EDGE_MANIFEST) -> Path:
    m = Manifest.load(manifest)
    shutil.copyfile(manifest.parent / m.file, tmp_path / m.file)
    shutil.copyfile(manifest, tmp_path / manifest.name)
    return tmp_path / manifest.name


def _edit_manifest(path: Path, **changes) -> None:
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


# --------------------------------------------------------------------------- loading and consistency

def test_edge_and_cloud_load(edge, cloud):
    assert edge.manifest.precision == "int8" and edge.name == edge.manifest.name
    assert cloud.manifest.precision == "fp32" and cloud.name == cloud.manifest.name
    assert edge.version and cloud.version
    assert edge.name != cloud.name
    assert edge.session.get_inputs()[0].name == edge.input_name


@pytest.mark.parametrize("path", ALL_MANIFESTS, ids=lambda p: p.stem)
def test_manifest_consistency(path):
    m = Manifest.load(path)
    assert m.labels == list(data.LABELS) and len(m.labels) == 10
    onnx = path.parent / m.file
    assert onnx.is_file() and sha256_file(onnx) == m.sha256
    assert m.input.shape == [-1, 1, 28, 28] and m.input.dtype == "float32" and m.input.layout == "NCHW"
    from router_tools import train  # numpy-only at import time

    assert (m.input.mean, m.input.std) == (train.MEAN, train.STD)
    assert m.temperature > 0 and np.isfinite(m.temperature)
    assert m.flops > 0 and m.params > 0
    assert m.metrics["file_bytes"] == onnx.stat().st_size
    test_metrics = m.metrics["test"]
    assert 0 <= test_metrics["accuracy"] <= 1 and test_metrics["ece"] >= 0


def test_int8_has_a_valid_fp32_twin():
    int8 = Manifest.load(DEFAULT_EDGE_MANIFEST)
    assert int8.precision == "int8" and int8.twin
    twin_path = ARTIFACTS_DIR / int8.twin
    assert twin_path.is_file()
    twin = Manifest.load(twin_path.with_suffix(".json"))
    assert twin.file == int8.twin and twin.precision == "fp32" and twin.twin is None
    assert twin.sha256 == sha256_file(twin_path)
    assert (twin.name, twin.version, twin.labels, twin.input) == (int8.name, int8.version, int8.labels, int8.input)
    assert twin.flops == int8.flops  # same network, different precision
    assert (ARTIFACTS_DIR / int8.file).stat().st_size < twin_path.stat().st_size
    OnnxClassifier(twin_path.with_suffix(".json"), FAST)  # and it loads


def test_edge_is_the_smaller_model():
    edge, cloud = Manifest.load(DEFAULT_EDGE_MANIFEST), Manifest.load(CLOUD_MANIFEST)
    assert edge.flops < cloud.flops and edge.params < cloud.params


def test_preprocess_config_comes_from_the_manifest(edge):
    spec = edge.manifest.input
    assert edge.preprocess_config == PreprocessConfig.from_input_spec(spec)
    custom = PreprocessConfig(max_pixels=1000)
    assert OnnxClassifier(DEFAULT_EDGE_MANIFEST, FAST, preprocess_config=custom).preprocess_config is custom


def test_session_is_single_threaded_by_default(edge):
    opts = edge.session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    two = OnnxClassifier(DEFAULT_EDGE_MANIFEST, SessionOptions(intra_op_threads=2, warmup_runs=0))
    assert two.session.get_session_options().intra_op_num_threads == 2


# --------------------------------------------------------------------------- calibrated inference

@pytest.mark.parametrize("which", ["edge", "cloud"])
def test_calibrated_probabilities(which, request, batch):
    model = request.getfixturevalue(which)
    probs = model.predict_proba(batch)
    logits = model.logits(batch)
    assert probs.shape == (64, 10) and probs.dtype == np.float32
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(1), logits.argmax(1))
    # Temperature scaling as fitted: softmax(logits / T).
    np.testing.assert_allclose(probs, softmax(logits, model.temperature), atol=1e-5)


def test_temperature_changes_confidence_not_the_answer(tmp_path, edge, batch):
    path = _copy_artifact(tmp_path)
    _edit_manifest(path, temperature=edge.temperature * 4)
    hot = OnnxClassifier(path, FAST)
    p, q = edge.predict_proba(batch), hot.predict_proba(batch)
    np.testing.assert_array_equal(p.argmax(1), q.argmax(1))
    assert q.max(1).mean() < p.max(1).mean()


def test_dynamic_batch_sizes(edge, batch):
    whole = edge.predict_proba(batch)
    for n in (1, 7, 64):
        np.testing.assert_allclose(edge.predict_proba(batch[:n]), whole[:n], atol=1e-6)
    assert edge.predict_proba(batch[:0]).shape == (0, 10)


def test_classify_images(edge, tmp_path):
    images = data.load_test().images[:5]
    np.testing.assert_allclose(edge.classify(list(images)), edge.predict_proba(preprocess_batch(images)), atol=1e-6)


@pytest.fixture(scope="module")
def test_inputs() -> tuple[np.ndarray, np.ndarray]:
    split = data.load_test()
    return preprocess_batch(split.images), split.labels


def _accuracy(model: OnnxClassifier, x: np.ndarray, labels: np.ndarray) -> float:
    pred = np.concatenate([model.predict_proba(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == labels).mean())


@pytest.mark.parametrize(
    "manifest",
    [DEFAULT_EDGE_MANIFEST, EDGE_FP32_MANIFEST, pytest.param(CLOUD_MANIFEST, marks=pytest.mark.slow)],
    ids=lambda p: p.stem,
)
def test_manifest_accuracy_is_reproduced(manifest, test_inputs):
    """Not a target: the runtime + shared preprocessing re-measure what training recorded."""
    model = OnnxClassifier(manifest, FAST)
    recorded = model.manifest.metrics["test"]["accuracy"]
    # INT8 kernels may differ by CPU feature set, flipping a handful of borderline images.
    assert abs(_accuracy(model, *test_inputs) - recorded) <= 0.003


# --------------------------------------------------------------------------- integrity errors

def test_sha256_mismatch(tmp_path):
    path = _copy_artifact(tmp_path)
    onnx = tmp_path / Manifest.load(path).file
    raw = bytearray(onnx.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    onnx.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256 .* does not match") as info:
        OnnxClassifier(path)
    assert str(onnx) in str(info.value)


def test_missing_onnx_file(tmp_path):
    path = _copy_artifact(tmp_path)
    (tmp_path / Manifest.load(path).file).unlink()
    with pytest.raises(ArtifactError, match="not found"):
        OnnxClassifier(path)


def test_missing_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="manifest not found"):
        EdgeModel(tmp_path / "edge-int8.json")


def test_corrupt_onnx_with_matching_sha(tmp_path):
    path = _copy_artifact(tmp_path)
    onnx = tmp_path / Manifest.load(path).file
    onnx.write_bytes(b"\x08\x07garbage that is not a protobuf" * 50)
    _edit_manifest(path, sha256=sha256_file(onnx))
    with pytest.raises(ArtifactError, match="onnxruntime cannot load the model"):
        OnnxClassifier(path)


@pytest.mark.parametrize("labels", [list(data.LABELS[:9]), [*data.LABELS, "Hat"]], ids=["9", "11"])
def test_manifest_with_wrong_label_count(tmp_path, labels):
    path = _copy_artifact(tmp_path)
    _edit_manifest(path, labels=labels)
    with pytest.raises(ArtifactError, match=f"manifest lists {len(labels)} labels"):
        OnnxClassifier(path, FAST)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"temperature": 0}, "temperature"),
        ({"file": "../../etc/passwd"}, "plain file name"),
        ({"sha256": "abc"}, "sha256"),
        ({"labels": ["a", "a"]}, "distinct"),
        ({"input": {"shape": [-1, 28, 28], "mean": 0.286, "std": 0.353}}, "shape must be"),
        ({"input": {"shape": [-1, 1, 28, 28], "mean": 0.286, "std": 0}}, "std must be > 0"),
        ({"precision": "int4"}, "precision"),
        ({"surprise": 1}, "surprise"),
    ],
    ids=["temperature", "path", "sha", "labels", "shape", "std", "precision", "extra"],
)
def test_invalid_manifest_fields(tmp_path, changes, match):
    path = _copy_artifact(tmp_path)
    _edit_manifest(path, **changes)
    with pytest.raises(ArtifactError, match=match) as info:
        OnnxClassifier(path, FAST)
    assert str(path) in str(info.value)


def test_unreadable_manifest(tmp_path):
    path = _copy_artifact(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        OnnxClassifier(path)


def test_manifest_input_spec_disagrees_with_the_graph(tmp_path):
    path = _copy_artifact(tmp_path)
    _edit_manifest(path, input={"name": "input", "shape": [-1, 1, 32, 32], "mean": 0.286, "std": 0.353})
    with pytest.raises(ArtifactError, match="graph input"):
        OnnxClassifier(path, FAST)
    _edit_manifest(path, input={"name": "pixels", "shape": [-1, 1, 28, 28], "mean": 0.286, "std": 0.353})
    with pytest.raises(ArtifactError, match="'pixels' not among"):
        OnnxClassifier(path, FAST)


def test_manifest_output_name_disagrees_with_the_graph(tmp_path):
    path = _copy_artifact(tmp_path)
    _edit_manifest(path, output_name="probs")
    with pytest.raises(ArtifactError, match="'probs' not among"):
        OnnxClassifier(path, FAST)


# --------------------------------------------------------------------------- input errors

@pytest.mark.parametrize(
    "x",
    [
        np.zeros((1, 1, 28, 28), dtype=np.float64),
        np.zeros((1, 1, 28, 28), dtype=np.uint8),
        np.zeros((1, 28, 28), dtype=np.float32),
        np.zeros((1, 1, 28, 27), dtype=np.float32),
        np.zeros((1, 3, 28, 28), dtype=np.float32),
        np.zeros((2, 1, 1, 28, 28), dtype=np.float32),
    ],
    ids=["float64", "uint8", "rank3", "width27", "3ch", "rank5"],
)
def test_wrong_input_dtype_or_shape(edge, x):
    with pytest.raises(ArrayInputError, match=r"float32 \[N, 1, 28, 28\]"):
        edge.predict_proba(x)


def test_non_array_input(edge):
    with pytest.raises(ArrayInputError, match="numpy array"):
        edge.predict_proba([[0.0] * 28] * 28)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input(edge, batch, bad):
    x = batch[:3].copy()
    x[1, 0, 5, 5] = bad
    with pytest.raises(ArrayInputError, match="NaN or infinite"):
        edge.predict_proba(x)


def test_logits_translates_onnxruntime_errors(edge):
    with pytest.raises(InferenceError, match="onnxruntime failed"):
        edge.logits(np.zeros((1, 1, 28, 28), dtype=np.float64))


def test_input_errors_leave_the_model_usable(edge, batch):
    expected = edge.predict_proba(batch[:2])
    for bad in (np.zeros((1, 28, 28), np.float32), np.full((1, 1, 28, 28), np.nan, np.float32)):
        with pytest.raises(ArrayInputError):
            edge.predict_proba(bad)
    np.testing.assert_array_equal(edge.predict_proba(batch[:2]), expected)


# --------------------------------------------------------------------------- threads

@pytest.mark.parametrize("which", ["edge", "cloud"])
def test_concurrent_predict_proba_is_deterministic(which, request, batch):
    model = request.getfixturevalue(which)
    slices = [batch[i : i + n] for i, n in ((0, 1), (1, 7), (8, 16), (24, 40))]
    expected = [model.predict_proba(s) for s in slices]
    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def worker(t: int) -> None:
        try:
            start.wait(timeout=10)
            for r in range(15):
                k = (t + r) % len(slices)
                results[(t, r)] = (k, model.predict_proba(slices[k]))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    assert len(results) == 6 * 15
    for k, probs in results.values():
        np.testing.assert_array_equal(probs, expected[k])
