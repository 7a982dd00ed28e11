"""Dynamic batching, load shedding, deadlines and graceful shutdown of the real service.

Each scenario runs its own service configured to make the behaviour deterministic (long batch
windows, tiny queues), observed through its answers and its Prometheus metrics. Timing bounds
here only catch hangs; none measures speed.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from tests.support.cloud import (
    MODEL,
    TIMEOUT,
    async_client,
    client,
    infer_path,
    metric,
    metrics,
    output,
    running_service,
    sample_pixels,
    v2_body,
)

pytestmark = pytest.mark.timeout(60)

EXEC = "hybrid_cloud_execution_count_total"
ROWS = "hybrid_cloud_inference_count_total"


async def _concurrent(svc, bodies: list[dict]) -> list[httpx.Response]:
    async with async_client(svc) as c:
        return await asyncio.gather(*(c.post(infer_path(), json=b) for b in bodies))


def test_concurrent_requests_are_coalesced_into_batches():
    pixels = sample_pixels(16)
    with running_service({"batching.max_batch_size": 64, "batching.max_queue_delay_ms": 300,
                          "batching.dispatch_when_idle": False}) as svc:
        before = metrics(svc)
        responses = asyncio.run(_concurrent(svc, [v2_body(pixels[i:i + 1], request_id=str(i)) for i in range(16)]))
        after = metrics(svc)
        # every request got its own answer back from the shared batch
        with client(svc) as c:
            reference = output(c.post(infer_path(), json=v2_body(pixels)).json(), "probabilities")
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        assert r.json()["id"] == str(i)
        np.testing.assert_allclose(output(r.json(), "probabilities")[0], reference[i], atol=1e-5)
    executions = metric(after, EXEC, model=MODEL) - metric(before, EXEC, model=MODEL)
    rows = metric(after, ROWS, model=MODEL) - metric(before, ROWS, model=MODEL)
    assert rows == 16
    assert executions < 16, "no two requests shared an ONNX Runtime call"
    batch_sum = metric(after, "hybrid_cloud_batch_size_sum", model=MODEL) - metric(before, "hybrid_cloud_batch_size_sum", model=MODEL)
    assert batch_sum == 16
    assert metric(after, "hybrid_cloud_queue_duration_seconds_count", model=MODEL) >= 16


def test_batching_off_runs_every_request_alone():
    pixels = sample_pixels(8)
    with running_service({"batching.enabled": False}) as svc:
        before = metrics(svc)
        responses = asyncio.run(_concurrent(svc, [v2_body(pixels[i:i + 1]) for i in range(8)]))
        after = metrics(svc)
    assert all(r.status_code == 200 for r in responses)
    assert metric(after, EXEC, model=MODEL) - metric(before, EXEC, model=MODEL) == 8
    assert metric(after, ROWS, model=MODEL) - metric(before, ROWS, model=MODEL) == 8


@pytest.fixture(scope="module")
def slow_queue():
    """Batches wait 2 s to fill and at most 3 requests may wait: easy to overfill, easy to expire."""
    with running_service({"batching.max_batch_size": 64, "batching.max_queue_delay_ms": 2000,
                          "batching.max_queue_size": 3, "batching.dispatch_when_idle": False}) as svc:
        yield svc


def test_request_whose_budget_ends_before_the_batch_window_is_503_and_not_computed(slow_queue):
    # Admission by expected wait: the 2 s window cannot fit a 200 ms budget, so the request is
    # refused at once instead of being queued to expire (a 504 after queueing is covered by the
    # batcher's unit tests).
    svc = slow_queue
    before = metrics(svc)
    t0 = time.monotonic()
    with client(svc) as c:
        r = c.post(infer_path(), json=v2_body(sample_pixels(1), timeout_us=200_000))
    elapsed = time.monotonic() - t0
    after = metrics(svc)
    assert r.status_code == 503, r.text
    assert "budget" in r.json()["error"] and int(r.headers["Retry-After"]) >= 1
    assert elapsed < 1.9  # answered at once, not when the 2 s batch window would have closed
    key = dict(model=MODEL, reason="expected_wait")
    assert metric(after, "hybrid_cloud_rejected_requests_total", **key) == metric(before, "hybrid_cloud_rejected_requests_total", **key) + 1
    assert metric(after, ROWS, model=MODEL) == metric(before, ROWS, model=MODEL)  # nothing computed


def test_overfull_queue_sheds_with_503_and_retry_after(slow_queue):
    svc = slow_queue
    pixels = sample_pixels(1)

    async def main():
        async with async_client(svc) as c:
            queued = [asyncio.ensure_future(c.post(infer_path(), json=v2_body(pixels))) for _ in range(3)]
            while metric(metrics(svc), "hybrid_cloud_queue_depth", model=MODEL) < 3:  # all three waiting
                await asyncio.sleep(0.05)
            shed = await asyncio.gather(*(c.post(infer_path(), json=v2_body(pixels)) for _ in range(2)))
            return await asyncio.gather(*queued), shed

    before = metrics(svc)
    done, shed = asyncio.run(main())
    after = metrics(svc)
    for r in shed:
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert "queue full" in r.json()["error"]
    assert [r.status_code for r in done] == [200, 200, 200]  # the queued ones are still served
    key = dict(model=MODEL, reason="queue_full")
    assert metric(after, "hybrid_cloud_rejected_requests_total", **key) == metric(before, "hybrid_cloud_rejected_requests_total", **key) + 2
    assert metric(after, "hybrid_cloud_queue_depth", model=MODEL) == 0


def test_graceful_shutdown_finishes_in_flight_requests():
    with running_service({"batching.max_queue_delay_ms": 1500, "batching.max_batch_size": 64,
                          "batching.dispatch_when_idle": False}) as svc:
        result: dict = {}

        def call():
            with client(svc) as c:
                result["response"] = c.post(infer_path(), json=v2_body(sample_pixels(1)))

        worker = threading.Thread(target=call)
        worker.start()
        while metric(metrics(svc), "hybrid_cloud_queue_depth", model=MODEL) < 1:  # queued, waiting for the window
            time.sleep(0.05)
        code = svc.stop()  # SIGTERM while the request is in flight
        worker.join(TIMEOUT.read)
        assert not svc.running
        assert result["response"].status_code == 200, result["response"].text
        assert "Shutting down" in svc.log_text()
        with pytest.raises(httpx.ConnectError):  # and the port is closed afterwards
            httpx.get(svc.url + "/v2/health/live", timeout=2)
    assert code is not None
