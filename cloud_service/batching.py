"""Dynamic batching, like Triton's dynamic batcher, driven by asyncio events (no scheduler task).

Requests (``submit(x, deadline)``, ``x`` a ``float32 [n, ...]`` array) wait in a bounded FIFO.
Whenever an execution instance is free, queued requests are coalesced into one batch of at
most ``max_batch_size`` rows and handed to a worker thread, which concatenates them and calls
``execute`` (ONNX Runtime never runs on the event loop); each request gets its own rows of
every output back through its future.

When to dispatch (``dispatch_when_idle``):

* ``True`` (default): a batch starts as soon as an execution instance is idle. Batches fill by
  themselves while every instance is busy (requests arriving meanwhile wait for the next free
  instance), so nobody waits for company while a core sits idle.
* ``False`` (Triton's behaviour, kept as the benchmark baseline): a batch starts when it is
  full or its oldest request has waited ``max_queue_delay``, even if instances are idle.

Admission and deadlines -- nothing is computed to be thrown away:

* A :class:`ServiceTimeModel` (online linear fit of measured batch times against batch rows)
  predicts when a new request would complete, from the rows queued ahead of it, the expected
  ends of the running batches and the number of instances. A request whose deadline falls
  before that is refused at once with :class:`Overloaded` (503 + ``Retry-After``) instead of
  being queued to expire. ``Retry-After`` is the backlog's drain time, or more while refusals
  outnumber admissions (a multiplicative backoff, see ``backoff_s``), so refused clients
  spread out instead of costing the event loop a refusal each per second.
* ``max_queue_size`` queued requests (requests, as in Triton, not rows): the next one is refused
  at once with :class:`Overloaded` too.
* Right before a batch is formed, queued requests whose deadline has passed, or would pass
  before even a batch of their own is predicted to finish, are answered :class:`DeadlineExceeded`
  and dropped. A batch stops growing where its predicted end would pass a member's deadline
  (with equal budgets, the first queued): the rest wait for the next batch. (Checking each
  request against the batch so far let later ones stretch it past the first ones' deadlines: on
  a slower machine 14 % of the rows computed at 256 connections were thrown away.)
  A request whose deadline passes while queued is also answered at that moment (a timer).
  If the deadline passes while its batch runs it is answered at once (unless its rows are
  already computed and only wait for the loop to collect them); the late rows are counted as
  wasted (``wasted_rows`` metric).
* The model learns compute time measured in the worker thread; admission under load adds a
  margin (the running mean relative error of its predictions) and the loop's measured lag in
  collecting results. When nothing runs and nothing is queued a request is admitted if its
  own mean compute time fits, so a pessimistic model is corrected rather than locking out.

A request larger than ``max_batch_size`` rows is split into chunks of ``max_batch_size`` rows
that run on whichever instances are free (concurrently when several are) and are reassembled
in row order; a request that fits is never split.

A batch that runs alone -- no other batch running and nothing left queued -- goes to
``execute_solo`` when one is given: the data plane passes a session with more intra-op threads,
so at low concurrency one request gets the cores that the instances would otherwise share. While
it runs it holds every instance (requests arriving meanwhile queue and go together as the next
batch, as when all instances are busy) rather than add a thread to cores it already uses. Its
(faster) times are not fed to the service-time model, which predicts batches under contention.

Every scheduling decision is appended to ``decisions`` (bounded), so tests can check what the
batcher decided rather than how long things took; ``clock`` and ``executor`` are injectable.

Batching off (``max_batch_size=1, max_queue_delay=0``, no splitting, see :func:`unbatched`) is
the same machinery degenerated to "run each request in a worker thread as soon as one is free".

``stop()`` refuses new work, flushes the queue without waiting for the delay, and waits for
running batches (bounded), so a graceful shutdown computes everything already accepted.

Memory after load (``idle_trim_s``): glibc keeps freed heap pages (request bodies, pixel lists,
batch tensors freed in the worker threads' arenas) and ONNX Runtime's arena keeps its peak. So
once the batcher has been idle for ``idle_trim_s`` after at least ``trim_after`` requests, it
calls ``release`` in a short-lived thread: by default :func:`edge_model.heap.trim` (glibc's
``malloc_trim``; elsewhere nothing), from the data plane its arena shrink first. The call takes
milliseconds to tens of milliseconds on a fragmented heap and releases the GIL.
Nothing of a finished request may sit in a reference cycle: an idle server runs no full
collection, so a cycle keeps its request (body, input, connection objects) until the next flood.
:meth:`DynamicBatcher.warm_instances` starts and warms every instance's thread before serving
(what a thread allocates on its first run stays with it), and the data plane fixes glibc's trim
threshold (:func:`edge_model.heap.fix_trim_threshold`) so that the threads' arenas give their free
tops back. What stays after a flood (+3.8-3.9 MiB in ``bench/overload.py``, the same after three)
is CPython's small-object arenas and the main heap, pinned by live blocks allocated during it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

from edge_model import heap
from cloud_service.errors import DeadlineExceeded, InferenceFailed, Overloaded, ServiceError, Unavailable
from cloud_service.metrics import ModelMetrics

log = logging.getLogger("cloud_service.batching")

Outputs = tuple[np.ndarray, ...]
ExecuteFn = Callable[[np.ndarray], Sequence[np.ndarray]]
Clock = Callable[[], float]
MAX_BACKOFF_S = 30.0

_QUEUED, _RUNNING, _DONE = 0, 1, 2


class ServiceTimeModel:
    """Predicted seconds of one batch: ``fixed + per_row * rows``, fitted online, plus a margin.

    Written by hand because it is a five-sum weighted least squares: exponentially weighted sums
    (``decay`` per observation, so it follows load and contention changes within a few dozen
    batches) of rows, seconds and their products. With a single batch size seen so far the
    fixed part cannot be separated and the cost is taken as proportional to rows.

    Batch times scatter (CPU contention, the event loop's own lag in collecting results), and an
    estimate that is right on average lets half of the tight requests through to expire during
    inference. :meth:`upper` adds ``margin`` times the running mean relative error of the
    predictions (like TCP's RTO = SRTT + 4 RTTVAR); admission and dropping use it.
    """

    def __init__(self, decay: float = 0.95, margin: float = 2.0) -> None:
        self.decay = decay
        self.margin = margin
        self._w = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self.fixed_s = 0.0
        self.per_row_s = 0.0
        self.rel_error = 0.0

    @property
    def known(self) -> bool:
        return self._w > 0

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        if self.known:
            predicted = max(self.predict(rows), 1e-6)
            # capped: one stall (a descheduled thread) must not lock admission shut
            self.rel_error = min(1.0, d * self.rel_error + (1 - d) * abs(seconds - predicted) / predicted)
        self._w = d * self._w + 1.0
        self._sx = d * self._sx + rows
        self._sy = d * self._sy + seconds
        self._sxx = d * self._sxx + rows * rows
        self._sxy = d * self._sxy + rows * seconds
        mx, my = self._sx / self._w, self._sy / self._w
        var = self._sxx / self._w - mx * mx
        slope = (self._sxy / self._w - mx * my) / var if var > 1e-6 * max(1.0, mx * mx) else -1.0
        if slope < 0 or my - slope * mx < 0:  # one size seen, or a fit that makes no physical sense
            self.fixed_s, self.per_row_s = 0.0, my / max(mx, 1.0)
        else:
            self.fixed_s, self.per_row_s = my - slope * mx, slope

    def predict(self, rows: int) -> float:
        return self.fixed_s + self.per_row_s * rows

    def upper(self, rows: int) -> float:
        """A pessimistic batch time: the prediction plus ``margin`` mean relative errors."""
        return (self.fixed_s + self.per_row_s * rows) * (1.0 + self.margin * self.rel_error)


class Decision(NamedTuple):
    """One scheduling decision. ``kind``: dispatch | wait | shed | drop | trim; ``reason`` says why."""

    kind: str
    reason: str
    rows: int
    at: float


class _Item:
    __slots__ = ("x", "rows", "deadline", "enqueued", "future", "state", "timer", "next_row", "done_rows", "parts",
                 "executions")

    def __init__(self, x: np.ndarray, deadline: Optional[float], future: asyncio.Future, now: float) -> None:
        self.x = x
        self.rows = int(x.shape[0])
        self.deadline = deadline
        self.enqueued = now
        self.future = future
        self.state = _QUEUED
        self.timer: Optional[asyncio.TimerHandle] = None
        self.next_row = 0  # first row not yet handed to an instance (> 0 only for split requests)
        self.done_rows = 0
        self.parts: list[tuple[int, Outputs]] = []
        self.executions: list[concurrent.futures.Future] = []  # worker-side futures of its batches


# (item, first row, end row) of one request's rows in a batch
_Part = tuple[_Item, int, int]


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
        dispatch_when_idle: bool = True,
        split_oversize: bool = True,
        metrics: Optional[ModelMetrics] = None,
        name: str = "model",
        clock: Clock = time.monotonic,
        executor: Optional[Executor] = None,
        service_time: Optional[ServiceTimeModel] = None,
        idle_trim_s: Optional[float] = None,
        trim_after: int = 32,
        release: Callable[[], bool] = heap.trim,
        execute_solo: Optional[ExecuteFn] = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or instances < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size, max_queue_size and instances must be >= 1 and the delay >= 0")
        self._execute = execute
        self._execute_solo = execute_solo
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.instances = instances
        self.dispatch_when_idle = dispatch_when_idle
        self.split_oversize = split_oversize
        self.name = name
        self.service_time = service_time if service_time is not None else ServiceTimeModel()
        self.decisions: deque[Decision] = deque(maxlen=1024)
        self._metrics = metrics
        self._clock = clock
        self._given_executor = executor
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0  # rows not yet handed to an instance
        self._running: dict[int, float] = {}  # batch id -> predicted end
        self._solo_running = False  # a solo batch holds every instance's cores until it ends
        self._batch_ids = itertools.count()
        self._timer: Optional[asyncio.TimerHandle] = None
        self._closing = False
        self._idle: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._executor: Optional[Executor] = None
        # Mean delay between a batch finishing in its worker and the loop handing out its rows:
        # part of every answer's time, so admission adds it to the compute estimate when busy.
        self.loop_lag_s = 0.0
        # Retry-After backoff: refusals cost the event loop nearly what a parse costs, so when
        # refusals outnumber admissions over a second the advised wait grows by that ratio
        # (clamped), spreading the clients out until the two are about even; it relaxes likewise.
        self.backoff_s = 1.0
        self._window = (0.0, 0, 0)  # start, admitted, shed
        # Giving freed heap back to the OS once idle after load (see the module docstring).
        self.idle_trim_s = idle_trim_s
        self.trim_after = trim_after
        self._release = release
        self._since_trim = 0  # requests seen (admitted or refused) since the last release
        self._trim_timer: Optional[asyncio.TimerHandle] = None
        self._trimming = False
        self.trims = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind to the running event loop and create the worker threads."""
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = self._given_executor or ThreadPoolExecutor(
            max_workers=self.instances, thread_name_prefix=f"infer-{self.name}")
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
                        len(self._queue), len(self._running), timeout)
            while self._queue:
                item = self._queue[0]
                self._remove(item)
                self._finish(item, exc=Unavailable("service shut down before the request was computed"))
        for timer in (self._timer, self._trim_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._trim_timer = None
        executor, self._executor = self._executor, None
        if executor is not None and executor is not self._given_executor:
            executor.shutdown(wait=False, cancel_futures=True)
        self._loop = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    async def warm_instances(self, fn: Callable[[], object], timeout_s: float = 120.0) -> None:
        """Run ``fn`` once on every instance's thread, all at the same time, before serving.

        A thread's first inference allocates what then stays with the thread: its own C heap
        arena, ONNX Runtime's per-thread buffers sized by the largest batch it ran, its stack.
        The pool starts threads only when work finds none idle, so without this the second
        instance came to life under the first burst and its ~4-20 MiB looked like growth that
        the service never gave back. A barrier holds each call until all have started: one
        call per thread. Only with the batcher's own pool (an injected executor may have fewer)."""
        if self._loop is None or self._executor is None or self._given_executor is not None:
            return
        barrier = threading.Barrier(self.instances, timeout=timeout_s)

        def run() -> object:
            barrier.wait()
            return fn()

        await asyncio.gather(*(self._loop.run_in_executor(self._executor, run) for _ in range(self.instances)))

    def observe(self, rows: int, seconds: float) -> None:
        """Feed the service-time model a measured batch (the data plane seeds it at warm-up)."""
        st = self.service_time
        st.observe(rows, seconds)
        m = self._metrics
        if m is not None:
            m.estimate_fixed.set(st.fixed_s)
            m.estimate_per_row.set(st.per_row_s)
            m.estimate_rel_error.set(st.rel_error)

    # ------------------------------------------------------------------ requests
    async def submit(self, x: np.ndarray, deadline: Optional[float] = None) -> Outputs:
        """Queue ``x`` (``[n, ...]``) and wait for its rows of every output.

        ``deadline`` is an instant of ``clock`` (``time.monotonic()`` by default). Raises
        :class:`Overloaded` (queue full, or the deadline cannot be met), :class:`Unavailable`
        (not started / shutting down), :class:`DeadlineExceeded`, :class:`InferenceFailed`.
        """
        loop = self._loop
        m = self._metrics
        self._since_trim += 1
        if loop is None or self._closing:
            if m is not None:
                m.rejected_closed.inc()
            raise Unavailable("the model is not serving (starting up or shutting down)")
        if x.shape[0] < 1:
            raise ValueError("empty batch")
        if len(self._queue) >= self.max_queue_size:
            if m is not None:
                m.rejected_full.inc()
            now = self._clock()
            self._count(now, shed=True)
            raise Overloaded(
                f"queue full ({self.max_queue_size} requests waiting); retry later", retry_after=self.retry_after()
            )
        now = self._clock()
        rows = int(x.shape[0])
        if deadline is not None:
            if deadline <= now:
                raise DeadlineExceeded("the request's budget was exhausted on arrival")
            if self.service_time.known:
                # Fully idle: only this request's own compute counts, at its mean (no margin, no loop
                # lag), so a pessimistic model is corrected by new measurements instead of refusing forever.
                eta = self.expected_completion(rows, now, margin=bool(self._running or self._queue))
                if eta > deadline:
                    self._count(now, shed=True)
                    self.decisions.append(Decision("shed", "expected_wait", rows, now))
                    if m is not None:
                        m.rejected_deadline.inc()
                    raise Overloaded(
                        f"too busy to answer within the request's budget ({(deadline - now) * 1000:.0f} ms, "
                        f"expected {(eta - now) * 1000:.0f} ms); retry after Retry-After or with a longer timeout",
                        retry_after=self.retry_after(),
                    )
        self._count(now, shed=False)
        item = _Item(x, deadline, loop.create_future(), now)
        if deadline is not None:
            item.timer = loop.call_later(deadline - now, self._expire, item)
        self._queue.append(item)
        self._queued_rows += rows
        self._idle.clear()
        if self._trim_timer is not None:  # busy again: not idle yet
            self._trim_timer.cancel()
            self._trim_timer = None
        if m is not None:
            m.queue_depth.set(len(self._queue))
        self._dispatch()
        try:
            return await item.future
        except asyncio.CancelledError:
            # The caller went away (client disconnected, server stopping): do not compute for nobody.
            if item.state == _QUEUED:
                self._remove(item)
                self._check_idle()
            raise
        finally:
            # An exception out of the future would otherwise close a cycle (this frame -> item ->
            # future -> exception -> traceback -> this frame) that holds the whole request until a
            # full collection (see the module docstring, "Memory after load").
            del item

    def expected_completion(self, rows: int, now: Optional[float] = None, margin: bool = True) -> float:
        """Predicted ``clock`` instant at which a request of ``rows`` submitted now would be answered.

        The queue ahead drains in full batches; batch ``j`` goes to the instance that frees first,
        which for equal batch times is round-robin over the instances sorted by when they free up.
        """
        now = self._clock() if now is None else now
        model, size = self.service_time, self.max_batch_size
        batch_time = model.upper if margin else model.predict
        free = sorted(max(now, end) for end in self._running.values())
        if self._solo_running:  # it uses the cores of all instances: none frees before it ends
            free = free * self.instances
        free = [now] * (self.instances - len(free)) + free
        ahead = self._queued_rows
        total = ahead + rows
        if not self.dispatch_when_idle and total < size:  # a partial batch waits for the window to close
            due = (self._queue[0].enqueued if self._queue else now) + self.max_queue_delay_s
            free = [max(t, due) for t in free]
        full = batch_time(size)
        first, last = ahead // size, (total - 1) // size
        eta = now
        if margin:
            free = [t + self.loop_lag_s for t in free]
        for j in range(max(first, last - self.instances + 1), last + 1):
            batch_rows = min(size, total - j * size)
            eta = max(eta, free[j % self.instances] + (j // self.instances) * full + batch_time(batch_rows))
        return eta

    def retry_after(self) -> float:
        """Seconds to advise: the backlog's drain time or the overload backoff (>= 1: Retry-After is whole seconds)."""
        if not self.service_time.known:
            return max(1.0, math.ceil(self.backoff_s))
        now = self._clock()
        return max(1.0, math.ceil(self.backoff_s), math.ceil(self.expected_completion(1, now) - now))

    def _count(self, now: float, shed: bool) -> None:
        start, admitted, refused = self._window
        if now - start >= 1.0:
            if refused:
                ratio = refused / max(1, admitted)
                self.backoff_s = min(MAX_BACKOFF_S, max(1.0, self.backoff_s * ratio))
            else:
                self.backoff_s = 1.0
            start, admitted, refused = now, 0, 0
        self._window = (start, admitted + (not shed), refused + shed)

    # ------------------------------------------------------------------ scheduling
    def _dispatch(self) -> None:
        """Start batches while an instance is free and a batch is due."""
        while self._queue and len(self._running) < self.instances and not self._solo_running:
            if self._closing:
                reason = "closing"
            elif self._queued_rows >= self.max_batch_size:
                reason = "full"
            elif self.dispatch_when_idle:
                reason = "idle"
            else:
                due = self._queue[0].enqueued + self.max_queue_delay_s
                now = self._clock()
                if now < due:
                    if self._timer is None:
                        self.decisions.append(Decision("wait", "delay", self._queued_rows, now))
                        self._timer = self._loop.call_later(due - now, self._on_timer)
                    return
                reason = "delay"
            self._start_batch(reason)
        self._check_idle()

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _start_batch(self, reason: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self._clock()
        model, size = self.service_time, self.max_batch_size
        # With other batches running (contention) a tight request must fit the pessimistic time;
        # alone it gets the mean, as at admission (see submit).
        batch_time = model.upper if self._running else model.predict
        batch: list[_Part] = []
        rows = 0
        earliest = math.inf  # the tightest deadline among the batch's members
        while self._queue:
            item = self._queue[0]
            take = item.rows - item.next_row
            if self.split_oversize:
                take = min(take, size)
            if batch and rows + take > size:
                break
            if item.deadline is not None and (
                now >= item.deadline or (model.known and not batch and now + batch_time(take) > item.deadline)
            ):
                # Drop it before computing: even alone its answer would come too late to be used.
                self._remove(item)
                self._drop(item, now)
                continue
            if batch and model.known and now + batch_time(rows + take) > min(earliest, item.deadline or math.inf):
                # Growing the batch would make it finish after a member's deadline (the first ones
                # queued, with equal budgets): close it here; the rest go to the next batch.
                break
            if item.deadline is not None:
                earliest = min(earliest, item.deadline)
            start = item.next_row
            item.next_row += take
            self._queued_rows -= take
            batch.append((item, start, start + take))
            rows += take
            if item.next_row == item.rows:
                self._queue.popleft()
                item.state = _RUNNING
            else:
                break  # a chunk of a split request fills the batch; its next chunk goes to the next instance
        m = self._metrics
        if m is not None:
            m.queue_depth.set(len(self._queue))
        if not batch:
            return
        solo = self._execute_solo is not None and not self._running and not self._queue
        self._solo_running = solo
        self.decisions.append(Decision("dispatch", f"{reason}+solo" if solo else reason, rows, now))
        batch_id = next(self._batch_ids)
        self._running[batch_id] = now + model.predict(rows)
        if m is not None:
            for item, start, _ in batch:
                if start == 0:
                    m.queue_time.observe(now - item.enqueued)
        xs = [item.x if stop - start == item.rows else item.x[start:stop] for item, start, stop in batch]
        execution = self._executor.submit(_run_batch, self._execute_solo if solo else self._execute, xs, self._clock)
        for item, _, _ in batch:
            item.executions.append(execution)
        # One hop back to the loop, straight from the worker thread. asyncio.wrap_future takes two
        # (the worker schedules a copy of the state onto an asyncio future, whose done callbacks are
        # then scheduled again), plus a future per batch; this ran once per request at low load.
        loop = self._loop

        def collect(f: concurrent.futures.Future) -> None:
            try:
                loop.call_soon_threadsafe(self._on_done, f, batch_id, batch, rows, now, solo)
            except RuntimeError:  # the loop is closed: nobody left to answer
                pass

        execution.add_done_callback(collect)

    def _on_done(self, fut: concurrent.futures.Future, batch_id: int, batch: list[_Part], rows: int,
                 started: float, solo: bool = False) -> None:
        del self._running[batch_id]
        if solo:
            self._solo_running = False
        m = self._metrics
        exc = fut.exception() if not fut.cancelled() else Unavailable("execution cancelled at shutdown")
        if exc is not None:
            if not isinstance(exc, ServiceError):
                log.error("%s: batch of %d rows failed: %s: %s", self.name, rows, type(exc).__name__, exc)
                exc = InferenceFailed(f"inference failed ({type(exc).__name__})")
            if m is not None:
                m.failures.inc()
            for item, _, _ in batch:
                if item.state == _QUEUED:  # the rest of a split request: no point computing it
                    self._remove(item)
                self._finish(item, exc=exc)
        else:
            # The model learns compute time measured in the worker; the loop's lag in collecting the
            # result is not proportional to the queue ahead and would inflate every estimate.
            outputs, elapsed, finished = fut.result()
            if not solo:
                self.observe(rows, elapsed)
            self.loop_lag_s = 0.9 * self.loop_lag_s + 0.1 * max(0.0, self._clock() - finished)
            wasted = 0
            offset = 0
            for item, start, stop in batch:
                n = stop - start
                if item.future.done():  # answered already (deadline, client gone, failed chunk)
                    wasted += n
                    # Drop its executions: each one's done callback (``collect``) holds this batch, so
                    # item -> execution -> collect -> batch -> item is a cycle, and through the item's
                    # exception and its traceback it would keep the whole request alive until a full
                    # collection (an idle server runs none: several MiB of RSS after a flood of 504s).
                    item.executions = []
                else:
                    item.parts.append((start, tuple(o[offset:offset + n] for o in outputs)))
                    item.done_rows += n
                    if item.done_rows == item.rows:
                        self._finish(item, result=_assemble(item.parts))
                        if m is not None:
                            m.request_count.inc()
                offset += n
            if m is not None:
                m.execution_count.inc()
                m.inference_count.inc(rows)
                m.batch_size.observe(rows)
                m.compute_time.observe(elapsed)
                if wasted:
                    m.wasted_rows.inc(wasted)
        self._dispatch()

    # ------------------------------------------------------------------ item bookkeeping
    def _remove(self, item: _Item) -> None:
        """Take a queued item out of the queue (its undispatched rows with it)."""
        try:
            self._queue.remove(item)
        except ValueError:
            return
        self._queued_rows -= item.rows - item.next_row
        item.state = _DONE
        if item.timer is not None:
            item.timer.cancel()
            item.timer = None
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._queue))

    def _check_idle(self) -> None:
        if not self._queue and not self._running and self._idle is not None:
            self._idle.set()
            if (self.idle_trim_s is not None and self._since_trim >= self.trim_after and self._trim_timer is None
                    and not self._closing and self._loop is not None):
                self._trim_timer = self._loop.call_later(self.idle_trim_s, self._trim_when_idle)

    def _trim_when_idle(self) -> None:
        self._trim_timer = None
        if self._queue or self._running or self._trimming:
            return
        self._since_trim = 0
        self._trimming = True
        self.decisions.append(Decision("trim", "idle_after_load", 0, self._clock()))

        def run() -> None:
            try:
                self._release()
            except Exception as exc:  # best effort: memory stays as it was
                log.debug("%s: releasing memory failed: %s", self.name, exc)
            finally:
                self._trimming = False
                self.trims += 1

        threading.Thread(target=run, name=f"trim-{self.name}", daemon=True).start()

    def _drop(self, item: _Item, now: float) -> None:
        self.decisions.append(Decision("drop", "expired" if now >= item.deadline else "cannot_finish_in_time",
                                       item.rows - item.next_row, now))
        if self._metrics is not None:
            self._metrics.expired.inc()
        if not item.future.done():
            item.future.set_exception(DeadlineExceeded(
                "the request's budget ran out while queued; not computed (retry with a longer timeout)"))

    def _expire(self, item: _Item) -> None:
        item.timer = None
        if item.state == _QUEUED:
            self._remove(item)
            self._drop(item, self._clock())
            self._check_idle()
        elif item.state == _RUNNING and not item.future.done():
            if all(e.done() for e in item.executions):
                return  # computed in time; the loop has not collected the result yet: answer it, don't waste it
            item.future.set_exception(DeadlineExceeded("the request's budget ran out during inference"))

    def _finish(self, item: _Item, result: Optional[Outputs] = None, exc: Optional[BaseException] = None) -> bool:
        item.state = _DONE
        item.parts = []
        item.executions = []
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


def _assemble(parts: list[tuple[int, Outputs]]) -> Outputs:
    """A split request's chunks, in row order, back into one array per output."""
    if len(parts) == 1:
        return parts[0][1]
    parts.sort(key=lambda p: p[0])
    return tuple(np.concatenate([p[1][k] for p in parts], axis=0) for k in range(len(parts[0][1])))


def _run_batch(execute: ExecuteFn, xs: list[np.ndarray], clock: Clock) -> tuple[Outputs, float, float]:
    """Worker thread: concatenate (off the loop too) and execute; returns the outputs, seconds taken, end instant."""
    t0 = clock()
    x = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=0)
    outputs = tuple(execute(x))
    t1 = clock()
    return outputs, t1 - t0, t1


def unbatched(execute: ExecuteFn, *, max_queue_size: int = 256, instances: int = 1,
              metrics: Optional[ModelMetrics] = None, name: str = "model", **kwargs) -> DynamicBatcher:
    """Batching off: every request runs alone in a worker thread as soon as one is free."""
    return DynamicBatcher(execute, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=max_queue_size,
                          instances=instances, split_oversize=False, metrics=metrics, name=name, **kwargs)
