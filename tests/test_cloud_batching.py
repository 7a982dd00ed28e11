"""The dynamic batcher on its own, with a fake ``execute`` (unit tests; the service tests use the real model).

``execute`` here returns ``(x * 2, row sums)`` so each caller can check it got its own rows back.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import numpy as np
import pytest

from cloud_service.batching import DynamicBatcher, unbatched
from cloud_service.errors import DeadlineExceeded, InferenceFailed, Overloaded, Unavailable
from cloud_service.metrics import ServiceMetrics

pytestmark = pytest.mark.timeout(30)


class Recorder:
    """A fake model: records every call (rows, thread) and can be held or made to fail."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.threads: set[int] = set()
        self.hold = threading.Event()
        self.hold.set()
        self.fail = False
        self.barrier: threading.Barrier | None = None

    def __call__(self, x: np.ndarray):
        self.threads.add(threading.get_ident())
        if self.barrier is not None:
            self.barrier.wait()
        self.hold.wait(10)
        if self.fail:
            raise RuntimeError("onnxruntime exploded")
        self.calls.append(len(x))
        return x * 2, x.reshape(len(x), -1).sum(axis=1)


def rows(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32).reshape(n, 1)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def make(fake: Recorder, **kwargs) -> tuple[DynamicBatcher, ServiceMetrics]:
    metrics = ServiceMetrics()
    kwargs.setdefault("max_batch_size", 32)
    kwargs.setdefault("max_queue_delay_s", 0.05)
    # These tests pin the max_queue_delay machinery (Triton's policy, still selectable); dispatch
    # when idle, admission and splitting are covered in tests/test_admission.py.
    kwargs.setdefault("dispatch_when_idle", False)
    return DynamicBatcher(fake, metrics=metrics.model("m"), name="m", **kwargs), metrics


def sample(metrics: ServiceMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, {"model": "m", **labels}) or 0.0


def test_concurrent_requests_share_one_execution_and_get_their_own_rows():
    fake = Recorder()

    async def main():
        b, m = make(fake, max_queue_delay_s=0.2)
        b.start()
        loop_thread = threading.get_ident()
        results = await asyncio.gather(*(b.submit(rows(1 + i % 3, start=10 * i)) for i in range(8)))
        await b.stop()
        return results, m, loop_thread

    results, m, loop_thread = run(main())
    assert fake.calls == [sum(1 + i % 3 for i in range(8))]  # one execution
    for i, (doubled, sums) in enumerate(results):
        n = 1 + i % 3
        np.testing.assert_array_equal(doubled, rows(n, 10 * i) * 2)
        np.testing.assert_array_equal(sums, rows(n, 10 * i).ravel())
    assert loop_thread not in fake.threads  # never on the event loop
    assert sample(m, "hybrid_cloud_execution_count_total") == 1
    assert sample(m, "hybrid_cloud_inference_count_total") == 15
    assert sample(m, "hybrid_cloud_inference_requests_total") == 8


def test_full_batch_dispatches_without_waiting_for_the_delay():
    fake = Recorder()

    async def main():
        b, _ = make(fake, max_batch_size=4, max_queue_delay_s=30.0)
        b.start()
        tasks = [asyncio.ensure_future(b.submit(rows(1, i))) for i in range(10)]
        done, pending = await asyncio.wait(tasks[:8], timeout=5)  # two full batches: no 30 s wait
        assert len(done) == 8 and not pending
        assert not any(t.done() for t in tasks[8:])  # the partial third batch waits for the delay
        await b.stop()  # ... or for shutdown, which computes it now
        assert all(t.done() and t.exception() is None for t in tasks)

    run(main())
    assert fake.calls == [4, 4, 2]


def test_request_larger_than_max_batch_is_split_into_full_chunks_and_reassembled():
    fake = Recorder()

    async def main():
        b, _ = make(fake, max_batch_size=4, max_queue_delay_s=0.0)
        b.start()
        out = await b.submit(rows(9))
        await b.stop()
        return out

    doubled, sums = run(main())
    assert sorted(fake.calls) == [1, 4, 4]
    np.testing.assert_array_equal(doubled, rows(9) * 2)
    np.testing.assert_array_equal(sums, rows(9).ravel())


def test_unbatched_never_splits():
    fake = Recorder()

    async def main():
        b = unbatched(fake)
        b.start()
        out = await b.submit(rows(9))
        await b.stop()
        return out

    doubled, _ = run(main())
    assert fake.calls == [9] and doubled.shape == (9, 1)


