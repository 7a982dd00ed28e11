"""Progressive answers (router.progressive) against the real cloud service on loopback.

The edge's answer comes at once and the cloud's refinement when it lands; a late refinement
(a loopback proxy adding latency beyond the deadline) or a failing one (a server answering 500,
a stopped service) leaves the first answer standing and says why. Ordering is shown with a real
server that holds the inference answer until the test releases it -- never with sleeps. Every
wait is on a condition with a time bound; elapsed times are only checked against hang bounds.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cloud_service.launch import LocalService
from edge_model import EdgeModel
from router import Prediction, ProgressiveHandle, Reason, Router
from router.policy import parse_policy
from router.prediction import Timings
from router_tools.datasets import load_test
from router_tools.netsim import Behaviour, FaultServer, NetworkProxy, proxy_to, status

ROOT = Path(__file__).resolve().parent.parent
GENEROUS_MS = 20000.0  # tests about answers, not budgets: the deadline only bounds a hang
DEADLINE_MS = 300.0  # tests about lateness
NOISE_S = 0.5  # scheduling noise on a loaded 2-core machine on top of a deadline (a hang bound)
WAIT_S = 20.0  # bound of every condition wait

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def service():
    with LocalService() as svc:
        yield svc


@pytest.fixture(scope="module")
def images():
    """Low- and high-confidence test images for the shipped edge model, and a threshold between."""
    test = load_test()
    conf = EdgeModel().classify(list(test.images[:300])).max(axis=1)
    order = np.argsort(conf)
    low, high = order[:10], order[-10:]
    return {"low": test.images[low], "high": test.images[high],
            "threshold": float((conf[low].max() + conf[high].min()) / 2)}


def make_router(url: str, threshold: float, deadline_ms: float = GENEROUS_MS) -> Router:
    return Router(parse_policy({
        "confidence_threshold": threshold,
        "default_deadline_ms": deadline_ms,
        "cloud": {"endpoints": [{"url": url, "name": "svc", "initial_latency_ms": 20}],
                  "retry": {"max_attempts": 1}, "per_try_timeout_ms": GENEROUS_MS},
        "decision_log": False,
    }))


def wait_for(condition, what: str, timeout: float = WAIT_S) -> None:
    """Wait until ``condition()`` holds (polling a real server's counters), at most ``timeout`` s."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"not seen within {timeout:g} s: {what}")
        time.sleep(0.005)


class Gate(Behaviour):
    """Hold the request until the test opens the gate, then answer as ``then`` does (the real service)."""

    def __init__(self, then: Behaviour) -> None:
        self.open = threading.Event()
        self.then = then

    async def respond(self, ctx) -> bool:
        await asyncio.get_running_loop().run_in_executor(None, self.open.wait, WAIT_S)
        return await self.then.respond(ctx)


def free_closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: connections are refused
    return port


# ----------------------------------------------------------------------------- sync handle


def test_first_answer_comes_before_the_refinement_which_lands_from_the_cloud(service, images):
    gate = Gate(proxy_to("127.0.0.1", service.port))
    with FaultServer(upstream=("127.0.0.1", service.port), infer=gate) as fs, \
            make_router(fs.url, images["threshold"]) as r:
        h = r.predict_progressive(images["low"][0])
        # The first answer is in hand while the cloud still holds the refinement.
        assert (h.first.source, h.first.reason, h.first.fallback) == ("edge", Reason.PROVISIONAL, False)
        assert h.refining and not h.done()
        wait_for(lambda: fs.count(route="infer") == 1, "the refinement reached the server")
        assert not h.done()
        with pytest.raises(TimeoutError):
            h.final(timeout=0)
        landed = threading.Event()
        seen: list[ProgressiveHandle] = []
        h.add_done_callback(lambda handle: (seen.append(handle), landed.set()))
        assert not seen
        gate.open.set()
        final = h.final()
        assert landed.wait(WAIT_S) and seen == [h]
        assert (final.source, final.reason, final.fallback, final.endpoint) == ("cloud", Reason.LOW_CONFIDENCE,
                                                                                False, "svc")
        assert final.edge is not None and final.edge.label == h.first.label  # the edge's opinion travels along
        assert final.request_id == h.first.request_id
        assert final.timings.total_ms > h.first.timings.total_ms
        assert h.done() and h.final() is final and not h.cancel()
        h.add_done_callback(lambda handle: seen.append(handle))  # settled: called at once
        assert seen == [h, h]
        # Counted once, as predict would have answered it.
        assert r.stats()["by_source_reason"] == {"cloud/low_confidence": 1}


def test_refinement_is_the_cloud_answer_predict_gives(service, images):
    with make_router(service.url, images["threshold"]) as r:
        for img in images["low"][:3]:
            h = r.predict_progressive(img)
            final = h.final()
            direct = r.predict(img)
            assert final.source == direct.source == "cloud"
            np.testing.assert_allclose(final.probabilities, direct.probabilities, atol=1e-6)
            assert final.attempts == 1 and final.cloud_failure is None


def test_confident_edge_only_and_privacy_need_no_refinement(service, images):
    with FaultServer(upstream=("127.0.0.1", service.port)) as fs, make_router(fs.url, images["threshold"]) as r:
        cases = [(images["high"][0], {}, Reason.CONFIDENT), (images["low"][0], {"mode": "edge_only"}, Reason.MODE),
                 (images["low"][1], {"privacy": True}, Reason.PRIVACY)]
        for img, kwargs, reason in cases:
            h = r.predict_progressive(img, **kwargs)
            assert h.refining is False and h.done()
            assert h.final(timeout=0) is h.first
            assert (h.first.source, h.first.reason) == ("edge", reason)
        assert fs.connections == 0 and r.stats()["cloud_attempts"] == 0


def test_late_refinement_leaves_the_first_answer_standing(service, images):
    with NetworkProxy(service.url, "loopback") as proxy, \
            make_router(proxy.url_for(), images["threshold"], deadline_ms=DEADLINE_MS) as r:
        r.connect()  # model metadata read before the proxy slows down: this test is about the inference call
        proxy.set_mode("slow", slow_ms=5 * DEADLINE_MS)
        t0 = time.monotonic()
        h = r.predict_progressive(images["low"][0])
        assert h.first.reason is Reason.PROVISIONAL and h.refining
        final = h.final()
        assert time.monotonic() - t0 <= DEADLINE_MS / 1000 + NOISE_S  # a hang bound, not a speed claim
        assert (final.source, final.reason, final.fallback) == ("edge", Reason.REFINEMENT_LATE, True)
        assert final.cloud_failure is not None and final.cloud_failure.category == "timeout"
        assert (final.label, final.probabilities) == (h.first.label, h.first.probabilities)

        # Nobody waiting: the router settles the handle by itself when the deadline passes.
        h2 = r.predict_progressive(images["low"][1])
        settled = threading.Event()
        h2.add_done_callback(lambda handle: settled.set())
        assert settled.wait(DEADLINE_MS / 1000 + WAIT_S)
        assert h2.final(timeout=0).reason is Reason.REFINEMENT_LATE


@pytest.mark.parametrize("where, category", [("500", "server_error"), ("stopped", "unreachable")])
def test_failing_refinement_leaves_the_first_answer_standing_with_the_category(service, images, where, category):
    with FaultServer(upstream=("127.0.0.1", service.port), infer=status(500, {"error": "boom"})) as fs:
        url = fs.url if where == "500" else f"http://127.0.0.1:{free_closed_port()}"
        with make_router(url, images["threshold"]) as r:
            h = r.predict_progressive(images["low"][0])
            assert h.first.reason is Reason.PROVISIONAL
            final = h.final()
            assert (final.source, final.reason, final.fallback) == ("edge", Reason.REFINEMENT_FAILED, True)
            assert final.cloud_failure is not None and final.cloud_failure.category == category
            assert final.label == h.first.label and final.attempts == 1
            assert r.stats()["cloud_failures"] == {category: 1}


def test_cancel_stops_waiting_and_the_first_answer_stands(service, images):
    gate = Gate(proxy_to("127.0.0.1", service.port))
    with FaultServer(upstream=("127.0.0.1", service.port), infer=gate) as fs, \
            make_router(fs.url, images["threshold"]) as r:
        h = r.predict_progressive(images["low"][0])
        wait_for(lambda: fs.count(route="infer") == 1, "the refinement reached the server")
        assert h.cancel() and not h.cancel()
        final = h.final(timeout=0)
        assert (final.source, final.reason, final.fallback) == ("edge", Reason.REFINEMENT_CANCELLED, False)
        gate.open.set()  # the attempt in flight ends; its answer is dropped
        wait_for(lambda: r.stats()["requests"] == 1, "the flow ended")
        assert h.final() is final


def test_handle_settles_late_at_the_deadline_on_an_injected_clock():
    now = [0.0]
    first = Prediction(label="Bag", class_index=8, confidence=0.5, probabilities=[0.05] * 10, source="edge",
                       reason=Reason.PROVISIONAL, model_version="e", timings=Timings(edge_ms=1, total_ms=2),
                       request_id="r")
    h = ProgressiveHandle(first, refining=True, deadline=10.0, started=0.0, clock=lambda: now[0])
    assert not h.done()
    with pytest.raises(TimeoutError):
        h.final(timeout=0)
    now[0] = 10.0
    assert h.done()
    final = h.final(timeout=0)
    assert (final.reason, final.fallback, final.cloud_failure.category) == (Reason.REFINEMENT_LATE, True, "timeout")
    assert final.timings.total_ms == 10000.0 and not h.cancel()


# ----------------------------------------------------------------------------- async iterator


def test_async_iterator_yields_one_or_two_answers(service, images):
    async def collect(r, img, **kw):
        return [p async for p in r.apredict_progressive(img, **kw)]

    with NetworkProxy(service.url, "loopback") as proxy:
        async def run():
            async with make_router(proxy.url_for(), images["threshold"]) as r:
                low = await collect(r, images["low"][0])
                high = await collect(r, images["high"][0])
                private = await collect(r, images["low"][1], privacy=True)
                proxy.set_mode("slow", slow_ms=5 * DEADLINE_MS)
                late = await collect(r, images["low"][2], deadline_ms=DEADLINE_MS)
                return low, high, private, late

        low, high, private, late = asyncio.run(run())
    assert [(p.source, p.reason) for p in low] == [("edge", Reason.PROVISIONAL), ("cloud", Reason.LOW_CONFIDENCE)]
    assert [(p.source, p.reason) for p in high] == [("edge", Reason.CONFIDENT)]
    assert [(p.source, p.reason) for p in private] == [("edge", Reason.PRIVACY)]
    assert [p.reason for p in late] == [Reason.PROVISIONAL, Reason.REFINEMENT_LATE]
    assert late[1].cloud_failure.category == "timeout" and late[1].label == late[0].label


def test_async_consumer_that_stops_after_the_first_answer_starts_no_escalation(service, images):
    async def run(r):
        async for p in r.apredict_progressive(images["low"][0]):
            return p

    with FaultServer(upstream=("127.0.0.1", service.port)) as fs, make_router(fs.url, images["threshold"]) as r:
        first = asyncio.run(run(r))
        assert first.reason is Reason.PROVISIONAL
        assert fs.count(route="infer") == 0 and r.stats()["cloud_attempts"] == 0


# ----------------------------------------------------------------------------- privacy: no socket at all


def test_privacy_progressive_opens_no_socket():
    """A fresh interpreter with an audit hook: it sees every socket created, connected or resolved."""
    code = textwrap.dedent(
        """
        import asyncio, json, sys
        events = []
        sys.addaudithook(lambda event, args: events.append(event) if event.startswith("socket.") else None)
        from router import Router
        from router.policy import parse_policy
        from router_tools.datasets import load_test

        policy = parse_policy({"cloud": {"endpoints": [{"url": "http://cloud.example.invalid:8000"}],
                                         "health_probe_interval_s": 0.01},
                               "confidence_threshold": 0.999, "privacy_mode": True})
        images = load_test().images[:20]
        loop = asyncio.new_event_loop()  # the test's own loop: its self-pipe is a socket pair, made before counting
        events.clear()  # (the hook does see sockets: it saw that pair)
        with Router(policy) as r:
            handles = [r.predict_progressive(img) for img in images]
            async def collect():
                return [[p async for p in r.apredict_progressive(img)] for img in images[:5]]
            answers = loop.run_until_complete(collect())
        import threading
        print(json.dumps({"events": events, "refining": [h.refining for h in handles],
                          "reasons": sorted({h.final().reason.value for h in handles}),
                          "async": [len(a) for a in answers],
                          "io": [t.name for t in threading.enumerate() if t.name == "router-io"],
                          "min_conf": min(h.first.confidence for h in handles)}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["events"] == [] and result["io"] == []
    assert not any(result["refining"]) and result["reasons"] == ["privacy"] and result["async"] == [1] * 5
    assert result["min_conf"] < 0.999  # unsure images were among them, and still nothing left the device


# ----------------------------------------------------------------------------- the command


def test_cli_predict_progressive_prints_the_first_answer_then_the_refinement(service, tmp_path):
    import yaml

    from router_tools.datasets import SAMPLES_DIR

    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"confidence_threshold": 0.9999, "decision_log": False,
                                      "cloud": {"endpoints": [{"url": service.url, "name": "svc"}]}}))
    shirt = sorted(SAMPLES_DIR.glob("*shirt.png"))[0]  # far from certain on the edge

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "router_tools.cli", "predict", "--progressive", "--config",
                              str(policy), "--deadline-ms", str(GENEROUS_MS), *args, str(shirt)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    rows = [json.loads(line) for line in cli("--json")]
    assert [(r["stage"], r["source"], r["reason"]) for r in rows] == [("first", "edge", "provisional"),
                                                                       ("final", "cloud", "low_confidence")]
    assert rows[1]["after_first_ms"] > 0
    lines = cli()
    assert len(lines) == 2 and " provisional " in lines[0]
    assert "-> " in lines[1] and "cloud low_confidence" in lines[1] and "refined in" in lines[1]
