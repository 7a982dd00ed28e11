"""The router against the real cloud service (uvicorn on a loopback port) and against real
misbehaving loopback servers (router_tools.netsim): every fault answered correctly and within the
deadline. Nothing in the client is mocked."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time

import numpy as np
import pytest

from cloud_service.launch import LocalService
from edge_model import EdgeModel, OnnxClassifier
from router_tools.datasets import load_test
from edge_model.runtime import DEFAULT_EDGE_MANIFEST
from router import PredictionUnavailable, Reason, Router
from router_tools.netsim import FaultServer, blackhole, close, garbage, proxy_to, sequence, slow, status
from router.policy import parse_policy

DEADLINE_MS = 300.0
# Scheduling noise allowed on top of a deadline on a loaded 2-core machine (a hang bound, not a speed goal).
NOISE_S = 0.15
CLOUD_MANIFEST = "cloud_service/artifacts/cloud-fp32.json"


@pytest.fixture(scope="module")
def service():
    with LocalService() as svc:
        yield svc


@pytest.fixture(scope="module")
def images():
    """Low- and high-confidence test images for the shipped edge model, and a threshold between."""
    test = load_test()
    edge = EdgeModel()
    conf = edge.classify(list(test.images[:400])).max(axis=1)
    order = np.argsort(conf)
    low, high = order[:40], order[-40:]
    threshold = float((conf[low].max() + conf[high].min()) / 2)
    return {"low": test.images[low], "high": test.images[high], "threshold": threshold,
            "low_labels": test.labels[low]}


def make_router(url: str, threshold: float, **cloud) -> Router:
    retry = cloud.pop("retry", {"max_attempts": 3, "initial_backoff_ms": 5, "max_backoff_ms": 20})
    policy = parse_policy({
        "confidence_threshold": threshold,
        "default_deadline_ms": DEADLINE_MS,
        "cloud": {"endpoints": [{"url": url, "name": "svc", "initial_latency_ms": 20}], "retry": retry,
                  "per_try_timeout_ms": 1000, **cloud},
        "decision_log": False,
    })
    return Router(policy)


def free_closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: connections are refused
    return port


def timed(fn, *args, **kw):
    t0 = time.monotonic()
    out = fn(*args, **kw)
    return out, time.monotonic() - t0


# ----------------------------------------------------------------------------- happy paths


def test_confident_requests_stay_on_the_edge(service, images):
    with FaultServer(upstream=("127.0.0.1", service.port)) as fs, make_router(fs.url, images["threshold"]) as r:
        preds = [r.predict(img) for img in images["high"][:20]]
        assert {(p.source, p.reason) for p in preds} == {("edge", Reason.CONFIDENT)}
        assert fs.connections == 0  # not even the metadata: nothing escalated


def test_low_confidence_escalates_to_the_real_service(service, images):
    cloud = OnnxClassifier(CLOUD_MANIFEST)
    with make_router(service.url, images["threshold"]) as r:
        # A generous deadline: this test is about the answers, not about budgets.
        preds = [r.predict(img, deadline_ms=5000) for img in images["low"][:20]]
        assert {(p.source, p.reason) for p in preds} == {("cloud", Reason.LOW_CONFIDENCE)}
        expected = cloud.classify(list(images["low"][:20]))
        got = np.array([p.probabilities for p in preds])
        np.testing.assert_allclose(got, expected, atol=1e-5)  # the UINT8 path gives the cloud model's exact answer
        assert all(p.edge is not None and p.endpoint == "svc" and p.attempts == 1 for p in preds)
        assert preds[0].model_version == cloud.version
        stats = r.stats()
        assert stats["endpoints"]["svc"]["input_datatype"] == "UINT8"
        assert stats["by_source_reason"] == {"cloud/low_confidence": 20}


def test_batch_sends_one_request_for_the_unsure_rows(service, images):
    with FaultServer(upstream=("127.0.0.1", service.port)) as fs, make_router(fs.url, images["threshold"]) as r:
        batch = list(images["high"][:3]) + list(images["low"][:4])
        preds = r.predict_batch(batch)
        assert [p.source for p in preds] == ["edge"] * 3 + ["cloud"] * 4
        assert fs.count(route="infer") == 1


def test_async_api_shares_the_core(service, images):
    async def main():
        async with make_router(service.url, images["threshold"]) as r:
            # A generous deadline: this test is about the async front-end, not about budgets.
            preds = await asyncio.gather(*(r.apredict(img, deadline_ms=5000) for img in images["low"][:16]))
            preds += await r.apredict_batch(list(images["high"][:4]), deadline_ms=5000)
            return preds

    preds = asyncio.run(main())
    assert [p.source for p in preds] == ["cloud"] * 16 + ["edge"] * 4


# ----------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    "behaviour, attempts",
    [
        pytest.param(blackhole(), None, id="blackholed"),
        pytest.param(slow(5.0), None, id="slow"),
        pytest.param(status(500, {"error": "boom"}), 1, id="500-not-retried"),
        pytest.param(status(401, {"error": "bad key"}), 1, id="401-not-retried"),
        pytest.param(garbage("text"), 1, id="garbage-body"),
        pytest.param(garbage("wrong_schema"), 1, id="wrong-schema"),
        pytest.param(garbage("wrong_shape"), 1, id="wrong-shape"),
        pytest.param(garbage("truncated"), None, id="truncated-body"),
        pytest.param(close(), None, id="closed-connection"),
        pytest.param(status(503, {"error": "busy"}, {"Retry-After": "10"}), 1, id="503-retry-after-too-long"),
    ],
)
def test_cloud_faults_fall_back_to_the_edge_within_the_deadline(service, images, behaviour, attempts):
    with FaultServer(upstream=("127.0.0.1", service.port), infer=behaviour) as fs, \
            make_router(fs.url, images["threshold"]) as r:
        for n, img in enumerate(images["low"][:3]):
            p, elapsed = timed(r.predict, img)
            assert elapsed <= DEADLINE_MS / 1000 + NOISE_S
            assert (p.source, p.fallback, p.edge) == ("edge", True, None)
            if n > 0 and p.reason == Reason.BREAKER_OPEN:  # retried failures may open the breaker early
                assert p.attempts == 0
                continue
            assert p.reason == Reason.CLOUD_ERROR and p.attempts >= 1
            if attempts is not None:
                assert p.attempts == attempts


def test_closed_port_falls_back_within_the_deadline(images):
    with make_router(f"http://127.0.0.1:{free_closed_port()}", images["threshold"]) as r:
        reasons = []
        for img in images["low"][:3]:
            p, elapsed = timed(r.predict, img)
            assert (p.source, p.fallback) == ("edge", True)
            assert elapsed <= DEADLINE_MS / 1000 + NOISE_S
            reasons.append(p.reason)
        assert reasons[0] == Reason.CLOUD_ERROR and set(reasons) <= {Reason.CLOUD_ERROR, Reason.BREAKER_OPEN}


def test_503_with_short_retry_after_is_retried(service, images):
    flaky = sequence([status(503, {"error": "busy"}, {"Retry-After": "0.02"})], then=proxy_to("127.0.0.1", service.port))
    with FaultServer(upstream=("127.0.0.1", service.port), infer=flaky) as fs, \
            make_router(fs.url, images["threshold"]) as r:
        p, elapsed = timed(r.predict, images["low"][0])
        assert (p.source, p.attempts) == ("cloud", 2)
        assert fs.count(route="infer") == 2
        assert elapsed >= 0.02  # the server's Retry-After was honoured


def test_breaker_opens_stops_connecting_then_recovers_through_half_open(service, images):
    fs = FaultServer(upstream=("127.0.0.1", service.port), infer=status(502, {"error": "bad gateway"}))
    with fs, make_router(fs.url, images["threshold"], retry={"max_attempts": 1},
                         breaker={"failure_threshold": 3, "open_duration_s": 0.5}) as r:
        reasons = [r.predict(img).reason for img in images["low"][:3]]
        assert reasons == [Reason.CLOUD_ERROR] * 3
        seen = fs.count(route="infer")
        conns = fs.connections
        for img in images["low"][3:13]:
            p, elapsed = timed(r.predict, img)
            assert (p.source, p.reason, p.fallback, p.attempts) == ("edge", Reason.BREAKER_OPEN, True, 0)
            assert elapsed < DEADLINE_MS / 1000  # answered at once, no connection attempt
        assert fs.count(route="infer") == seen and fs.connections == conns
        assert r.stats()["endpoints"]["svc"]["breaker"] == "open"
        fs.set(infer=None)  # the service recovers
        time.sleep(0.6)
        p = r.predict(images["low"][13])  # the half-open trial
        assert p.source == "cloud"
        assert r.stats()["endpoints"]["svc"]["breaker"] == "closed"


def test_broken_edge_model_escalates(service, images, tmp_path):
    for f in ("edge-int8.json", "edge-int8.onnx"):
        shutil.copy(DEFAULT_EDGE_MANIFEST.parent / f, tmp_path / f)
    with open(tmp_path / "edge-int8.onnx", "r+b") as fh:  # corrupt it: the sha256 no longer matches
        fh.seek(100)
        fh.write(b"\xff" * 16)
    policy = parse_policy({"edge": {"manifest": str(tmp_path / "edge-int8.json")},
                           "cloud": {"endpoints": [{"url": service.url}]}, "decision_log": False})
    with Router(policy) as r:
        p = r.predict(images["high"][0])
        assert (p.source, p.reason, p.fallback, p.edge) == ("cloud", Reason.EDGE_ERROR, True, None)
        assert r.stats()["edge_model"]["available"] is False
    # both broken: a typed error carrying both causes, within the deadline
    policy = parse_policy({"edge": {"manifest": str(tmp_path / "edge-int8.json")}, "default_deadline_ms": DEADLINE_MS,
                           "cloud": {"endpoints": [{"url": f"http://127.0.0.1:{free_closed_port()}"}]}})
    with Router(policy) as r:
        t0 = time.monotonic()
        with pytest.raises(PredictionUnavailable) as info:
            r.predict(images["high"][0])
        assert time.monotonic() - t0 <= DEADLINE_MS / 1000 + NOISE_S
        assert info.value.edge_error is not None and info.value.cloud_error is not None


def test_api_key_from_the_env_var_named_in_the_policy(images, monkeypatch):
    monkeypatch.setenv("TEST_ROUTER_KEY", "s3cret-key-for-the-tests")
    with LocalService(overrides={"auth.api_keys_env": "TEST_SERVICE_KEYS"}, env={"TEST_SERVICE_KEYS": "s3cret-key-for-the-tests"}) as svc:
        for key_env, source in (("TEST_ROUTER_KEY", "cloud"), ("TEST_ROUTER_NO_KEY", "edge")):
            policy = parse_policy({"confidence_threshold": images["threshold"], "decision_log": False,
                                   "default_deadline_ms": 5000,  # this test is about keys, not budgets
                                   "cloud": {"endpoints": [{"url": svc.url, "api_key_env": key_env}]}})
            with Router(policy) as r:
                p = r.predict(images["low"][0])
                assert p.source == source
                if source == "edge":  # 401: not retried, answered locally
                    assert (p.reason, p.attempts) == (Reason.CLOUD_ERROR, 1)


def test_failover_across_two_real_services_when_one_is_killed(images):
    with LocalService() as a, LocalService() as b:
        policy = parse_policy({
            "confidence_threshold": images["threshold"], "default_deadline_ms": DEADLINE_MS, "decision_log": False,
            "cloud": {"selection": "priority",
                      "endpoints": [{"url": a.url, "name": "a", "priority": 0}, {"url": b.url, "name": "b", "priority": 1}]},
        })
        with Router(policy) as r:
            first = [r.predict(img) for img in images["low"][:5]]
            assert {p.endpoint for p in first} == {"a"}
            a.kill()
            t0 = time.monotonic()
            after = [r.predict(img) for img in images["low"][5:25]]
            assert all(p.source == "cloud" and p.endpoint == "b" for p in after)
            assert time.monotonic() - t0 <= 20 * (DEADLINE_MS / 1000 + NOISE_S)
            assert after[0].attempts == 2  # a refused, b answered, in the same request


def test_policy_file_reload_swaps_atomically(service, images, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(f"confidence_threshold: 0.0\nreload_check_interval_s: 0.05\ndecision_log: false\n"
                    f"cloud: {{url: '{service.url}'}}\n")
    with Router.from_config(path) as r:
        assert r.predict(images["low"][0]).reason == Reason.CONFIDENT
        path.write_text(path.read_text().replace("confidence_threshold: 0.0", "confidence_threshold: 1.0"))
        time.sleep(0.1)
        assert r.predict(images["low"][0]).source == "cloud"
        path.write_text("confidence_threshold: 7\n")  # an invalid edit keeps the last good policy
        time.sleep(0.1)
        assert r.predict(images["low"][0]).source == "cloud"
        assert r.policy.confidence_threshold == 1.0
