"""Unit tests of the router's small parts: breaker, latency estimate, policy files, v2 message codec."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from router.cloud import build_infer_body, error_from_status, parse_infer_response, parse_metadata, translate
from router.errors import (
    CloudGatewayError,
    CloudOverloaded,
    CloudAuthError,
    CloudProtocolError,
    CloudRejected,
    CloudServerError,
    CloudTimeout,
    CloudUnavailable,
    ConfigError,
)
from router.health import BreakerState, CircuitBreaker, LatencyEstimator
from router.policy import BreakerSettings, Endpoint, load_policy, parse_policy


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# ----------------------------------------------------------------------------- breaker


def test_breaker_opens_after_consecutive_failures_and_half_opens_after_the_wait():
    clock = Clock()
    b = CircuitBreaker(BreakerSettings(failure_threshold=3, open_duration_s=2.0, half_open_max_calls=1, open_jitter=0), clock)
    for _ in range(2):
        b.record_failure()
    assert b.state is BreakerState.CLOSED and b.would_allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN and not b.would_allow() and not b.acquire()
    clock.t = 1.99
    assert b.state is BreakerState.OPEN
    clock.t = 2.0
    assert b.state is BreakerState.HALF_OPEN
    assert b.acquire() and not b.acquire()  # one trial slot only
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.acquire()


def test_failed_trial_reopens_for_a_full_period():
    clock = Clock()
    b = CircuitBreaker(BreakerSettings(failure_threshold=1, open_duration_s=1.0, open_jitter=0), clock)
    b.record_failure()
    clock.t = 1.0
    assert b.acquire()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    clock.t = 1.5
    assert b.state is BreakerState.OPEN
    clock.t = 2.0
    assert b.state is BreakerState.HALF_OPEN
    assert b.opened_count == 2


def test_released_trial_slot_can_be_taken_again():
    clock = Clock()
    b = CircuitBreaker(BreakerSettings(failure_threshold=1, open_duration_s=1.0, open_jitter=0), clock)
    b.record_failure()
    clock.t = 1.0
    assert b.acquire() and not b.acquire()
    b.release()
    assert b.acquire()


def test_failure_rate_over_the_window_opens_without_consecutive_failures():
    b = CircuitBreaker(BreakerSettings(failure_threshold=100, failure_rate_threshold=0.5, window=10, min_calls=10), Clock())
    for i in range(9):  # alternate: never two failures in a row
        (b.record_failure if i % 2 == 0 else b.record_success)()
    assert b.state is BreakerState.CLOSED  # 9 calls: below min_calls
    b.record_success()
    b.record_failure()  # window: 5 failures of 10
    assert b.state is BreakerState.OPEN


def test_success_resets_the_consecutive_count():
    b = CircuitBreaker(BreakerSettings(failure_threshold=3, failure_rate_threshold=1.0), Clock())
    for _ in range(5):
        b.record_failure()
        b.record_failure()
        b.record_success()
    assert b.state is BreakerState.CLOSED


# ----------------------------------------------------------------------------- latency estimate


def test_latency_estimate_is_seeded_learns_a_high_quantile_and_forgets():
    clock = Clock()
    est = LatencyEstimator(0.020, window=10, quantile=0.9, max_age_s=60, clock=clock)
    assert est.estimate() == 0.020
    for v in [0.010] * 9 + [0.100]:
        est.observe(v)
    assert 0.010 < est.estimate() <= 0.100
    clock.t = 30.0
    est.observe(0.005)  # window of 10: the oldest 0.010 leaves
    assert est.samples == 10
    clock.t = 61.0  # the first ten samples are now too old; only the one at t=30 remains
    assert est.estimate() == pytest.approx(0.005)
    clock.t = 91.0
    assert est.estimate() == 0.020  # nothing fresh: back to the seed, so escalation is retried


# ----------------------------------------------------------------------------- policy files


def test_policy_errors_name_the_file_and_the_field(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("mode: sideways\ncloud:\n  retry:\n    max_attempts: 0\n  endpoints:\n    - url: ftp://x\n")
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    msg = str(info.value)
    assert f"{path}: mode:" in msg
    assert f"{path}: cloud.retry.max_attempts:" in msg
    assert f"{path}: cloud.endpoints.0.url:" in msg


@pytest.mark.parametrize("text, needle", [
    ("confidence_threshold: [", "invalid YAML"),
    ("- a list", "must be a mapping"),
    ("unknown_key: 1", "unknown_key"),
    ("class_thresholds: {Shirt: 1.5}", "class_thresholds"),
])
def test_policy_file_problems(tmp_path, text, needle):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_policy(path)


def test_missing_policy_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_policy(tmp_path / "nope.yaml")


def test_shipped_policy_loads_and_single_endpoint_shorthand():
    p = load_policy()  # config/policy.yaml
    assert p.cloud.endpoints and p.mode.value == "prefer_edge"
    q = parse_policy({"cloud": {"url": "http://127.0.0.1:1/", "model": "m"}})
    assert q.cloud.endpoints[0].url == "http://127.0.0.1:1" and q.cloud.endpoints[0].model == "m"


def test_class_thresholds_by_name_or_index():
    labels = ("a", "b", "c")
    p = parse_policy({"confidence_threshold": 0.5, "class_thresholds": {"b": 0.9, "2": 0.7}})
    assert p.thresholds_for(labels) == (0.5, 0.9, 0.7)
    with pytest.raises(ConfigError, match="zzz"):
        parse_policy({"class_thresholds": {"zzz": 0.9}}).thresholds_for(labels)


# ----------------------------------------------------------------------------- v2 codec (pure)


EP = Endpoint(url="http://127.0.0.1:1", name="ep")


def test_metadata_decides_uint8_or_fp32():
    ours = {"name": "m", "platform": "onnx_onnxv1", "parameters": {"accepts_uint8_pixels": True},
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}], "outputs": []}
    triton = {"name": "m", "versions": None, "platform": "onnxruntime_onnx",
              "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 28, 28]}], "outputs": [], "extra": 1}
    assert parse_metadata(json.dumps(ours).encode(), EP).datatype == "UINT8"
    info = parse_metadata(json.dumps(triton).encode(), EP)
    assert (info.datatype, info.input_name, info.versions) == ("FP32", "x", ())
    forced = Endpoint(url="http://127.0.0.1:1", input_datatype="FP32")
    assert parse_metadata(json.dumps(ours).encode(), forced).datatype == "FP32"
    with pytest.raises(CloudProtocolError):
        parse_metadata(b"<html>", EP)


def test_infer_body_carries_pixels_budget_and_id():
    info = parse_metadata(json.dumps({"name": "m", "parameters": {"accepts_uint8_pixels": True},
                                      "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]}).encode(), EP)
    pixels = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28).astype(np.uint8)
    x = np.zeros((2, 1, 28, 28), np.float32)
    body = json.loads(build_infer_body(info, EP, x, pixels, 0.1234, "rid"))
    inp = body["inputs"][0]
    assert (inp["name"], inp["datatype"], inp["shape"]) == ("input", "UINT8", [2, 1, 28, 28])
    assert inp["data"] == pixels.ravel().tolist()
    assert body["parameters"]["timeout"] == 123400 and body["id"] == "rid"
    body = json.loads(build_infer_body(info, EP, x, None, 0.1, "r"))  # float inputs: no pixels -> FP32
    assert body["inputs"][0]["datatype"] == "FP32"


def test_infer_response_parsing_tolerates_nulls_and_rejects_garbage():
    good = {"model_name": "m", "model_version": None, "id": None, "outputs": [
        {"name": "probabilities", "shape": [1, 3], "datatype": "FP32", "data": [[0.2, 0.3, 0.5]]}]}
    probs, version = parse_infer_response(json.dumps(good).encode(), EP, rows=1)
    assert probs.shape == (1, 3) and version == ""
    logits = Endpoint(url="http://127.0.0.1:1", output_kind="logits")
    p, _ = parse_infer_response(json.dumps(good).encode(), logits, rows=1)
    assert p.sum() == pytest.approx(1.0) and p.argmax() == 2
    for bad in (b"not json", b"{}", json.dumps({**good, "outputs": []}).encode()):
        with pytest.raises(CloudProtocolError):
            parse_infer_response(bad, EP, rows=1)
    with pytest.raises(CloudProtocolError, match="rows"):
        parse_infer_response(json.dumps(good).encode(), EP, rows=2)
    nan = {**good, "outputs": [{**good["outputs"][0], "data": [float("nan"), 0, 1]}]}
    with pytest.raises(CloudProtocolError):
        parse_infer_response(json.dumps(nan).encode(), EP, rows=1)


@pytest.mark.parametrize("status, cls, retryable", [
    (400, CloudRejected, False), (401, CloudAuthError, False), (404, CloudRejected, False),
    (413, CloudRejected, False), (500, CloudServerError, False), (502, CloudGatewayError, True),
    (503, CloudOverloaded, True), (504, CloudGatewayError, True), (429, CloudOverloaded, True),
])
def test_statuses_map_to_the_error_tree(status, cls, retryable):
    err = error_from_status(status, httpx.Headers({"retry-after": "0.5"}), b'{"error": "why"}', EP)
    assert type(err) is cls and err.retryable is retryable and err.status == status and "why" in str(err)
    if issubclass(cls, CloudUnavailable):
        assert err.retry_after == 0.5


def test_httpx_errors_are_translated():
    assert isinstance(translate(httpx.ConnectError("refused"), EP), CloudUnavailable)
    assert isinstance(translate(httpx.ReadTimeout("slow"), EP), CloudTimeout)
    assert isinstance(translate(TimeoutError(), EP), CloudTimeout)
    assert isinstance(translate(httpx.RemoteProtocolError("eof"), EP), CloudUnavailable)


def test_relative_edge_manifest_resolves_against_the_policy_file(tmp_path, monkeypatch):
    import shutil

    from edge_model.runtime import DEFAULT_EDGE_MANIFEST
    from router import Router

    models = tmp_path / "models"
    models.mkdir()
    for f in ("edge-int8.json", "edge-int8.onnx"):
        shutil.copy(DEFAULT_EDGE_MANIFEST.parent / f, models / f)
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "policy.yaml").write_text("edge: {manifest: ../models/edge-int8.json}\n")
    monkeypatch.chdir(tmp_path / "models")  # a working directory from which the path would not resolve
    with Router.from_config(conf / "policy.yaml") as r:
        assert r.edge_model is not None and r.edge_model.manifest_path.resolve() == (models / "edge-int8.json").resolve()


def test_a_batch_of_declared_model_input_matches_single_predicts_and_names_a_bad_image():
    """predict_batch's stacked path for normalised float input gives the per-image answers, never
    aliases the caller's arrays, and still says which image is not finite."""
    import numpy as np
    import pytest

    from edge_model.preprocess import preprocess
    from router import InvalidInput, Router
    from router.policy import parse_policy
    from router_tools.datasets import load_test

    with Router(parse_policy({"confidence_threshold": 0.0, "decision_log": False,
                              "cloud": {"endpoints": []}})) as router:
        xs = [preprocess(im, router.edge_model.preprocess_config) for im in load_test().images[:8]]
        batch = router.predict_batch(xs, normalised=True)
        single = [router.predict(x, normalised=True) for x in xs]
        assert [(p.label, round(p.confidence, 6)) for p in batch] == [(p.label, round(p.confidence, 6)) for p in single]
        bad = [x.copy() for x in xs]
        bad[3][0, 0, 0] = np.nan
        with pytest.raises(InvalidInput, match="image 3"):
            router.predict_batch(bad, normalised=True)


