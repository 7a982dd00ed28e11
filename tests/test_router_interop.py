"""The router escalating to a third-party Open Inference Protocol v2 server -- NVIDIA's
tritonserver, bundled by nvidia-pytriton, serving the shipped cloud model -- gets the same
answers as from our own service, following each server's metadata (FP32 for Triton, compact
UINT8 for ours). Both servers are real processes on loopback ports."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pytriton")

from cloud_service.launch import LocalService  # noqa: E402
from cloud_service.triton import TritonModelServer  # noqa: E402
from router_tools.datasets import load_test  # noqa: E402
from router import Reason, Router  # noqa: E402
from router.policy import parse_policy  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def _router(*endpoints, **policy) -> Router:
    return Router(parse_policy({"default_deadline_ms": 5000, "decision_log": False,  # about answers, not budgets
                                # one attempt may take the whole budget: a 40-row FP32 batch to Triton
                                # took 1.3-1.5 s on a loaded 2-core machine (the default cap is 1 s)
                                "cloud": {"endpoints": list(endpoints), "selection": "priority",
                                          "per_try_timeout_ms": 5000}, **policy}))


@pytest.fixture(scope="module")
def servers():
    with TritonModelServer(max_batch_size=16, max_queue_delay_us=500, startup_timeout_s=120) as triton, \
            LocalService() as ours:
        yield triton, ours


def test_same_answers_from_triton_and_from_our_service(servers):
    triton, ours = servers
    images = list(load_test().images[:24])
    with _router({"url": triton.url, "name": "triton"}) as rt, _router({"url": ours.url, "name": "ours"}) as ro:
        via_triton = [rt.predict(img, mode="cloud_only") for img in images]
        via_ours = [ro.predict(img, mode="cloud_only") for img in images]
        batch = rt.predict_batch(images[:8], mode="cloud_only")  # one v2 request with 8 rows
        assert rt.stats()["endpoints"]["triton"]["input_datatype"] == "FP32"
        assert ro.stats()["endpoints"]["ours"]["input_datatype"] == "UINT8"
    assert all(p.source == "cloud" and p.endpoint == "triton" for p in via_triton)
    np.testing.assert_allclose([p.probabilities for p in via_triton], [p.probabilities for p in via_ours], atol=1e-5)
    assert [p.class_index for p in via_triton] == [p.class_index for p in via_ours]
    np.testing.assert_allclose([p.probabilities for p in batch], [p.probabilities for p in via_triton[:8]], atol=1e-5)


def test_cascade_escalates_to_triton_and_fails_over_to_our_service(servers):
    triton, ours = servers
    images = list(load_test().images[:40])
    # Triton refuses requests over its max_batch_size (16 here); the router splits escalations to fit.
    endpoints = ({"url": triton.url, "name": "triton", "priority": 0, "max_batch_size": 16},
                 {"url": ours.url, "name": "ours", "priority": 1})
    with _router(*endpoints, confidence_threshold=1.0) as r:
        preds = r.predict_batch(images)
        unsure = [p for p in preds if p.source == "cloud"]
        assert unsure and all(p.reason == Reason.LOW_CONFIDENCE and p.endpoint == "triton" for p in unsure)
        assert len(unsure) > 16  # so the escalation really was split
        # Failover from the foreign server to ours: with Triton's breaker open, our service answers.
        state = next(s for s in r._snap.states if s.endpoint.name == "triton")
        for _ in range(state.breaker.settings.failure_threshold):
            state.breaker.record_failure()
        p = r.predict(images[0], mode="cloud_only")
        assert (p.source, p.endpoint) == ("cloud", "ours")