def test_full_queue_sheds_with_retry_after():
    fake = Recorder()

    async def main():
        b, m = make(fake, max_batch_size=64, max_queue_size=2, max_queue_delay_s=30.0)
        b.start()
        queued = [asyncio.ensure_future(b.submit(rows(1))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as info:
            await b.submit(rows(1))
        assert info.value.retry_after >= 1
        assert sample(m, "hybrid_cloud_rejected_requests_total", reason="queue_full") == 1
        assert b.queue_depth == 2
        await b.stop()
        await asyncio.gather(*queued)
        with pytest.raises(Unavailable):
            await b.submit(rows(1))  # after stop
        assert sample(m, "hybrid_cloud_rejected_requests_total", reason="shutting_down") == 1

    run(main())
    assert fake.calls == [2]


def test_request_expiring_in_the_queue_is_answered_at_its_deadline_and_not_computed():
    fake = Recorder()

    async def main():
        b, m = make(fake, max_queue_delay_s=30.0)
        b.start()
        other = asyncio.ensure_future(b.submit(rows(1)))
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="not computed"):
            await b.submit(rows(1, 5), deadline=time.monotonic() + 0.1)
        waited = time.monotonic() - t0
        assert b.queue_depth == 1  # removed from the queue
        assert sample(m, "hybrid_cloud_expired_requests_total") == 1
        await b.stop()
        doubled, _ = await other
        return waited, doubled

    waited, doubled = run(main())
    assert waited < 10  # answered at its deadline, not when the 30 s batch window closed
    assert fake.calls == [1]  # only the other request was computed
    np.testing.assert_array_equal(doubled, rows(1) * 2)


def test_deadline_already_past_is_refused():
    async def main():
        b, _ = make(Recorder())
        b.start()
        with pytest.raises(DeadlineExceeded):
            await b.submit(rows(1), deadline=time.monotonic() - 1)
        await b.stop()

    run(main())


def test_deadline_passing_during_execution_answers_at_once():
    fake = Recorder()
    fake.hold.clear()

    async def main():
        b, m = make(fake, max_queue_delay_s=0.0)
        b.start()
        with pytest.raises(DeadlineExceeded, match="during inference"):
            await b.submit(rows(1), deadline=time.monotonic() + 0.1)
        fake.hold.set()
        await b.stop()
        return m

    m = run(main())
    assert fake.calls == [1]
    assert sample(m, "hybrid_cloud_expired_requests_total") == 0  # it was not expired *in the queue*


@pytest.mark.parametrize("where", ["queued", "running"])
def test_an_expired_request_is_freed_at_once_not_left_to_the_cycle_collector(where):
    # A 504's request must not sit in a reference cycle: an idle server runs no full collection,
    # so after a flood of them each cycle kept a whole request (body, input, connection) for good.
    fake = Recorder()
    if where == "running":
        fake.hold.clear()
    seen: list[weakref.ref] = []

    async def main():
        b, _ = make(fake, max_queue_delay_s=30.0 if where == "queued" else 0.0)
        b.start()
        blocker = asyncio.ensure_future(b.submit(rows(1))) if where == "queued" else None
        x = rows(1, 7)
        seen.append(weakref.ref(x))
        try:
            await b.submit(x, deadline=time.monotonic() + 0.05)
        except DeadlineExceeded as exc:
            seen.append(weakref.ref(exc))
        del x
        fake.hold.set()
        await b.stop()  # waits for the running batch: the expired item's execution has finished
        if blocker is not None:
            await blocker

    gc.collect()
    gc.disable()
    try:
        run(main())
        # The worker thread may still be unwinding from the batch's done callback (it holds the
        # batch for those microseconds): wait, bounded, for reference counting to free them.
        give_up = time.monotonic() + 5.0
        while any(ref() is not None for ref in seen) and time.monotonic() < give_up:
            time.sleep(0.005)
        alive = [ref() is not None for ref in seen]
    finally:
        gc.enable()
    assert len(seen) == 2, "the request did not expire"
    assert alive == [False, False], "the expired request's input / exception are held by a reference cycle"


def test_failure_reaches_every_request_of_the_batch_and_the_next_batch_works():
    fake = Recorder()
    fake.fail = True

    async def main():
        b, m = make(fake, max_queue_delay_s=0.1)
        b.start()
        results = await asyncio.gather(*(b.submit(rows(1)) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, InferenceFailed) for r in results)
        assert "exploded" not in str(results[0])  # the foreign message stays in the server log
        fake.fail = False
        doubled, _ = await b.submit(rows(1, 7))
        await b.stop()
        return doubled, m

    doubled, m = run(main())
    np.testing.assert_array_equal(doubled, rows(1, 7) * 2)
    assert sample(m, "hybrid_cloud_inference_failures_total") == 1


def test_cancelled_waiting_request_is_not_computed():
    fake = Recorder()

    async def main():
        b, _ = make(fake, max_queue_delay_s=30.0)
        b.start()
        gone = asyncio.ensure_future(b.submit(rows(1, 3)))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        assert b.queue_depth == 0
        await b.stop()

    run(main())
    assert fake.calls == []


def test_unbatched_runs_each_request_alone_on_parallel_instances():
    fake = Recorder()
    fake.barrier = threading.Barrier(2, timeout=10)  # both instances must be inside execute at once

    async def main():
        b = unbatched(fake, instances=2, max_queue_size=8)
        b.start()
        results = await asyncio.gather(*(b.submit(rows(1, i)) for i in range(4)))
        await b.stop()
        return results

    results = run(main())
    assert fake.calls == [1, 1, 1, 1]
    assert len(fake.threads) == 2
    for i, (doubled, _) in enumerate(results):
        np.testing.assert_array_equal(doubled, rows(1, i) * 2)


def test_invalid_configuration():
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), max_batch_size=0)
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), max_queue_delay_s=-1)



