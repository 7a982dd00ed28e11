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



# ----------------------------------------------------------------------------- hot-path shortcuts

@pytest.fixture(scope="module")
def served_model():
    from cloud_service.dataplane import ServedModel
    from cloud_service.metrics import ServiceMetrics
    from cloud_service.settings import DEFAULT_MANIFEST, ServiceSettings
    from edge_model.runtime import OnnxClassifier

    return ServedModel("m", OnnxClassifier(DEFAULT_MANIFEST), ServiceSettings(), ServiceMetrics())


def _request(data, shape, datatype="UINT8"):
    from oip.protocol import InferenceRequest

    return InferenceRequest.model_validate({"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]})


def test_uint8_shortcut_gives_the_general_paths_input_bit_for_bit(served_model):
    from edge_model.preprocess import normalise

    pixels = sample_pixels(3)[:, None]
    x, _ = served_model.decode(_request(pixels.ravel().tolist(), [3, 1, 28, 28]))
    expected = normalise(pixels, served_model.config)
    assert x.dtype == np.float32 and x.shape == (3, 1, 28, 28)
    assert np.array_equal(x.view(np.uint32), expected.view(np.uint32))
    # the general path (nested lists, integral floats) yields the same array
    nested, _ = served_model.decode(_request(pixels.tolist(), [3, 1, 28, 28]))
    floats, _ = served_model.decode(_request([float(v) for v in pixels.ravel()], [3, 1, 28, 28]))
    assert np.array_equal(nested, x) and np.array_equal(floats, x)


@pytest.mark.parametrize("bad, message", [
    ([300] + [0] * 783, "out of range"),
    ([-1] + [0] * 783, "out of range"),
    ([0.5] + [0] * 783, "non-integer"),
    (["1"] + [0] * 783, "UINT8"),
    ([0] * 783, "elements"),
])
def test_uint8_shortcut_leaves_every_refusal_to_the_general_path(served_model, bad, message):
    from cloud_service.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match=message):
        served_model.decode(_request(bad, [1, 1, 28, 28]))


def test_infer_skips_the_middleware_stack_unless_middleware_was_added():
    """The infer fast path answers like the stack: same body, metrics counted once per request."""
    import asyncio as aio

    from cloud_service.app import create_app
    from cloud_service.settings import ServiceSettings

    app = create_app(ServiceSettings())
    seen = []

    class Spy:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            seen.append(scope["path"])
            await self.app(scope, receive, send)

    async def call(path: str) -> int:
        messages = [{"type": "http.request", "body": b"{}", "more_body": False}]
        sent = []

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", b"2")],
                 "query_string": b"", "root_path": ""}
        await app(scope, receive, send)
        return sent[0]["status"]

    # unknown model: 404 JSON from the infer endpoint either way (no lifespan, nothing loaded)
    assert aio.run(call("/v2/models/nope/infer")) == 404
    assert seen == []
    app.add_middleware(Spy)
    assert aio.run(call("/v2/models/nope/infer")) == 404
    assert seen == ["/v2/models/nope/infer"]