def test_the_learned_answer_reserve_takes_the_worst_recent_cost_capped_and_forgets_it():
    from router.api import _AnswerCost, _larger_reserve

    now = [0.0]
    cost = _AnswerCost(window=3, cap_s=0.010, max_age_s=60.0, clock=lambda: now[0])
    assert cost.worst == 0.0
    cost.observe(0.004)
    cost.observe(0.002)
    assert cost.worst == 0.004
    cost.observe(0.5)  # a stall counts only up to the cap
    assert cost.worst == 0.010
    for _ in range(3):  # pushed out of the window by later failures
        cost.observe(0.001)
    assert cost.worst == 0.001
    cost.observe(0.006)
    now[0] = 61.0  # no failure for longer than max_age: forgotten
    assert cost.worst == 0.0
    assert _larger_reserve(0.004, 3.0) == 0.004 and _larger_reserve(0.002, 3.0) is None


# ----------------------------------------------------------------------------- field monitor bookkeeping


def test_field_window_ring_matches_a_sliding_window_over_batches_of_every_size():
    """FieldMonitor.observe keeps the drift window as a ring written in slices: after any mix of
    batch sizes (under, across and over the window's end) its share and counts equal a plain
    sliding window's."""
    import random
    from collections import deque
    from types import SimpleNamespace

    from router.audit import FieldMonitor
    from router.policy import Mode
    from router.prediction import Reason

    policy = parse_policy({"drift": {"window": 20}, "cloud": {"endpoints": []}, "audit_rate": 0.0})
    monitor = FieldMonitor(SimpleNamespace(_release_cal=None, edge_model=None))
    req = SimpleNamespace(edge_version="1", policy=policy, thresholds=(0.5,) * 10, privacy=False,
                          mode=Mode.PREFER_EDGE, endpoints=(), rng=random.Random(0))
    rng = random.Random(1)
    ref: deque = deque(maxlen=20)
    unsure = answers = 0
    for size in [1, 3, 7, 19, 20, 21, 2, 45, 1, 1, 13, 8, 64, 5] * 3:
        preds = []
        for _ in range(size):
            c = rng.random()
            preds.append(SimpleNamespace(source="edge", reason=Reason.CONFIDENT, confidence=c, class_index=rng.randrange(10),
                                         edge=None))
            ref.append(c < 0.5)
            unsure += c < 0.5
        answers += size
        monitor.observe(req, preds, None)
        window = monitor.snapshot(policy, "1")["window"]
        assert window["answers"] == len(ref)
        assert window["unsure_rate"] == pytest.approx(sum(ref) / len(ref))
        assert monitor._window_sum == sum(ref)
    counts = monitor._versions["1"]
    assert (counts.edge_ran, counts.unsure, counts.answers[("edge", "confident")]) == (answers, unsure, answers)