def test_memory_is_released_once_idle_after_load_and_not_while_busy():
    released = threading.Event()
    calls = []

    def release():
        calls.append(1)
        released.set()
        return True

    async def scenario():
        b = DynamicBatcher(lambda x: (x * 2,), max_batch_size=4, instances=1, idle_trim_s=0.05, trim_after=3,
                           release=release)
        b.start()
        try:
            await asyncio.gather(*(b.submit(np.ones((1, 2), np.float32)) for _ in range(2)))
            assert b._trim_timer is None, "a release was planned after fewer requests than trim_after"
            b.idle_trim_s = 60.0
            await b.submit(np.ones((1, 2), np.float32))  # the third: a release is planned once idle...
            assert b._trim_timer is not None
            pending = asyncio.ensure_future(b.submit(np.ones((1, 2), np.float32)))
            await asyncio.sleep(0)  # ...and called off while a request is in
            assert b._trim_timer is None
            await pending
            b.idle_trim_s = 0.05  # the next idle moment plans a short wait
            await b.submit(np.ones((1, 2), np.float32))
            assert await asyncio.to_thread(released.wait, 10)
            assert [d.kind for d in b.decisions].count("trim") == 1
        finally:
            await b.stop()

    asyncio.run(scenario())
    assert calls == [1]


def test_release_memory_runs_on_this_platform_or_says_no():
    from edge_model import heap

    assert heap.trim() in (True, False)  # glibc: malloc_trim(0); elsewhere a no-op


def test_a_served_model_releases_the_memory_of_each_of_its_sessions(monkeypatch):
    """release_memory shrinks every session's arena (the solo session has its own) and trims the C
    heap even when a shrink run fails."""
    import dataclasses

    import cloud_service.dataplane as dataplane
    from cloud_service.settings import DEFAULT_MANIFEST, ServiceSettings
    from edge_model.runtime import OnnxClassifier, SessionOptions

    solo = OnnxClassifier(DEFAULT_MANIFEST, dataclasses.replace(SessionOptions(), intra_op_threads=2,
                                                                spin_only_in_run=True))
    model = dataplane.ServedModel("m", OnnxClassifier(DEFAULT_MANIFEST), ServiceSettings(), ServiceMetrics(),
                                  solo_classifier=solo)

    class Spy:
        def __init__(self, name, session, fail=False):
            self.name, self.session, self.fail = name, session, fail

        def run(self, *args):
            runs.append(self.name)
            if self.fail:
                raise RuntimeError("arena shrink failed")
            return self.session.run(*args)

    runs: list[str] = []
    trims: list[bool] = []
    monkeypatch.setattr(dataplane.heap, "trim", lambda: trims.append(True) or True)
    monkeypatch.setattr(model.classifier, "_session", Spy("main", model.classifier.session))
    monkeypatch.setattr(solo, "_session", Spy("solo", solo.session))
    assert model.release_memory() is True
    assert runs == ["main", "solo"] and trims == [True]

    monkeypatch.setattr(solo, "_session", Spy("solo", solo.session, fail=True))
    with pytest.raises(RuntimeError, match="arena shrink failed"):
        model.release_memory()
    assert trims == [True, True]


def test_every_instance_thread_runs_the_warm_up_before_serving():
    """What a thread allocates on its first inference stays with it (its C heap arena, the
    runtime's per-thread buffers): each instance's thread is started and warmed at start-up, so
    the first burst does not add a thread whose memory reads as growth."""
    ran: list[str] = []

    async def main():
        b = DynamicBatcher(lambda x: (x * 2,), max_batch_size=4, instances=3, name="warmtest")
        b.start()
        try:
            await b.warm_instances(lambda: ran.append(threading.current_thread().name))
            assert len(set(ran)) == 3 and all(n.startswith("infer-warmtest") for n in ran), ran
            before = {t.name for t in threading.enumerate() if t.name.startswith("infer-warmtest")}
            out = await asyncio.gather(*(b.submit(np.ones((1, 2), np.float32)) for _ in range(12)))
            assert all(np.array_equal(o[0], np.full((1, 2), 2.0)) for o in out)
            after = {t.name for t in threading.enumerate() if t.name.startswith("infer-warmtest")}
            assert after == before  # serving started no thread
        finally:
            await b.stop()

    asyncio.run(main())
