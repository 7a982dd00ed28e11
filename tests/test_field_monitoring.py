"""Field monitoring (router/audit.py, router/metrics.py, the service's /v1/fleet/report): shadow
audits against the real service on loopback, agreement per edge version, the drift alarm and its
rollback through the real signed release channel, the fleet report on the service's /metrics.
Every wait is a condition with a time bound."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from cloud_service.launch import LocalService
from edge_model.manifest import sha256_file
from edge_model.runtime import ARTIFACTS_DIR, OnnxClassifier
from router import Router
from router.errors import ConfigError, PrivacyViolation
from router.policy import parse_policy
from router_tools.datasets import load_test
from tests.support.cloud import running_service

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 30.0
KEY = "fleet-key-for-the-tests"


def wait_for(cond, timeout=WAIT_S, what="condition"):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)  # polling step, bounded by the deadline above


@pytest.fixture(scope="module")
def images():
    return list(load_test().images[:400])


@pytest.fixture(scope="module")
def service():
    with running_service() as svc:
        yield svc


def policy(url: str, **kw):
    return parse_policy({"decision_log": False, "default_deadline_ms": 5000,
                         "cloud": {"endpoints": [{"url": url, "name": "svc"}], "per_try_timeout_ms": 5000},
                         **kw})


def field(r: Router) -> dict:
    return r.stats()["field"]


def audits_settled(r: Router) -> bool:
    return field(r)["audits_pending"] == 0


def permuted_model(folder: Path, version: str = "9.9.9") -> Path:
    """A deliberately bad edge model: the shipped FP32 graph with its output classes rotated by one
    (same labels, same input, valid probabilities -- only a field audit can tell it is wrong)."""
    import onnx
    from onnx import helper, numpy_helper

    manifest = json.loads((ARTIFACTS_DIR / "edge-fp32.json").read_text())
    model = onnx.load(ARTIFACTS_DIR / manifest["file"])
    out = manifest["output_name"]
    for node in model.graph.node:
        node.output[:] = [f"{out}_raw" if o == out else o for o in node.output]
    n = len(manifest["labels"])
    model.graph.initializer.append(numpy_helper.from_array(np.roll(np.arange(n, dtype=np.int64), 1), "perm"))
    model.graph.node.append(helper.make_node("Gather", [f"{out}_raw", "perm"], [out], axis=1))
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "edge-bad.onnx")
    manifest.update(version=version, file="edge-bad.onnx", sha256=sha256_file(folder / "edge-bad.onnx"))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder / "manifest.json"


# ---------------------------------------------------------------------- audits


def test_audit_share_is_within_binomial_tolerance_and_agreement_is_kept_per_version(service, images):
    rate, n = 0.2, len(images)
    pol = policy(service.url, confidence_threshold=0.0, audit_rate=rate, audit_queue=10_000)
    with Router(pol, rng=random.Random(7)) as r:
        preds = [r.predict(img) for img in images]
        assert all(p.source == "edge" and p.reason.value == "confident" for p in preds)
        wait_for(lambda: audits_settled(r), what="the audits to finish")
        f = field(r)
        version = r.stats()["edge"]["version"]
        v = f["versions"][version]
        a = v["audits"]
        assert a["dropped"] == a["failed"] == a["skipped_budget"] == 0
        # Binomial(n, rate): within 4 standard deviations.
        assert abs(a["sent"] - rate * n) <= 4 * math.sqrt(n * rate * (1 - rate)), a
        assert v["requests"] == n and v["answers"] == {"edge/confident": n}
        assert 0.8 <= v["agreement"] <= 1.0  # the edge and the cloud mostly agree on the test split
        lo, hi = v["agreement_ci"]
        assert lo <= v["agreement"] <= hi
        assert f["alarm"] is None
        # No answer waited: audits are counted after the answers, by the I/O thread.
        assert r.stats()["cloud_attempts"] == 0


def test_privacy_requests_are_never_audited(service, images):
    pol = policy(service.url, confidence_threshold=0.0, audit_rate=1.0, audit_queue=10_000)
    with Router(pol) as r:
        for img in images[:50]:
            r.predict(img, privacy=True)
        assert audits_settled(r)
        v = field(r)["versions"][r.stats()["edge"]["version"]]
        assert v["audits"]["sent"] == 0 and v["answers"] == {"edge/privacy": 50}
        for img in images[:50]:  # edge_only: never the network, so never an audit either
            r.predict(img, mode="edge_only")
        assert audits_settled(r)
        v = field(r)["versions"][r.stats()["edge"]["version"]]
        assert v["audits"]["sent"] == 0 and v["answers"] == {"edge/privacy": 50, "edge/mode": 50}


def test_a_full_audit_queue_drops_instead_of_waiting(service, images):
    pol = policy(service.url, confidence_threshold=0.0, audit_rate=1.0, audit_queue=1)
    with Router(pol) as r:
        r.predict_batch(images[:50])  # 50 rows sampled at once, room for one
        wait_for(lambda: audits_settled(r), what="the audit to finish")
        a = field(r)["versions"][r.stats()["edge"]["version"]]["audits"]
        assert (a["sent"], a["dropped"]) == (1, 49)


def test_audits_are_charged_to_the_escalation_budget(service, images):
    pol = policy(service.url, confidence_threshold=0.0, audit_rate=1.0, audit_queue=10_000,
                 cloud={"endpoints": [{"url": service.url}], "per_try_timeout_ms": 5000,
                        "budget": {"rate_per_s": 0.001, "burst": 5}})
    with Router(pol) as r:
        for img in images[:20]:
            r.predict(img)
        wait_for(lambda: audits_settled(r), what="the audits to finish")
        a = field(r)["versions"][r.stats()["edge"]["version"]]["audits"]
        assert a["sent"] == 5 and a["skipped_budget"] == 15
        assert r.stats()["escalation_budget"]["charged"].get("audit") == 5


_PRIVACY_RUN = """
import json, sys
events = []
sys.addaudithook(lambda e, a: events.append(e) if e.startswith("socket.") else None)
from router import Router
from router.policy import parse_policy
from router_tools.datasets import load_test
images = list(load_test().images[:50])
with Router(parse_policy(json.loads(sys.argv[1]))) as r:
    preds = [r.predict(img) for img in images]
    f = r.stats()["field"]
