"""Dynamic batching, like Triton's dynamic batcher, driven by asyncio events (no scheduler task).

Requests (``submit(x, deadline)``, ``x`` a ``float32 [n, ...]`` array) wait in a bounded FIFO.
Whenever an execution instance is free, queued requests are coalesced into one batch of at
most ``max_batch_size`` rows and handed to a worker thread, which concatenates them and calls
``execute`` (ONNX Runtime never runs on the event loop); each request gets its own rows of
every output back through its future. A batch is dispatched as soon as it is full, or when
its oldest request has waited ``max_queue_delay`` -- whichever comes first -- so at low load a
lone request waits at most the delay, and under load batches fill while the previous one runs.

Load shedding and deadlines:

* ``max_queue_size`` queued requests (requests, as in Triton, not rows): the next one is refused
  at once with :class:`Overloaded` carrying a ``retry_after`` estimate.
* A request whose deadline passes while queued is removed, answered
  :class:`DeadlineExceeded` at that moment (not when a batch would have formed) and never
  computed. If the deadline passes while its batch is running it is also answered at once; the
  late result is dropped.
* A request larger than ``max_batch_size`` rows runs alone (never split).

Batching off (``max_batch_size=1, max_queue_delay=0``, see :func:`unbatched`) is the same
machinery degenerated to "run each request in a worker thread as soon as one is free".

``stop()`` refuses new work, flushes the queue without waiting for the delay, and waits for
running batches (bounded), so a graceful shutdown computes everything already accepted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import numpy as np

from cloud_service.errors import DeadlineExceeded, InferenceFailed, Overloaded, ServiceError, Unavailable
from cloud_service.metrics import ModelMetrics

log = logging.getLogger("cloud_service.batching")

Outputs = tuple[np.ndarray, ...]
ExecuteFn = Callable[[np.ndarray], Sequence[np.ndarray]]

_QUEUED, _RUNNING, _DONE = 0, 1, 2


class _Item:
    __slots__ = ("x", "rows", "deadline", "enqueued", "future", "state", "timer")

    def __init__(self, x: np.ndarray, deadline: Optional[float], future: asyncio.Future) -> None:
        self.x = x
        self.rows = int(x.shape[0])
        self.deadline = deadline
        self.enqueued = time.monotonic()
        self.future = future
        self.state = _QUEUED
        self.timer: Optional[asyncio.TimerHandle] = None


class DynamicBatcher:
    """Coalesces concurrent ``submit`` calls into batched ``execute`` calls on worker threads."""

    def __init__(
        self,
        execute: ExecuteFn,
        *,
        max_batch_size: int = 32,
        max_queue_delay_s: float = 0.002,
        max_queue_size: int = 256,
        instances: int = 1,
        metrics: Optional[ModelMetrics] = None,
        name: str = "model",
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or instances < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size, max_queue_size and instances must be >= 1 and the delay >= 0")
        self._execute = execute
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.instances = instances
        self.name = name
        self._metrics = metrics
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._running = 0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._closing = False
        self._idle: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._exec_ewma_s = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind to the running event loop and create the worker threads."""
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(max_workers=self.instances, thread_name_prefix=f"infer-{self.name}")
        self._closing = False

    async def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, compute the queued ones now, wait (bounded) for running batches."""
        if self._loop is None:
            return
        self._closing = True
        self._dispatch()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("%s: %d queued / %d running batches left after %.1fs drain", self.name,
                        len(self._queue), self._running, timeout)
            while self._queue:
                item = self._pop()
                self._finish(item, exc=Unavailable("service shut down before the request was computed"))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self._loop = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return self._running

    # ------------------------------------------------------------------ requests
    async def submit(self, x: np.ndarray, deadline: Optional[float] = None) -> Outputs:
        """Queue ``x`` (``[n, ...]``) and wait for its rows of every output.

        ``deadline`` is a ``time.monotonic()`` instant. Raises :class:`Overloaded`,
        :class:`Unavailable` (not started / shutting down), :class:`DeadlineExceeded`,
        :class:`InferenceFailed`.
        """
        loop = self._loop
        if loop is None or self._closing:
            if self._metrics is not None:
                self._metrics.rejected_closed.inc()
            raise Unavailable("the model is not serving (starting up or shutting down)")
        if len(self._queue) >= self.max_queue_size:
            if self._metrics is not None:
                self._metrics.rejected_full.inc()
            raise Overloaded(
                f"queue full ({self.max_queue_size} requests waiting); retry later", retry_after=self.retry_after()
            )
        if x.shape[0] < 1:
            raise ValueError("empty batch")
        item = _Item(x, deadline, loop.create_future())
        if deadline is not None:
            remaining = deadline - item.enqueued
            if remaining <= 0:
                raise DeadlineExceeded("the request's budget was exhausted on arrival")
            item.timer = loop.call_later(remaining, self._expire, item)
        self._queue.append(item)
        self._queued_rows += item.rows
        self._idle.clear()
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._queue))
        self._dispatch()
        try:
            return await item.future
        except asyncio.CancelledError:
            # The caller went away (client disconnected, server stopping): do not compute for nobody.
            if item.state == _QUEUED:
                self._remove(item)
            raise

    def retry_after(self) -> float:
        """Seconds until the current queue has likely drained (at least 1, as Retry-After is whole seconds)."""
        batches = math.ceil(max(1, self._queued_rows) / self.max_batch_size) / self.instances
        return max(1.0, math.ceil(batches * max(self._exec_ewma_s, 0.001) + self.max_queue_delay_s))

    # ------------------------------------------------------------------ scheduling
    def _dispatch(self) -> None:
        """Start batches while an instance is free and a batch is due (full, oldest waited long enough, closing)."""
        while self._queue and self._running < self.instances:
            oldest = self._queue[0]
            due = oldest.enqueued + self.max_queue_delay_s
            if self._queued_rows < self.max_batch_size and not self._closing and time.monotonic() < due:
                if self._timer is None:
                    self._timer = self._loop.call_later(max(0.0, due - time.monotonic()), self._on_timer)
                return
            self._start_batch()
        if not self._queue and self._running == 0 and self._idle is not None:
            self._idle.set()

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _start_batch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch: list[_Item] = []
        rows = 0
        while self._queue:
            nxt = self._queue[0]
            if batch and rows + nxt.rows > self.max_batch_size:
                break
            self._pop()
            nxt.state = _RUNNING
            batch.append(nxt)
            rows += nxt.rows
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._queue))
        self._running += 1
        started = time.monotonic()
        if self._metrics is not None:
            for item in batch:
                self._metrics.queue_time.observe(started - item.enqueued)
        fut = self._loop.run_in_executor(self._executor, _run_batch, self._execute, [it.x for it in batch])
        fut.add_done_callback(lambda f: self._on_done(f, batch, rows, started))

    def _on_done(self, fut: asyncio.Future, batch: list[_Item], rows: int, started: float) -> None:
        self._running -= 1
        elapsed = time.monotonic() - started
        self._exec_ewma_s = elapsed if self._exec_ewma_s == 0 else 0.8 * self._exec_ewma_s + 0.2 * elapsed
        exc = fut.exception() if not fut.cancelled() else Unavailable("execution cancelled at shutdown")
        if exc is not None:
            if not isinstance(exc, ServiceError):
                log.error("%s: batch of %d rows failed: %s: %s", self.name, rows, type(exc).__name__, exc)
                exc = InferenceFailed(f"inference failed ({type(exc).__name__})")
            if self._metrics is not None:
                self._metrics.failures.inc()
            for item in batch:
                self._finish(item, exc=exc)
        else:
            outputs = fut.result()
            m = self._metrics
            if m is not None:
                m.execution_count.inc()
                m.inference_count.inc(rows)
                m.batch_size.observe(rows)
                m.compute_time.observe(elapsed)
            start = 0
            for item in batch:
                end = start + item.rows
                if self._finish(item, result=tuple(o[start:end] for o in outputs)) and m is not None:
                    m.request_count.inc()
                start = end
        self._dispatch()

    # ------------------------------------------------------------------ item bookkeeping
    def _pop(self) -> _Item:
        item = self._queue.popleft()
        self._queued_rows -= item.rows
        return item

    def _remove(self, item: _Item) -> None:
        try:
            self._queue.remove(item)
        except ValueError:
            return
        self._queued_rows -= item.rows
        item.state = _DONE
        if item.timer is not None:
            item.timer.cancel()
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._queue))
        if not self._queue and self._running == 0:
            self._idle.set()

    def _expire(self, item: _Item) -> None:
        item.timer = None
        if item.state == _QUEUED:
            self._remove(item)
            if self._metrics is not None:
                self._metrics.expired.inc()
            if not item.future.done():
                item.future.set_exception(DeadlineExceeded("the request's budget ran out while queued; not computed"))
        elif item.state == _RUNNING and not item.future.done():
            item.future.set_exception(DeadlineExceeded("the request's budget ran out during inference"))

    def _finish(self, item: _Item, result: Optional[Outputs] = None, exc: Optional[BaseException] = None) -> bool:
        item.state = _DONE
        if item.timer is not None:
            item.timer.cancel()
            item.timer = None
        if item.future.done():
            return False
        if exc is not None:
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)
        return True


def _run_batch(execute: ExecuteFn, xs: list[np.ndarray]) -> Outputs:
    """Worker thread: concatenate (off the loop too) and execute."""
    x = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=0)
    return tuple(execute(x))


def unbatched(execute: ExecuteFn, *, max_queue_size: int = 256, instances: int = 1,
              metrics: Optional[ModelMetrics] = None, name: str = "model") -> DynamicBatcher:
    """Batching off: every request runs alone in a worker thread as soon as one is free."""
    return DynamicBatcher(execute, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=max_queue_size,
                          instances=instances, metrics=metrics, name=name)
