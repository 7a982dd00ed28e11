"""Admission by expected wait, dropping before compute, dispatch when idle, splitting (issue #10 item 4, #13).

Unit tests drive :class:`DynamicBatcher` with a fake clock and a fake executor whose "executions"
complete only when the test says so: nothing sleeps, and assertions are on what the batcher
decided (``decisions``, executor calls, metrics), never on wall time. Fake time is in seconds of
a made-up model (10 s for one row) so that the batcher's real per-request expiry timers
(``loop.call_later``) never fire during a test. The last test runs the real service on loopback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import httpx
import numpy as np
import pytest

from cloud_service.batching import DynamicBatcher, ServiceTimeModel
from cloud_service.errors import DeadlineExceeded, Overloaded
from cloud_service.metrics import ServiceMetrics
from tests.support.cloud import assert_healthy, infer_path, metric, metrics, running_service, sample_pixels, v2_body

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeExecutor(concurrent.futures.Executor):
    """Holds every submitted execution until ``complete(i)`` runs it (on the loop thread)."""

    def __init__(self) -> None:
        self.pending: list[tuple] = []
        self.computed: list[np.ndarray] = []  # the input of every execution that ran

    def submit(self, fn, *args, **kwargs):
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.pending.append((fn, args, fut))
        return fut

    def inputs(self, i: int) -> np.ndarray:
        _, (_, xs, _), _ = self.pending[i]
        return np.concatenate(xs, axis=0)

    def complete(self, i: int = 0) -> None:
        fn, args, fut = self.pending.pop(i)
        self.computed.append(np.concatenate(args[1], axis=0))
        fut.set_result(fn(*args))


def execute(x: np.ndarray):
    return x * 2, x.reshape(len(x), -1).sum(axis=1)


def timed(clock: "FakeClock"):
    """The fake model, taking the seeded 8 s + 2 s per row of fake time per execution."""
    def run(x: np.ndarray):
        clock.advance(8.0 + 2.0 * len(x))
        return execute(x)
    return run


def rows(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32).reshape(n, 1)


async def until(condition, timeout: float = 5.0) -> None:
    """Wait (bounded) for a condition the event loop will make true."""
    async def poll():
        while not condition():
            await asyncio.sleep(0)
    await asyncio.wait_for(poll(), timeout)


def make(clock: FakeClock, ex: FakeExecutor, *, seed: bool = True, **kwargs):
    metrics_ = ServiceMetrics()
    kwargs.setdefault("max_batch_size", 4)
    kwargs.setdefault("max_queue_delay_s", 30.0)
    kwargs.setdefault("instances", 1)
    b = DynamicBatcher(timed(clock), metrics=metrics_.model("m"), name="m", clock=clock, executor=ex, **kwargs)
    if seed:  # batch time = 8 s + 2 s per row
        b.observe(1, 10.0)
        b.observe(4, 16.0)
    return b, metrics_


def sample(m: ServiceMetrics, name: str, **labels) -> float:
    return m.registry.get_sample_value(name, {"model": "m", **labels}) or 0.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def drain(b: DynamicBatcher, ex: FakeExecutor, tasks) -> None:
    """Stop the batcher (which flushes its queue), completing executions until every task is done."""
    stopping = asyncio.ensure_future(b.stop())

    async def loop():
        while not (stopping.done() and all(t.done() for t in tasks)):
            if ex.pending:
                ex.complete(0)
            await asyncio.sleep(0)
    await asyncio.wait_for(loop(), 10)


def test_service_time_model_recovers_a_linear_cost():
    model = ServiceTimeModel()
    assert not model.known
    for n in (1, 8, 32, 4, 16) * 3:
        model.observe(n, 0.0005 + 0.0002 * n)
    assert model.fixed_s == pytest.approx(0.0005, rel=1e-6)
    assert model.per_row_s == pytest.approx(0.0002, rel=1e-6)
    one_size = ServiceTimeModel()
    one_size.observe(10, 0.01)
    assert one_size.predict(5) == pytest.approx(0.005)  # proportional until a second size is seen


def test_request_whose_budget_is_shorter_than_the_expected_wait_is_refused_at_once():
    clock, ex = FakeClock(), FakeExecutor()

    async def main():
        b, m = make(clock, ex)
        b.start()
        running = asyncio.ensure_future(b.submit(rows(4)))       # occupies the only instance until ~+16 s
        await until(lambda: len(ex.pending) == 1)
        queued = asyncio.ensure_future(b.submit(rows(4, 10)))    # next full batch: ~+32 s
        await until(lambda: b.queue_depth == 1)
        # One more row would finish at ~+42 s (16 + 16 + 10): a 20 s budget cannot be met.
        with pytest.raises(Overloaded, match="budget") as info:
            await b.submit(rows(1, 50), deadline=clock() + 20.0)
        assert info.value.retry_after >= 1
        assert b.decisions[-1].kind == "shed" and b.decisions[-1].reason == "expected_wait"
        assert b.queue_depth == 1 and len(ex.pending) == 1       # not queued, nothing computed for it
        assert sample(m, "hybrid_cloud_rejected_requests_total", reason="expected_wait") == 1
        # The same request with a budget that can be met is queued.
        admitted = asyncio.ensure_future(b.submit(rows(1, 50), deadline=clock() + 60.0))
        await until(lambda: b.queue_depth == 2)
        await drain(b, ex, [running, queued, admitted])
        np.testing.assert_array_equal(admitted.result()[0], rows(1, 50) * 2)
        return m

    m = run(main())
    assert sample(m, "hybrid_cloud_wasted_rows_total") == 0


def test_retry_after_backs_off_while_refusals_outnumber_admissions_and_relaxes():
    clock, ex = FakeClock(), FakeExecutor()

    async def main():
        b, _ = make(clock, ex)
        b.start()
        tasks = [asyncio.ensure_future(b.submit(rows(4)))]  # admitted: busy until ~+16 s
        await until(lambda: len(ex.pending) == 1)
        for _ in range(10):  # ten refusals for one admission within a second
            with pytest.raises(Overloaded):
                await b.submit(rows(1), deadline=clock() + 1.0)
        before = b.backoff_s
        clock.advance(1.5)
        with pytest.raises(Overloaded) as info:  # the next second starts with a 10 s backoff
            await b.submit(rows(1), deadline=clock() + 1.0)
        backed_off = (b.backoff_s, info.value.retry_after)
        await drain(b, ex, tasks)
        b.start()
        clock.advance(1.5)
        tasks = [asyncio.ensure_future(b.submit(rows(1), deadline=clock() + 100.0))]  # admissions only
        await until(lambda: len(ex.pending) == 1)
        clock.advance(1.5)
        tasks.append(asyncio.ensure_future(b.submit(rows(1), deadline=clock() + 100.0)))
        await until(lambda: b.queue_depth == 1)
        relaxed = b.backoff_s
        await drain(b, ex, tasks)
        return before, backed_off, relaxed

    before, (backoff, advised), relaxed = run(main())
    assert before == 1.0 and backoff == 10.0 and advised >= 10
    assert relaxed == 1.0


def test_expired_rows_are_never_computed():
    clock, ex = FakeClock(), FakeExecutor()

    async def main():
        b, m = make(clock, ex)
        b.start()
        first = asyncio.ensure_future(b.submit(rows(4)))
        await until(lambda: len(ex.pending) == 1)
        # Both admitted (expected to finish at ~+26 s); then the first batch overruns.
        late = asyncio.ensure_future(b.submit(rows(2, 100), deadline=clock() + 50.0))
        tight = asyncio.ensure_future(b.submit(rows(1, 200), deadline=clock() + 100.0))
        keep = asyncio.ensure_future(b.submit(rows(1, 300)))
        await until(lambda: b.queue_depth == 3)
        clock.advance(80.0)
        ex.complete(0)  # +16 s more: `late` has expired; `tight` has 4 s left, less than any batch takes
        await until(lambda: late.done() and tight.done() and len(ex.pending) == 1)
        for t in (late, tight):
            with pytest.raises(DeadlineExceeded, match="not computed"):
                t.result()
        drops = [(d.reason, d.rows) for d in b.decisions if d.kind == "drop"]
        assert drops == [("expired", 2), ("cannot_finish_in_time", 1)]
        await drain(b, ex, [first, keep])
        return m

    m = run(main())
    computed = np.concatenate(ex.computed).ravel()
    assert not np.isin([100, 101, 200], computed).any()  # the dropped requests' rows never reached the model
    assert 300 in computed
    assert sample(m, "hybrid_cloud_expired_requests_total") == 2
    assert sample(m, "hybrid_cloud_wasted_rows_total") == 0
    assert sample(m, "hybrid_cloud_inference_count_total") == 5


def test_rows_computed_for_a_caller_that_left_are_counted_as_wasted():
    clock, ex = FakeClock(), FakeExecutor()

    async def main():
        b, m = make(clock, ex)
        b.start()
        gone = asyncio.ensure_future(b.submit(rows(3)))
        await until(lambda: len(ex.pending) == 1)
        gone.cancel()
        await until(gone.done)
        ex.complete(0)
        await until(lambda: b.running == 0)
        await drain(b, ex, [])
        return m

    m = run(main())
    assert sample(m, "hybrid_cloud_wasted_rows_total") == 3
    assert sample(m, "hybrid_cloud_inference_count_total") == 3


@pytest.mark.parametrize("when_idle", [True, False])
def test_idle_instance_dispatches_a_lone_request_without_waiting_for_the_delay(when_idle):
    clock, ex = FakeClock(), FakeExecutor()

    async def main():
        b, _ = make(clock, ex, instances=2, max_queue_delay_s=30.0, dispatch_when_idle=when_idle)
        b.start()
        lone = asyncio.ensure_future(b.submit(rows(1)))
        await until(lambda: b.decisions)
        decisions = [(d.kind, d.reason, d.rows) for d in b.decisions]
        calls = len(ex.pending)
        await drain(b, ex, [lone])
        return decisions, calls

    decisions, calls = run(main())
    if when_idle:
        assert decisions == [("dispatch", "idle", 1)] and calls == 1
    else:  # the previous policy: waits max_queue_delay for company
        assert decisions == [("wait", "delay", 1)] and calls == 0


def test_a_batch_that_runs_alone_goes_to_the_solo_session_holds_every_instance_and_is_not_learned_from():
    clock, ex = FakeClock(), FakeExecutor()
    solo_inputs: list[np.ndarray] = []

    def solo(x):
        solo_inputs.append(x)
        clock.advance(1.0)  # much faster alone: must not teach the contended model anything
        return execute(x)

    async def main():
        b, _ = make(clock, ex, instances=2, execute_solo=solo)
        b.start()
        before = (b.service_time.fixed_s, b.service_time.per_row_s)
        lone = asyncio.ensure_future(b.submit(rows(1)))
        await until(lambda: len(ex.pending) == 1)
        # The solo run uses both instances' cores: these wait for it although instance 2 is idle.
        pair = [asyncio.ensure_future(b.submit(rows(1, i))) for i in (1, 2)]
        await until(lambda: b.queue_depth == 2)
        assert len(ex.pending) == 1
        ex.complete(0)
        await until(lambda: len(ex.pending) == 1)  # the pair as one batch (alone again: solo too)
        after_solo = (b.service_time.fixed_s, b.service_time.per_row_s)
        # Five more while it runs: four fill a batch that leaves one queued (not alone), and the one
        # left goes to the other instance at once (a batch is running: not alone either).
        more = [asyncio.ensure_future(b.submit(rows(1, i))) for i in range(3, 8)]
        await until(lambda: b.queue_depth == 5)
        ex.complete(0)
        await until(lambda: len(ex.pending) == 2)
        await drain(b, ex, [lone, *pair, *more])
        return ([(d.reason, d.rows) for d in b.decisions if d.kind == "dispatch"], before, after_solo,
                lone.result(), [t.result() for t in pair])

    dispatches, before, after_solo, lone_result, pair_results = run(main())
    assert dispatches == [("idle+solo", 1), ("idle+solo", 2), ("full", 4), ("idle", 1)]
    assert [len(x) for x in solo_inputs] == [1, 2]
    assert after_solo == before
    np.testing.assert_array_equal(lone_result[0], rows(1) * 2)
    for i, r in zip((1, 2), pair_results):
        np.testing.assert_array_equal(r[0], rows(1, i) * 2)


def test_requests_arriving_while_all_instances_are_busy_go_as_one_batch():
    clock, ex = FakeClock(), FakeExecutor()

    async def main():
        b, _ = make(clock, ex, instances=1, max_batch_size=8)
        b.start()
        tasks = [asyncio.ensure_future(b.submit(rows(1, i))) for i in range(4)]
        await until(lambda: b.queue_depth == 3)  # first went at once; three wait for the busy instance
        ex.complete(0)
        await until(lambda: len(ex.pending) == 1)
        await drain(b, ex, tasks)
        return [(d.kind, d.reason, d.rows) for d in b.decisions], tasks

    decisions, tasks = run(main())
    assert decisions == [("dispatch", "idle", 1), ("dispatch", "idle", 3)]
    for i, t in enumerate(tasks):
        np.testing.assert_array_equal(t.result()[0], rows(1, i) * 2)


def test_a_batch_stops_growing_where_it_would_finish_after_a_members_deadline():
    # Equal budgets: the first queued has the tightest deadline. Checking each request only against
    # the batch so far let later ones stretch the batch past it (computed, then thrown away).
    clock, ex = FakeClock(), FakeExecutor()

    async def main():
        b, m = make(clock, ex, instances=1, max_batch_size=4)  # batch time: 8 s + 2 s per row
        b.start()
        first = asyncio.ensure_future(b.submit(rows(1, 0)))
        await until(lambda: len(ex.pending) == 1)
        t0 = clock()
        # Formed when `first` ends (t0 + 10): 1 or 2 rows end by t0 + 20 / 22, 3 rows at t0 + 24.
        tight = asyncio.ensure_future(b.submit(rows(1, 1), deadline=t0 + 23.0))
        loose = [asyncio.ensure_future(b.submit(rows(1, i), deadline=t0 + 200.0)) for i in (2, 3, 4)]
        await until(lambda: b.queue_depth == 4)
        ex.complete(0)
        await until(lambda: len(ex.pending) == 1)
        ex.complete(0)  # the 2-row batch: ends at t0 + 22, within `tight`'s deadline
        await until(lambda: tight.done())
        await drain(b, ex, [first, tight, *loose])
        return [d.rows for d in b.decisions if d.kind == "dispatch"], [d for d in b.decisions if d.kind == "drop"], m

    sizes, drops, m = run(main())
    assert sizes == [1, 2, 2]
    assert drops == []
    assert sample(m, "hybrid_cloud_wasted_rows_total") == 0


def test_request_larger_than_max_batch_is_split_across_instances_and_reassembled_in_order():
    clock, ex = FakeClock(), FakeExecutor()

    async def main():
        b, m = make(clock, ex, instances=2, max_batch_size=4)
        b.start()
        big = asyncio.ensure_future(b.submit(rows(10, 100)))
        await until(lambda: len(ex.pending) == 2)
        # Two full chunks run at once, one per instance; the rest waits for a free instance.
        np.testing.assert_array_equal(ex.inputs(0), rows(4, 100))
        np.testing.assert_array_equal(ex.inputs(1), rows(4, 104))
        assert b.running == 2 and b.queue_depth == 1
        ex.complete(1)  # chunks finish out of order
        await until(lambda: len(ex.pending) == 2)
        np.testing.assert_array_equal(ex.inputs(1), rows(2, 108))
        ex.complete(1)
        ex.complete(0)
        doubled, sums = await asyncio.wait_for(big, 10)
        await drain(b, ex, [])
        return doubled, sums, [(d.kind, d.rows) for d in b.decisions], m

    doubled, sums, decisions, m = run(main())
    np.testing.assert_array_equal(doubled, rows(10, 100) * 2)
    np.testing.assert_array_equal(sums, rows(10, 100).ravel())
    assert decisions == [("dispatch", 4), ("dispatch", 4), ("dispatch", 2)]
    assert sample(m, "hybrid_cloud_inference_requests_total") == 1
    assert sample(m, "hybrid_cloud_execution_count_total") == 3


# ----------------------------------------------------------------------------- real service

def test_burst_with_budgets_it_cannot_meet_gets_503_with_retry_after_and_service_stays_healthy():
    backlog = v2_body(np.zeros((256, 28, 28), np.uint8), outputs=["probabilities"])
    quick = v2_body(sample_pixels(1), outputs=["probabilities"], timeout_us=200_000)  # 200 ms
    overrides = {"runtime.instances": 1, "batching.max_batch_size": 32}

    async def main(svc):
        limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
        async with httpx.AsyncClient(base_url=svc.url, timeout=30.0, trust_env=False, limits=limits) as http:
            # 8 x 256 rows queued ahead (seconds of work on one instance), then a burst with 200 ms budgets.
            heavy = [asyncio.ensure_future(http.post(infer_path(), json=backlog)) for _ in range(8)]
            await asyncio.wait_for(backlog_queued(http), 30)
            burst = await asyncio.gather(*(http.post(infer_path(), json=quick) for _ in range(64)))
            heavy_done = await asyncio.gather(*heavy)
            after = await http.post(infer_path(), json=v2_body(sample_pixels(1), timeout_us=5_000_000))
            return burst, heavy_done, after

    async def backlog_queued(http):
        while True:
            text = (await http.get("/metrics")).text
            depth = [line for line in text.splitlines() if line.startswith("hybrid_cloud_queue_depth{")]
            if depth and float(depth[0].split()[-1]) >= 4:
                return
            await asyncio.sleep(0.01)

    with running_service(overrides) as svc:
        burst, heavy_done, after = asyncio.run(main(svc))
        statuses = [r.status_code for r in burst]
        assert statuses.count(503) >= len(burst) // 2, statuses
        refused = next(r for r in burst if r.status_code == 503)
        assert int(refused.headers["Retry-After"]) >= 1
        assert "budget" in refused.json()["error"]
        assert all(r.status_code == 200 for r in heavy_done)
        assert after.status_code == 200
        values = metrics(svc)
        assert metric(values, "hybrid_cloud_rejected_requests_total", model="fashion-mnist",
                      reason="expected_wait") >= statuses.count(503)
        assert_healthy(svc)


def test_service_with_a_solo_session_answers_lone_and_concurrent_requests_alike():
    """runtime.solo_threads: a lone request runs on the multi-threaded session, concurrent ones on
    the instances; both give the model's own probabilities."""
    from cloud_service.settings import DEFAULT_MANIFEST
    from edge_model.preprocess import normalise
    from edge_model.runtime import OnnxClassifier

    pixels = sample_pixels(8)
    reference = OnnxClassifier(DEFAULT_MANIFEST).predict_proba(normalise(pixels)[:, None])

    async def main(svc):
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        async with httpx.AsyncClient(base_url=svc.url, timeout=30.0, trust_env=False, limits=limits) as http:
            lone = [await http.post(infer_path(), json=v2_body(pixels[i:i + 1], outputs=["probabilities"]))
                    for i in range(8)]
            together = await asyncio.gather(*(http.post(infer_path(), json=v2_body(pixels[i:i + 1],
                                                                                   outputs=["probabilities"]))
                                             for i in range(8)))
            return lone, together

    with running_service({"runtime.instances": 2, "runtime.solo_threads": 2}) as svc:
        lone, together = asyncio.run(main(svc))
        for answers in (lone, together):
            got = np.array([r.json()["outputs"][0]["data"] for r in answers], np.float32)
            np.testing.assert_allclose(got, reference, atol=1e-5)
        assert_healthy(svc)