print(json.dumps({"events": sorted(set(events)), "reasons": sorted({p.reason.value for p in preds}),
                  "audits": sum(v["audits"]["sent"] for v in f["versions"].values())}))
"""


def _run(pol: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_PRIVACY_RUN), json.dumps(pol)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_privacy_mode_with_audits_and_fleet_reports_opens_no_socket(service):
    pol = {"confidence_threshold": 0.0, "audit_rate": 1.0, "fleet_report_interval_s": 0.01, "decision_log": False,
           "cloud": {"endpoints": [{"url": service.url}]}}
    result = _run({**pol, "privacy_mode": True})
    assert result == {"events": [], "reasons": ["privacy"], "audits": 0}
    # The same harness without privacy sees the audits' sockets, or the assertion above proves nothing.
    result = _run(pol)
    assert "socket.connect" in result["events"] and result["reasons"] == ["confident"]


# ---------------------------------------------------------------------- drift alarm


def test_a_bad_edge_model_trips_the_agreement_alarm(service, images, tmp_path, caplog):
    bad = OnnxClassifier(permuted_model(tmp_path / "bad"))
    pol = policy(service.url, confidence_threshold=0.0, audit_rate=1.0, audit_queue=10_000, agreement_floor=0.8)
    with Router(pol, edge_model=bad) as r, caplog.at_level("WARNING", logger="router.field"):
        for img in images[:60]:
            r.predict(img)
        wait_for(lambda: field(r)["alarm"] is not None, what="the agreement alarm")
        alarm = field(r)["alarm"]
        assert alarm["kind"] == "agreement" and alarm["version"] == "9.9.9"
        assert alarm["rollback"] is None  # drift.rollback is off
        assert any("drift alarm" in rec.getMessage() for rec in caplog.records)
        v = field(r)["versions"]["9.9.9"]
        assert v["agreement_ci"][1] < 0.8


def test_the_escalation_band_alarm():
    # edge_only: no cloud. Nearly every answer is under a 0.9999 threshold, far from the 5 % calibrated.
    pol = parse_policy({"mode": "edge_only", "decision_log": False, "confidence_threshold": 0.9999,
                        "drift": {"window": 50, "expected_escalation": 0.05}})
    with Router(pol) as r:
        for img in load_test().images[:60]:
            r.predict(img)
        alarm = field(r)["alarm"]
        assert alarm is not None and alarm["kind"] == "escalation"
        # Inside the band: no alarm.
    pol = parse_policy({"mode": "edge_only", "decision_log": False, "confidence_threshold": 0.0,
                        "drift": {"window": 50, "expected_escalation": 0.0}})
    with Router(pol) as r:
        for img in load_test().images[:60]:
            r.predict(img)
        assert field(r)["alarm"] is None and field(r)["window"]["unsure_rate"] == 0.0


def test_a_bad_release_is_rolled_back_by_its_shadow_agreement(service, images, tmp_path):
    pytest.importorskip("tuf", reason="the updates extra is not installed")
    from router_tools import release as rel
    from tests.test_updates import StaticServer, candidate

    repo = rel.Repo.at(tmp_path / "repo")
    rel.create_keys(repo)
    static = StaticServer(repo.public)
    try:
        rel.publish(repo, candidate(tmp_path, "2.0.0"))
        pol = policy(service.url, confidence_threshold=0.0, audit_rate=1.0, audit_queue=10_000,
                     agreement_floor=0.8, drift={"rollback": True},
                     updates={"enabled": True, "url": static.url, "root": str(repo.trust_anchor),
                              "dir": str(tmp_path / "device"), "check_interval_s": 3600})
        with Router(pol) as r:
            wait_for(lambda: r.stats()["edge"]["version"] == "2.0.0", what="the good release to be installed")
            rel.publish(repo, permuted_model(tmp_path / "bad", "3.0.0"))  # no golden set: it validates
            r.updater.wake()
            wait_for(lambda: r.stats()["edge"]["version"] == "3.0.0", what="the bad release to be installed")
            # Keep answering until the alarm has rolled it back: no request fails meanwhile.
            i = 0
            while r.stats()["edge"]["version"] == "3.0.0":
                r.predict(images[i % len(images)])
                i += 1
                assert i < 5000, "no rollback"
            wait_for(lambda: (field(r)["alarm"] or {}).get("rollback") is not None, what="the rollback")
            alarm = field(r)["alarm"]
            assert (alarm["kind"], alarm["version"], alarm["rollback"]) == ("agreement", "3.0.0", "2.0.0")
            assert r.stats()["edge"]["version"] == "2.0.0"
            assert "3.0.0" in r.updater.status()["refused"]
    finally:
        static.close()


# ---------------------------------------------------------------------- fleet report


def _scrape(svc) -> str:
    return httpx.get(svc.url + "/metrics", timeout=10, trust_env=False).text


def _sample(text: str, name: str, **labels) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_fleet_report_reaches_the_service_metrics(images, monkeypatch):
    monkeypatch.setenv("TEST_FLEET_KEY", KEY)
    with LocalService(overrides={"auth.api_keys_env": "TEST_FLEET_KEYS"}, env={"TEST_FLEET_KEYS": KEY}) as svc:
        pol = parse_policy({"decision_log": False, "default_deadline_ms": 5000, "confidence_threshold": 0.0,
                            "audit_rate": 0.5, "audit_queue": 10_000, "fleet_report_interval_s": 0.05,
                            "cloud": {"endpoints": [{"url": svc.url, "api_key_env": "TEST_FLEET_KEY"}],
                                      "per_try_timeout_ms": 5000}})
        with Router(pol, rng=random.Random(3)) as r:
            version = r.stats()["edge"]["version"]
            for img in images[:100]:
                r.predict(img)
            wait_for(lambda: audits_settled(r), what="the audits")
            audited = field(r)["versions"][version]["audits"]["sent"]
            name = "hybrid_cloud_fleet_counts_total"
            wait_for(lambda: _sample(_scrape(svc), name, edge_version=version, kind="audited") == audited,
                     what="the fleet report on the service's /metrics")
            text = _scrape(svc)
            assert _sample(text, name, edge_version=version, kind="answers") == 100
            agreed = field(r)["versions"][version]["audits"]["agreed"]
            assert _sample(text, "hybrid_cloud_fleet_agreement", edge_version=version) == pytest.approx(agreed / audited)
            assert _sample(text, "hybrid_cloud_fleet_escalation_rate", edge_version=version) == 0.0
            assert field(r)["fleet_reports"]["sent"] >= 1 and field(r)["fleet_reports"]["last_error"] is None


def test_bad_fleet_reports_get_4xx_json():
    with LocalService(overrides={"auth.api_keys_env": "TEST_FLEET_KEYS"}, env={"TEST_FLEET_KEYS": KEY}) as svc:
        url = svc.url + "/v1/fleet/report"
        auth = {"authorization": f"Bearer {KEY}"}
        cases = [
            (b"not json", auth, 400),
            (b"[1, 2]", auth, 400),
            (json.dumps({"versions": {"1.0": {"answers": -1}}}).encode(), auth, 400),
            (json.dumps({"versions": {"1.0": {"answers": 1.5}}}).encode(), auth, 400),
            (json.dumps({"versions": {"1.0": {"inputs": 3}}}).encode(), auth, 400),
            (json.dumps({"versions": {"1.0": {"audited": 1, "agreed": 2}}}).encode(), auth, 400),
            (json.dumps({"versions": {"<script>": {"answers": 1}}}).encode(), auth, 400),
            (json.dumps({"versions": {f"v{i}": {"answers": 1} for i in range(17)}}).encode(), auth, 400),
            (b'{"versions": {"1.0": {"answers": 1}}, "pad": "' + b"x" * 20_000 + b'"}', auth, 413),
            (json.dumps({"versions": {"1.0": {"answers": 1}}}).encode(), {}, 401),
        ]
        with httpx.Client(trust_env=False, timeout=10) as c:
            for body, headers, status in cases:
                resp = c.post(url, content=body, headers=headers)
                assert resp.status_code == status, (body[:60], resp.text)
                assert "\n" not in resp.json()["error"]
            # Label cardinality is bounded: 40 versions reported, at most 32 labels plus "other".
            for start in range(0, 40, 10):
                resp = c.post(url, headers=auth, content=json.dumps(
                    {"versions": {f"0.{i}": {"answers": 1} for i in range(start, start + 10)}}))
                assert resp.status_code == 200, resp.text
            text = _scrape(svc)
        from prometheus_client.parser import text_string_to_metric_families

        labels = {s.labels["edge_version"] for fam in text_string_to_metric_families(text)
                  for s in fam.samples if s.name == "hybrid_cloud_fleet_counts_total"}
        assert len(labels) == 33 and "other" in labels
        assert _sample(text, "hybrid_cloud_fleet_counts_total", edge_version="other", kind="answers") == 8


# ---------------------------------------------------------------------- device exporter


def test_device_exporter_serves_answers_agreement_breakers_and_latency(service, images):
    pytest.importorskip("prometheus_client")
    from router import metrics

    pol = policy(service.url, confidence_threshold=0.0, audit_rate=1.0, audit_queue=10_000)
    with Router(pol) as r:
        for img in images[:20]:
            r.predict(img)
        wait_for(lambda: audits_settled(r), what="the audits")
        server, _ = metrics.serve(0, router=r)
        try:
            port = server.server_address[1]
            assert server.server_address[0] == "127.0.0.1"
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
        finally:
            server.shutdown()
            server.server_close()
        version = r.stats()["edge"]["version"]
        assert _sample(text, "hybrid_router_answers_total", source="edge", reason="confident") == 20
        assert _sample(text, "hybrid_router_edge_answers_total", edge_version=version) == 20
        assert _sample(text, "hybrid_router_edge_agreement", edge_version=version, bound="upper") <= 1.0
        assert _sample(text, "hybrid_router_breaker_state", endpoint="svc", state="closed") == 1.0
        assert _sample(text, "hybrid_router_request_latency_seconds_count", source="edge", reason="confident") == 20
        assert _sample(text, "hybrid_router_drift_alarm") == 0.0


def test_device_exporter_refuses_privacy_and_names_the_extra(monkeypatch):
    from router import metrics

    with Router(parse_policy({"privacy_mode": True, "decision_log": False})) as r:
        with pytest.raises(PrivacyViolation):
            metrics.serve(0, router=r)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "prometheus_client" else real(n, *a))
    with pytest.raises(ConfigError) as info:
        metrics.registry_for(None)
    assert "pip install 'hybrid-edge-router[metrics]'" in str(info.value) and "\n" not in str(info.value)


def test_the_agreement_alarm_waits_for_enough_audits():
    # A Wilson bound looked at after every audit would fire on a good model's first disagreement
    # (0/1 agreed: upper bound 0.79 < a 0.9 floor); MIN_AUDITS audits are needed first.
    from router.audit import MIN_AUDITS, FieldMonitor

    pol = parse_policy({"agreement_floor": 0.9, "decision_log": False})
    mon = FieldMonitor(router=None)
    mon._check_agreement("2.0.0", pol, 0, 1)
    mon._check_agreement("2.0.0", pol, MIN_AUDITS - 5, MIN_AUDITS - 1)
    assert mon.alarm is None
    mon._check_agreement("2.0.0", pol, MIN_AUDITS // 2, MIN_AUDITS)
    assert mon.alarm["kind"] == "agreement" and mon.alarm["audited"] == MIN_AUDITS
    assert mon.alarm["agreed"] == MIN_AUDITS // 2 and mon.alarm["upper"] < 0.9