def test_flow_builds_route_contexts_in_the_rule_tables_field_order():
    """router.flow makes each RouteContext from a positional tuple (tuple.__new__, per image):
    a field added to or moved in the context must be added there too."""
    from router.rules import RouteContext

    assert RouteContext._fields == ("mode", "privacy", "now", "deadline", "reserve_s", "threshold", "confidence",
                                    "endpoints", "selection", "escalation_cap")


@pytest.mark.parametrize("attempt_end, answer_by, ends", [
    (10.000, 10.005, 10.010),  # the attempt ends before the request's deadline (the reserve)
    (10.000, 10.000, 10.005),
    (10.000, 9.990, 10.005),  # never before the attempt's own end
    (float("inf"), 10.0, float("inf")),
])
def test_an_abandoned_attempt_ends_itself_after_the_requests_deadline(attempt_end, answer_by, ends):
    """Its caller answers at the attempt's end; the attempt's clean-up waits until past the
    request's deadline, when the answers due then are given."""
    from router.api import _LATE_S, _late
    from router.effects import CloudCall

    call = CloudCall(state=None, x=np.zeros((1, 1)), pixels=None, timeout_s=0.050, budget_s=0.05, request_id="r",
                     deadline=attempt_end)
    late = _late(call, answer_by)
    assert _LATE_S == 0.005
    assert late.deadline == pytest.approx(ends)
    if attempt_end != float("inf"):
        assert late.timeout_s == pytest.approx(0.050 + (ends - attempt_end))
    else:
        assert late.timeout_s == pytest.approx(0.055)
