"""Progressive answers: the edge's answer at once, the cloud's refinement when it lands.

    h = router.predict_progressive(image, deadline_ms=300)
    show(h.first)                      # the edge's answer, computed on this thread
    h.add_done_callback(lambda h: show(h.final()))   # or: p = h.final()

    async for p in router.apredict_progressive(image):   # one or two answers
        show(p)

There is no second escalation path here: a progressive call runs the same request flow
(:func:`router.flow.route`) as ``predict``, with ``RouteRequest.progressive`` set, so the flow
yields a :class:`~router.effects.Provisional` (the edge's answers) between deciding and
escalating. The sync form runs the flow's first part inline on the caller's thread and hands
the open flow to the router's I/O thread, which resumes it with the async runner; the async
form resumes it on the caller's loop. Deadlines, retries, failover, breakers, budgets and the
stats are therefore those of ``predict``.

What the final answer can be:

* the cloud's answer (``source == "cloud"``, reason ``low_confidence`` or ``mode``);
* the first answer standing, ``fallback=True``: ``refinement_late`` (no cloud answer by the
  deadline; ``cloud_failure.category == "timeout"``) or ``refinement_failed`` (the escalation
  failed; ``cloud_failure`` says how);
* the first answer standing with ``refinement_cancelled`` (``fallback=False``) after ``cancel()``;
* the first answer itself when nothing is to refine (``h.refining is False``): the edge was
  confident, privacy, edge_only, or the cloud was not usable (breaker open, offline, latency
  budget, escalation budget). When the edge has no answer to give first (``cloud_only`` mode,
  or no edge model) the call runs as ``predict`` does and returns a settled handle.

The first answer of a refining call has reason ``provisional``. The stats and the decision log
count the request once, when the flow ends, as ``predict`` would have answered it.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, AsyncIterator, Callable, Optional

from router.answers import refined, standing
from router.effects import Provisional, RouteRequest
from router.errors import RouterError
from router.flow import route
from router.prediction import CloudFailure, Prediction, Reason

if TYPE_CHECKING:
    from router.api import Router

log = logging.getLogger("router")

__all__ = ["ProgressiveHandle"]


class ProgressiveHandle:
    """A progressive call: ``first`` now, ``final()`` when the refinement lands or the deadline passes.

    Thread-safe. The final answer is settled once, by whichever comes first: the refinement's
    outcome (on the router's I/O thread), the deadline (seen by ``final()`` or ``done()``), or
    ``cancel()``; later outcomes are ignored.
    """

    def __init__(self, first: Prediction, *, refining: bool, deadline: float = float("inf"), started: float = 0.0,
                 clock: Callable[[], float] = lambda: 0.0) -> None:
        self.first = first
        self.refining = refining  # False: there is no refinement; final() is first
        self._deadline = deadline  # when the refinement is late, on ``clock``
        self._started = started
        self._clock = clock
        self._lock = threading.Lock()
        self._settled = threading.Event()
        self._cancelled = threading.Event()
        self._final: Optional[Prediction] = None
        self._callbacks: list[Callable[["ProgressiveHandle"], None]] = []
        if not refining:
            self._final = first
            self._settled.set()

    def __repr__(self) -> str:
        state = "settled" if self._settled.is_set() else "refining"
        return f"<ProgressiveHandle {self.first.request_id} {state}>"

    def done(self) -> bool:
        """Whether the final answer is settled (True once the deadline has passed)."""
        if not self._settled.is_set() and self._clock() >= self._deadline:
            self._expire()
        return self._settled.is_set()

    def final(self, timeout: Optional[float] = None) -> Prediction:
        """The final answer: the cloud's, or the first one standing (see the module docstring).

        Waits at most until the request's deadline. ``timeout`` (seconds) waits less: if it
        passes first, ``TimeoutError`` is raised and the handle goes on refining."""
        if not self._settled.is_set():
            left = max(0.0, self._deadline - self._clock())
            if timeout is not None and timeout < left:
                if not self._settled.wait(timeout):
                    raise TimeoutError(f"no final answer within {timeout:g} s; the refinement may still land "
                                       "before the deadline (call final() again, or without a timeout)")
            elif not self._settled.wait(left):
                self._expire()
        return self._final

    def add_done_callback(self, fn: Callable[["ProgressiveHandle"], None]) -> None:
        """Call ``fn(handle)`` once the final answer is settled: at once (on this thread) if it
        is, else on the thread that settles it -- usually the router's I/O thread, so keep ``fn``
        short and non-blocking. Its exceptions are logged, not raised."""
        with self._lock:
            if not self._settled.is_set():
                self._callbacks.append(fn)
                return
        self._call(fn)

    def cancel(self) -> bool:
        """Stop waiting for the refinement: the first answer stands (``refinement_cancelled``).
        No further attempt or backoff starts; an attempt in flight ends by the deadline and its
        answer is dropped. Returns False when the final answer was already settled."""
        if self._settled.is_set():
            return False
        self._cancelled.set()
        return self._settle(standing(self.first, Reason.REFINEMENT_CANCELLED, None, total_s=self._elapsed()))

    # ------------------------------------------------------------------ settling

    def _elapsed(self) -> float:
        return self._clock() - self._started

    def _expire(self) -> None:
        failure = CloudFailure("timeout", "no refinement before the deadline")
        self._settle(standing(self.first, Reason.REFINEMENT_LATE, failure, total_s=self._elapsed()))

    def _settle(self, final: Prediction) -> bool:
        with self._lock:
            if self._settled.is_set():
                return False
            self._final = final
            self._settled.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            self._call(fn)
        return True

    def _call(self, fn) -> None:
        try:
            fn(self)
        except Exception:  # noqa: BLE001 -- a caller's callback must not break the router's I/O thread
            log.exception("progressive answer callback %r raised", fn)


def start(router: "Router", req: RouteRequest) -> ProgressiveHandle:
    """The sync form: run the flow inline up to its first answer, then hand it to the I/O thread."""
    req.progressive = True
    gen = route(req, router._clock)
    got = router._drive_sync(req, gen)
    if not isinstance(got, Provisional):  # nothing to refine: the flow ran to its end here
        return ProgressiveHandle(got[0], refining=False)
    # The flow's last attempt ends by deadline - reserve (the reserve pays for answering); settling
    # there too makes final() return when predict() would have, whatever the I/O loop's timer grain.
    settle_by = req.deadline - req.policy.budget_reserve_ms / 1000.0
    handle = ProgressiveHandle(got.predictions[0], refining=True, deadline=settle_by, started=req.started,
                               clock=router._clock)
    try:
        io = router._start_io()
    except BaseException:
        gen.close()
        raise
    io.submit(_refine(router, req, gen, handle))
    return handle


async def _refine(router: "Router", req: RouteRequest, gen, handle: ProgressiveHandle) -> None:
    """On the I/O thread: resume the flow for the refinement and settle the handle with it."""
    try:
        got = await router._drive_async(req, gen, stop=handle._cancelled.is_set)
    except RouterError as exc:  # no answer for the image at all: the first one stands
        handle._settle(_failed(handle.first, exc, req, router))
        return
    except Exception as exc:  # noqa: BLE001 -- a bug must still settle the handle, not leave it to the deadline
        log.exception("progressive refinement %s failed", req.request_id)
        handle._settle(_failed(handle.first, exc, req, router))
        return
    if got is not None:  # None: cancelled, already settled
        handle._settle(refined(handle.first, got[0]))


def _failed(first: Prediction, exc: BaseException, req: RouteRequest, router: "Router") -> Prediction:
    cause = getattr(exc, "cloud_error", None) or exc
    return standing(first, Reason.REFINEMENT_FAILED, CloudFailure.from_error(cause),
                    total_s=router._clock() - req.started)


async def iterate(router: "Router", req: RouteRequest) -> AsyncIterator[Prediction]:
    """The async form: the first answer, then the final one (only one when nothing is refined).
    Everything runs on the caller's loop (the edge in the router's worker threads)."""
    req.progressive = True
    gen = route(req, router._clock)
    try:
        got = await router._drive_async(req, gen)
        if not isinstance(got, Provisional):
            yield got[0]
            return
        first = got.predictions[0]
        yield first
        try:
            got = await router._drive_async(req, gen)
        except RouterError as exc:
            yield _failed(first, exc, req, router)
            return
        yield refined(first, got[0])
    finally:
        gen.close()  # a consumer that stops after the first answer: the escalation never starts
