"""The edge side's contract with the application: a model that cannot load is loud (or fatal
when required), float images must say they are normalised, private answers stay out of the
decision log, and the model file is verified and loaded from one read."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil

import numpy as np
import pydantic
import pytest

from edge_model.errors import ArtifactError
from edge_model.preprocess import PreprocessConfig, normalise
from edge_model.runtime import ARTIFACTS_DIR, DEFAULT_EDGE_MANIFEST, EdgeModel
from router import EdgeError, InvalidInput, Router
from router.policy import parse_policy
from router_tools.datasets import load_test

LOCAL = {"mode": "edge_only", "reload_check_interval_s": 0}


@pytest.fixture(scope="module")
def router():
    with Router(parse_policy(LOCAL)) as r:
        yield r


@pytest.fixture(scope="module")
def image():
    return load_test().images[0]  # uint8 [28, 28]


def test_an_edge_model_that_cannot_load_is_loud(tmp_path, caplog):
    policy = parse_policy({**LOCAL, "mode": "prefer_edge", "edge": {"manifest": str(tmp_path / "missing.json")}})
    with caplog.at_level(logging.ERROR, logger="router"):
        r = Router(policy)
    with r:
        edge = r.stats()["edge"]
        assert edge["available"] is False and "missing.json" in edge["error"]
    assert any(rec.levelno == logging.ERROR and "edge model unavailable" in rec.getMessage() for rec in caplog.records)


def test_a_required_edge_model_that_cannot_load_refuses_construction(tmp_path):
    policy = parse_policy({**LOCAL, "edge": {"manifest": str(tmp_path / "missing.json"), "required": True}})
    with pytest.raises(EdgeError, match="missing.json"):
        Router(policy)


def test_stats_report_an_available_edge_model(router):
    assert router.stats()["edge"] == {"version": router.edge_model.version, "available": True, "error": None}


@pytest.mark.parametrize("scale", [1 / 255.0, 1.0], ids=["unit-interval", "float-pixels"])
def test_a_float_image_without_normalised_is_refused_with_what_to_pass(router, image, scale):
    img = image.astype(np.float32) * scale
    with pytest.raises(InvalidInput) as exc:
        router.predict(img)
    msg = str(exc.value)
    assert "normalised=True" in msg and "uint8" in msg and "\n" not in msg
    with pytest.raises(InvalidInput, match="image 1: .*normalised=True"):
        router.predict_batch([image, img])
    with pytest.raises(InvalidInput, match="normalised=True"):
        asyncio.run(router.apredict(img))


def test_normalised_float_input_is_taken_as_model_input(router, image):
    cfg: PreprocessConfig = router.edge_model.preprocess_config
    x = normalise(image, cfg)  # float32 [28, 28], exactly what the uint8 path computes
    want = router.predict(image)
    for form in (x, x[None], x.astype(np.float64)):
        got = router.predict(form, normalised=True)
        assert (got.label, got.probabilities) == (want.label, want.probabilities)
    assert [p.label for p in router.predict_batch([x, image], normalised=True)] == [want.label] * 2
    assert asyncio.run(router.apredict(x[None], normalised=True)).label == want.label


def _decision_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "router.decision"]


@pytest.mark.parametrize("details", [False, True])
def test_privacy_decision_log_carries_no_label_unless_asked(image, caplog, details):
    policy = parse_policy({**LOCAL, "mode": "prefer_edge", "decision_log_privacy_details": details})
    with Router(policy) as r, caplog.at_level(logging.INFO, logger="router.decision"):
        r.predict(image, privacy=True)
        r.predict(image, mode="edge_only")
    private, public = _decision_lines(caplog)
    assert private["reason"] == "privacy" and private["request_id"]
    assert ("label" in private and "confidence" in private) is details
    assert "label" in public and "confidence" in public


def test_the_session_is_built_from_the_bytes_that_were_verified(tmp_path, monkeypatch):
    import edge_model.runtime as runtime

    manifest = tmp_path / DEFAULT_EDGE_MANIFEST.name
    shutil.copy(DEFAULT_EDGE_MANIFEST, manifest)
    model_file = ARTIFACTS_DIR / json.loads(manifest.read_text())["file"]
    shutil.copy(model_file, tmp_path / model_file.name)
    real = runtime.read_verified

    def read_then_swap(path, sha256):
        data = real(path, sha256)
        (tmp_path / model_file.name).write_bytes(b"not an onnx model")  # swapped right after the check
        return data

    monkeypatch.setattr(runtime, "read_verified", read_then_swap)
    model = EdgeModel(manifest)  # loads what was verified, not what is on disk now
    assert model.predict_proba(np.zeros((1, 1, 28, 28), np.float32)).shape == (1, len(model.labels))
    monkeypatch.setattr(runtime, "read_verified", real)
    with pytest.raises(ArtifactError, match="sha256"):
        EdgeModel(manifest)  # the swapped file itself is refused


def test_an_answer_is_a_regular_frozen_model(router, image):
    """Answers are built without validation (their fields are the router's own): pydantic's own
    operations on them still work, and copying never changes the original."""
    p = router.predict(image)
    changed = p.model_copy(update={"label": "somewhere else"})
    assert changed.label == "somewhere else" and p.label != "somewhere else"
    assert "label" in changed.model_fields_set and p.model_copy() == p
    assert type(p).model_validate(p.model_dump()) == p
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        p.label = "x"
