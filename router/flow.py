"""The request flow: one request (or batch) as a generator of effects, no I/O.

:func:`route` yields :class:`~router.effects.LocalWork` (preprocess + edge inference),
:class:`~router.effects.CloudCall` (one attempt at one endpoint, with an absolute deadline) and
:class:`~router.effects.Sleep`, and is sent their outcomes. The sync front-end executes them
inline (a confident request never touches an event loop or another thread); the async
front-end awaits them. Neither front-end contains routing logic, so they cannot drift apart.
Where each image goes is decided by the rule table (:mod:`router.rules`); answers are built
in :mod:`router.answers`.

Retries step through tenacity's own state machine (``Retrying.iter``) so its stop/wait/retry
rules apply while the sleeping stays with the shell.
"""

from __future__ import annotations

from typing import Any, Callable, Generator, Sequence

import numpy as np
from tenacity import DoAttempt, DoSleep, RetryCallState

from router.answers import assemble, provisional
from router.budget import NO_GATE, Gate, charged
from router.effects import (CloudCall, CloudReply, Effect, LocalResult, LocalWork, Provisional, RouteOutcome,
                            RouteRequest, Sleep)
from router.errors import CircuitOpen, CloudError, CloudRejected, CloudTimeout
from router.health import EndpointState
from router.policy import Mode
from router.retry import make_retrying
from router.rules import BatchContexts, EndpointView, RouteContext, decide, decide_each


class _LazyViews(Sequence):
    """The endpoints as the rules see them, read from their (locked) state only on first use:
    a confident or private request is decided before any rule looks."""

    __slots__ = ("_states", "_views")

    def __init__(self, states: Sequence[EndpointState]) -> None:
        self._states = states
        self._views: tuple[EndpointView, ...] | None = None

    def _get(self) -> tuple[EndpointView, ...]:
        if self._views is None:
            self._views = tuple(
                EndpointView(s.key, s.endpoint.label, s.status(), s.latency.estimate(), s.endpoint.priority)
                for s in self._states
            )
        return self._views

    def __getitem__(self, i):
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self):
        return iter(self._get())


_context = tuple.__new__


def route(req: RouteRequest, clock: Callable[[], float]) -> Generator[Effect, Any, RouteOutcome]:
    """One request as a generator of effects; returns a :class:`RouteOutcome` or raises a RouterError."""
    policy = req.policy
    reserve = policy.budget_reserve_ms / 1000.0 if req.reserve_s is None else req.reserve_s
    local: LocalResult = yield LocalWork(req.images, req.mode is not Mode.CLOUD_ONLY, req.normalised)
    n = len(local.x)
    probs = local.probs
    cls: list[int] = []
    conf: list[float] = []
    rows: list[list[float]] = []
    if probs is not None:
        # Python lists, converted once for the whole batch: indexing them per image is far cheaper
        # than indexing numpy arrays, and ``rows`` are the answers' probabilities as they are.
        # A confidence is the row's value at numpy's argmax (its first maximum; a NaN's index
        # if there is one, as ``max`` would say NaN): one reduction, not two.
        cls = probs.argmax(1).tolist()
        rows = probs.tolist()
        conf = list(map(list.__getitem__, rows, cls))  # rows[i][cls[i]], a C-level pass
    # Endpoint state is only looked at when the request may leave the device.
    needs_net = not req.privacy and req.mode is not Mode.EDGE_ONLY
    views = _LazyViews(req.endpoints) if needs_net else ()
    now = clock()
    # The escalation budget's cap for the next image that would escalate (looked at, not charged).
    gate = Gate(req.budget, n, req.endpoints) if needs_net and req.budget is not None else NO_GATE
    # Every rule sees one context per image, every field given in RouteContext's order and made
    # as namedtuple's own _make makes it (tuple.__new__: half the cost of its Python-level
    # __new__, per image): only the class threshold, the confidence and the cap differ.
    mode, privacy, deadline, selection = req.mode, req.privacy, req.deadline, policy.cloud.selection
    thresholds = req.thresholds
    contexts: Sequence[RouteContext] = []  # a list, or the batch's lazy BatchContexts
    verdicts: list = []
    if probs is None:
        for _ in range(n):
            ctx = _context(RouteContext, (mode, privacy, now, deadline, reserve, 1.0, None, views, selection, gate.cap))
            contexts.append(ctx)
            verdicts.append(verdict := decide(ctx))
            gate.saw(verdict)
    elif gate is NO_GATE and n > 1:  # no budget: the cap stays None, nothing to tell the gate
        # The images' contexts differ only in threshold and confidence: decided per outcome of
        # their comparison by the table (rules.decide_each), each context made only if looked at.
        contexts = BatchContexts(_context(RouteContext, (mode, privacy, now, deadline, reserve, 1.0, None, views,
                                                         selection, None)), list(map(thresholds.__getitem__, cls)), conf)
        verdicts = decide_each(contexts)
    else:  # one image (its one context is made at once), or a budget whose cap moves row by row
        for k, c in zip(cls, conf):
            ctx = _context(RouteContext, (mode, privacy, now, deadline, reserve, thresholds[k], c, views, selection,
                                          gate.cap))
            contexts.append(ctx)
            verdicts.append(verdict := decide(ctx))
            gate.saw(verdict)

    escalate = [i for i, v in enumerate(verdicts) if v.side == "cloud"]
    if req.progressive and escalate and local.probs is not None:
        # The edge's answers first; the runner resumes this flow for the refinement when it likes.
        yield Provisional(provisional(req, local, cls, conf, rows, verdicts, escalate, clock() - req.started))
    reply: CloudReply | None = None
    cloud_error: BaseException | None = None
    attempts = 0
    bytes_sent = 0
    answering: EndpointState | None = None
    cloud_s = 0.0
    if escalate:
        t_cloud = clock()
        by_key = {s.key: s for s in req.endpoints}
        candidates = [by_key[v.key] for v in verdicts[escalate[0]].candidates]
        if len(escalate) == n:  # every row (a single image's escalation): no copies to make
            x, pixels, images = local.x, local.pixels, None if req.normalised else list(req.images)
        else:
            idx = np.asarray(escalate)
            x, pixels = local.x[idx], None if local.pixels is None else local.pixels[idx]
            images = None if req.normalised else [req.images[i] for i in escalate]
        escalation = _escalate(req, clock, candidates, x, pixels, reserve, images)
        if req.budget is not None:
            escalation = charged(escalation, req.budget, len(escalate))
        reply, answering, cloud_error, attempts, bytes_sent = yield from escalation
        cloud_s = clock() - t_cloud

    predictions = assemble(req, local, cls, conf, rows, contexts, verdicts, escalate, reply, answering, attempts,
                           cloud_error, cloud_s, clock() - req.started)
    return RouteOutcome(predictions, attempts, bytes_sent, cloud_error)


