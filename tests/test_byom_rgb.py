"""The RGB worked example (router_tools/examples/rgb) as a user runs it from the README: the shipped
pair of plain FP32 ONNX files goes ``model import`` -> ``model quantize`` -> ``calibrate`` -> the
real cloud service (uvicorn on a free loopback port) -> the router, answering PNG files with the
right labels. No torch: the images come from the example's seeded Pillow generator."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")  # a dependency of the tools distribution (model import/quantize)

from edge_model.manifest import Manifest  # noqa: E402
from edge_model.runtime import OnnxClassifier  # noqa: E402
from router import Router  # noqa: E402
from router.policy import DEFAULT_POLICY_PATH, load_policy, parse_policy  # noqa: E402
from router_tools.cli import main as cli_main  # noqa: E402
from tests.support.cloud import running_service  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "router_tools" / "examples" / "rgb"  # in the clone, not in a wheel
LABELS = [line.strip() for line in (EXAMPLE / "labels.txt").read_text().splitlines() if line.strip()]


def _signs():
    spec = importlib.util.spec_from_file_location("rgb_signs", EXAMPLE / "signs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    """The README's commands, in order, through the CLI entry point; returns the working folder."""
    tmp = tmp_path_factory.mktemp("rgb")
    signs = _signs()
    assert list(signs.LABELS) == LABELS
    signs.write_split(tmp / "data", "calibration", 160)
    signs.write_split(tmp / "data", "test", 96)
    pre = json.loads((EXAMPLE / "preprocessing.json").read_text())
    norm = ["--color", "RGB", "--mean", ",".join(map(str, pre["mean"])), "--std", ",".join(map(str, pre["std"]))]
    for side in ("edge", "cloud"):
        assert cli_main(["model", "import", str(EXAMPLE / f"{side}.onnx"), "--labels", str(EXAMPLE / "labels.txt"),
                         *norm, "--out", str(tmp / f"{side}-fp32")]) == 0
    assert cli_main(["model", "quantize", str(tmp / "edge-fp32"), "--calibration-data", str(tmp / "data/calibration"),
                     "--eval-data", str(tmp / "data/test"), "--out", str(tmp / "edge-int8"), "--latency-runs", "5"]) == 0
    shutil.copyfile(DEFAULT_POLICY_PATH, tmp / "policy.yaml")
    assert cli_main(["calibrate", "--data", str(tmp / "data/calibration"), "--edge-manifest",
                     str(tmp / "edge-int8/model.json"), "--cloud-manifest", str(tmp / "cloud-fp32/model.json"),
                     "--target-escalation", "0.2", "--refit-temperature", "--edge-out", str(tmp / "edge"),
                     "--write", str(tmp / "policy.yaml")]) == 0
    return tmp


def test_import_quantize_calibrate_write_a_deployable_edge(walk):
    cloud = Manifest.load(walk / "cloud-fp32/model.json")
    assert cloud.output_kind == "probabilities"  # the graph ends in Softmax: never softmaxed twice
    assert cloud.labels == LABELS and cloud.input.color == "RGB" and cloud.input.shape == [-1, 3, 32, 32]
    int8 = Manifest.load(walk / "edge-int8/model.json")
    assert int8.precision == "int8" and (walk / "edge-int8" / int8.twin).is_file()
    assert int8.metrics["accuracy_images"] == 96
    policy = load_policy(walk / "policy.yaml")
    edge = Manifest.load(policy.edge.manifest)
    assert Path(policy.edge.manifest).parent == walk / "edge" and edge.labels == LABELS
    assert edge.temperature != 1.0 and edge.precision == "int8" and (walk / "edge" / edge.twin).is_file()
    assert 0 < policy.confidence_threshold < 1


def test_served_pair_answers_png_files_with_the_right_labels(walk):
    files = sorted((walk / "data/test").glob("*/*.png"))
    truth = [LABELS.index(f.parent.name) for f in files]
    cloud_model = OnnxClassifier(walk / "cloud-fp32/model.json")
    with running_service({"model": {"manifest": str(walk / "cloud-fp32/model.json"), "name": "signs"}}) as svc:
        data = load_policy(walk / "policy.yaml").model_dump(mode="json")
        data["cloud"]["endpoints"][0].update(url=svc.url, model="signs", labels_check="require")
        data.update(default_deadline_ms=20000, decision_log=False)
        data["cloud"]["per_try_timeout_ms"] = 15000
        with Router(parse_policy(data, "test policy")) as router:
            edge = router.edge_model
            cloud = [router.predict(f, mode="cloud_only") for f in files[:8]]
            answers = [router.predict(f) for f in files]
    for f, p in zip(files, cloud):  # the service's model, under the names in labels.txt
        assert p.source == "cloud" and p.label == LABELS[int(np.argmax(cloud_model.classify([f])[0]))]
        np.testing.assert_allclose(p.probabilities, cloud_model.classify([f])[0], atol=1e-5)
    edge_pred = edge.classify(files).argmax(1)
    for p, e in zip(answers, edge_pred):
        assert p.label in LABELS and not p.fallback
        if p.source == "edge":
            assert p.reason.value == "confident" and p.label == LABELS[int(e)]
    sources = {p.source for p in answers}
    assert sources == {"edge", "cloud"}  # some confident, some escalated at the calibrated threshold
    assert np.mean([LABELS.index(p.label) == t for p, t in zip(answers, truth)]) >= 0.8