def _escalate(req: RouteRequest, clock, candidates: list[EndpointState], x, pixels, reserve, images=None):
    """Attempts across endpoints within the deadline: failover first, then retries with backoff."""
    cloud = req.policy.cloud
    tried: set[str] = set()
    last_error: dict[str, BaseException] = {}
    error: BaseException | None = None
    attempts = 0
    bytes_sent = 0

    def fresh() -> list[EndpointState]:
        return [s for s in candidates if s.key not in tried and s.breaker.would_allow()]

    def pick() -> EndpointState | None:
        f = fresh()
        if f:
            return f[0]
        retry = [s for s in candidates if getattr(last_error.get(s.key), "retryable", False) and s.breaker.would_allow()]
        return retry[0] if retry else None

    def need_s() -> float:
        nxt = pick()
        return max(cloud.min_attempt_ms / 1000.0, nxt.latency.estimate() if nxt else 0.0)

    # tenacity's state machine is built at the first failure: tenacity's first step is always
    # "attempt", and a success ends the loop (only exceptions are retried), so an escalation
    # that succeeds at once never needs it (its Future and Condition per attempt were 18 % of
    # an escalation's client time, py-spy).
    retrying = state = None

    tries = 0

    def failed(exc: BaseException, tb=None) -> bool:
        """Record a failed try; True when no other try can follow (what tenacity would decide
        too, since it stops on any of these, without building its machinery or asking it)."""
        nonlocal retrying, state, tries
        tries += 1
        if tries >= cloud.retry.max_attempts or clock() + cloud.min_attempt_ms / 1000.0 > req.deadline - reserve:
            return True
        if state is None:
            retrying = make_retrying(
                cloud.retry, clock=clock, deadline=req.deadline, reserve_s=reserve,
                need_s=need_s, has_fresh_endpoint=lambda: bool(fresh()), rng=req.rng,
            )
            retrying.begin()
            state = RetryCallState(retrying, fn=None, args=(), kwargs={})
        state.set_exception((type(exc), exc, tb))
        return False

    do = _FIRST_ATTEMPT
    while True:
        if state is not None:
            try:
                do = retrying.iter(state)
            except CloudError as exc:  # tenacity re-raises the last failure when it stops
                return None, None, exc, attempts, bytes_sent
        if isinstance(do, DoAttempt):
            ep = pick()
            if ep is None or not ep.breaker.acquire():
                outcome = error or CircuitOpen("every endpoint's breaker is open")
                if failed(outcome):
                    return None, None, outcome, attempts, bytes_sent
                continue
            now = clock()
            timeout = min(cloud.per_try_timeout_ms / 1000.0, req.deadline - now - reserve)
            if timeout * 1000.0 < cloud.min_attempt_ms:
                ep.breaker.release()
                outcome = error or CloudTimeout("the deadline left no time for an attempt", endpoint=ep.endpoint.label)
                if failed(outcome):
                    return None, None, outcome, attempts, bytes_sent
                continue
            tried.add(ep.key)
            attempts += 1
            # An absolute end: the attempt stops there however late its runner starts it.
            outcome = yield CloudCall(ep, x, pixels, timeout, max(req.deadline - now, 0.0), req.request_id,
                                      deadline=now + timeout, clock=clock, images=images)
            if isinstance(outcome, CloudReply):
                ep.breaker.record_success()
                ep.latency.observe(outcome.elapsed_s)
                bytes_sent += outcome.bytes_sent
                # What tenacity's next step would say: a result is never retried (retry_if_exception).
                return outcome, ep, None, attempts, bytes_sent
            _record_failure(ep, outcome)
            last_error[ep.key] = error = outcome
            if failed(outcome, outcome.__traceback__):
                return None, None, outcome, attempts, bytes_sent
        elif isinstance(do, DoSleep):
            state.prepare_for_next_attempt()
            if float(do) > 0:  # failover to a fresh endpoint does not wait
                yield Sleep(float(do))
        else:  # pragma: no cover -- a result ends the loop above
            reply, ep = do
            return reply, ep, None, attempts, bytes_sent


_FIRST_ATTEMPT = DoAttempt()


def _record_failure(ep: EndpointState, exc: BaseException) -> None:
    ep.last_error = exc
    if isinstance(exc, CloudRejected):
        ep.breaker.record_success()  # the server answered: it is reachable, this request was refused
        return
    ep.breaker.record_failure()
