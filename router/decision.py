"""The sans-I/O decision core: where a request is answered, and the flow that gets it there.

Two layers, neither doing I/O:

* :func:`decide` -- a pure function of a :class:`RouteContext`: an ordered list of small rules
  (tenacity-style callables), each looking at one context and either passing or giving a
  :class:`Verdict`. Table-driven tests build contexts with ``make_context(...)``.
* :func:`route` -- one request (or batch) as a generator. It *yields effects* --
  :class:`LocalWork` (preprocess + edge inference), :class:`CloudCall` (one attempt at one
  endpoint), :class:`Sleep` -- and is sent their outcomes. The sync front-end executes them
  inline (a confident request never touches an event loop or another thread); the async
  front-end awaits them. Neither front-end contains routing logic, so they cannot drift apart.

Retries step through tenacity's own state machine (``Retrying.iter``) so its stop/wait/retry
rules apply while the sleeping stays with the shell.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Literal, NamedTuple, Optional, Sequence

import numpy as np
from tenacity import DoAttempt, DoSleep, RetryCallState

from router.errors import (
    CircuitOpen,
    CloudError,
    CloudRejected,
    CloudTimeout,
    EdgeError,
    PredictionUnavailable,
    PrivacyViolation,
)
from router.health import EndpointState
from router.policy import Mode, RoutingPolicy
from router.prediction import EdgeOpinion, Prediction, Reason, Timings, build
from router.retry import make_retrying

# ----------------------------------------------------------------------------- pure decision


# NamedTuples rather than frozen dataclasses: immutable all the same, and several times cheaper
# to create -- the confident path builds a context per request and has ~50 us in all.
class EndpointView(NamedTuple):
    key: str
    label: str
    status: str  # "ok" | "breaker_open" | "offline"
    estimate_s: float
    priority: int = 0


class RouteContext(NamedTuple):
    mode: Mode
    privacy: bool
    now: float
    deadline: float
    reserve_s: float
    threshold: float  # the threshold of the class the edge predicted
    confidence: Optional[float]  # calibrated edge confidence; None when the edge did not answer
    endpoints: Sequence[EndpointView] = ()  # route() passes a lazy sequence: built only if a rule looks
    selection: str = "latency"

    @property
    def remaining(self) -> float:
        return self.deadline - self.now

    @property
    def edge_answered(self) -> bool:
        return self.confidence is not None


class Verdict(NamedTuple):
    side: Literal["edge", "cloud", "none"]
    reason: Reason
    fallback: bool = False
    candidates: tuple[EndpointView, ...] = ()


EDGE_CONFIDENT = Verdict("edge", Reason.CONFIDENT)
EDGE_PRIVACY = Verdict("edge", Reason.PRIVACY)


def _local_or_none(ctx: RouteContext, reason: Reason, fallback: bool) -> Verdict:
    if ctx.mode is Mode.CLOUD_ONLY or not ctx.edge_answered:
        return Verdict("none", reason)
    return Verdict("edge", reason, fallback)


def privacy_rule(ctx: RouteContext) -> Verdict | None:
    if not ctx.privacy:
        return None
    if ctx.mode is Mode.CLOUD_ONLY or not ctx.edge_answered:
        return Verdict("none", Reason.PRIVACY)
    return EDGE_PRIVACY


def edge_only_rule(ctx: RouteContext) -> Verdict | None:
    if ctx.mode is not Mode.EDGE_ONLY:
        return None
    return Verdict("edge", Reason.MODE) if ctx.edge_answered else Verdict("none", Reason.MODE)


def confident_rule(ctx: RouteContext) -> Verdict | None:
    if ctx.mode is Mode.PREFER_EDGE and ctx.confidence is not None and ctx.confidence >= ctx.threshold:
        return EDGE_CONFIDENT
    return None


def connectivity_rule(ctx: RouteContext) -> Verdict | None:
    if any(e.status == "ok" for e in ctx.endpoints):
        return None
    reason = Reason.BREAKER_OPEN if any(e.status == "breaker_open" for e in ctx.endpoints) else Reason.OFFLINE
    return _local_or_none(ctx, reason, fallback=True)


def budget_rule(ctx: RouteContext) -> Verdict | None:
    # cloud_only, or an edge that failed, has nothing local to answer with: try the cloud anyway.
    if ctx.mode is Mode.CLOUD_ONLY or not ctx.edge_answered:
        return None
    if any(e.status == "ok" and e.estimate_s + ctx.reserve_s <= ctx.remaining for e in ctx.endpoints):
        return None
    return Verdict("edge", Reason.BUDGET)


def escalate_rule(ctx: RouteContext) -> Verdict:
    if ctx.mode is Mode.PREFER_EDGE:
        reason = Reason.LOW_CONFIDENCE if ctx.edge_answered else Reason.EDGE_ERROR
    else:
        reason = Reason.MODE
    fallback = ctx.mode is Mode.PREFER_EDGE and not ctx.edge_answered
    return Verdict("cloud", reason, fallback, order_endpoints(ctx))


RULES: tuple[Callable[[RouteContext], Verdict | None], ...] = (
    privacy_rule,
    edge_only_rule,
    confident_rule,
    connectivity_rule,
    budget_rule,
    escalate_rule,
)


def decide(ctx: RouteContext) -> Verdict:
    for rule in RULES:
        verdict = rule(ctx)
        if verdict is not None:
            return verdict
    raise AssertionError("escalate_rule always decides")  # pragma: no cover


def order_endpoints(ctx: RouteContext) -> tuple[EndpointView, ...]:
    """Usable endpoints, those that fit the budget first, best first by the selection rule."""
    usable = [e for e in ctx.endpoints if e.status == "ok"]

    def key(e: EndpointView):
        misfit = e.estimate_s + ctx.reserve_s > ctx.remaining
        primary = (e.estimate_s, e.priority) if ctx.selection == "latency" else (e.priority, e.estimate_s)
        return (misfit, *primary)

    return tuple(sorted(usable, key=key))


def after_cloud_failure(ctx: RouteContext) -> Verdict:
    return _local_or_none(ctx, Reason.CLOUD_ERROR, fallback=True)


# ----------------------------------------------------------------------------- effects


@dataclass
class LocalWork:
    """Preprocess the images and, if ``run_edge``, run the edge model on them."""

    images: Sequence[Any]
    run_edge: bool


@dataclass
class LocalResult:
    x: np.ndarray  # float32 [N, 1, H, W] model input
    pixels: Optional[np.ndarray]  # uint8 [N, H, W] raw pixels (None if an input was a float array)
    probs: Optional[np.ndarray] = None  # calibrated edge probabilities [N, C]
    edge_error: Optional[EdgeError] = None
    edge_s: float = 0.0


@dataclass
class CloudCall:
    """One attempt at one endpoint for some rows, within ``timeout_s``."""

    state: EndpointState
    x: np.ndarray
    pixels: Optional[np.ndarray]
    timeout_s: float
    budget_s: float  # travels to the server as parameters.timeout
    request_id: str


@dataclass
class CloudReply:
    probs: np.ndarray
    model_version: str
    elapsed_s: float
    bytes_sent: int = 0


@dataclass
class Sleep:
    seconds: float


Effect = LocalWork | CloudCall | Sleep


@dataclass
class RouteRequest:
    """Everything one call to predict() fixed when it entered."""

    images: Sequence[Any]
    policy: RoutingPolicy
    mode: Mode
    privacy: bool
    deadline: float
    started: float
    request_id: str
    labels: tuple[str, ...]
    thresholds: tuple[float, ...]
    edge_version: str
    endpoints: Sequence[EndpointState] = ()
    rng: random.Random = field(default_factory=random.Random)


@dataclass
class RouteOutcome:
    predictions: list[Prediction]
    cloud_calls: int = 0
    bytes_sent: int = 0
    cloud_error: Optional[BaseException] = None


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


# ----------------------------------------------------------------------------- the flow


def route(req: RouteRequest, clock: Callable[[], float]) -> Generator[Effect, Any, RouteOutcome]:
    """One request as a generator of effects; returns a :class:`RouteOutcome` or raises a RouterError."""
    policy = req.policy
    reserve = policy.budget_reserve_ms / 1000.0
    local: LocalResult = yield LocalWork(req.images, run_edge=req.mode is not Mode.CLOUD_ONLY)
    n = len(local.x)
    if local.probs is not None:
        # Python lists: indexing them per image is far cheaper than indexing numpy arrays.
        cls = local.probs.argmax(axis=1).tolist()
        conf = local.probs.max(axis=1).tolist()
    # Endpoint state is only looked at when the request may leave the device.
    needs_net = not req.privacy and req.mode is not Mode.EDGE_ONLY
    views = _LazyViews(req.endpoints) if needs_net else ()
    now = clock()
    contexts, verdicts = [], []
    for i in range(n):
        ctx = RouteContext(
            mode=req.mode,
            privacy=req.privacy,
            now=now,
            deadline=req.deadline,
            reserve_s=reserve,
            threshold=req.thresholds[cls[i]] if local.probs is not None else 1.0,
            confidence=conf[i] if local.probs is not None else None,
            endpoints=views,
            selection=policy.cloud.selection,
        )
        contexts.append(ctx)
        verdicts.append(decide(ctx))

    escalate = [i for i, v in enumerate(verdicts) if v.side == "cloud"]
    reply: CloudReply | None = None
    cloud_error: BaseException | None = None
    attempts = 0
    bytes_sent = 0
    answering_state: EndpointState | None = None
    cloud_s = 0.0
    if escalate:
        t_cloud = clock()
        rows = np.asarray(escalate)
        by_key = {s.key: s for s in req.endpoints}
        candidates = [by_key[v.key] for v in verdicts[escalate[0]].candidates]
        reply, answering_state, cloud_error, attempts, bytes_sent = yield from _escalate(
            req, clock, candidates, local.x[rows], None if local.pixels is None else local.pixels[rows], reserve
        )
        cloud_s = clock() - t_cloud

    total_s = clock() - req.started
    edge_ms = local.edge_s * 1000.0
    predictions: list[Prediction] = []
    failed: list[int] = []
    cloud_row = {i: j for j, i in enumerate(escalate)}
    for i, verdict in enumerate(verdicts):
        if verdict.side == "cloud" and reply is None:
            verdict = after_cloud_failure(contexts[i])
        if verdict.side == "none":
            failed.append(i)
            continue
        rid = req.request_id if n == 1 else f"{req.request_id}-{i}"
        timings = build(Timings, edge_ms=edge_ms, cloud_ms=cloud_s * 1000.0, total_ms=total_s * 1000.0)
        if verdict.side == "cloud":
            p = reply.probs[cloud_row[i]]
            k = int(p.argmax())
            edge = None
            if local.probs is not None:
                ek = cls[i]
                edge = build(EdgeOpinion,
                    label=req.labels[ek], class_index=ek, confidence=conf[i], model_version=req.edge_version
                )
            predictions.append(
                build(
                    Prediction, label=req.labels[k] if k < len(req.labels) else str(k), class_index=k, confidence=float(p[k]),
                    probabilities=p.tolist(), source="cloud", reason=verdict.reason, fallback=verdict.fallback,
                    model_version=reply.model_version, timings=timings, attempts=attempts, request_id=rid,
                    endpoint=answering_state.endpoint.label, edge=edge,
                )
            )
        else:
            k = cls[i]
            predictions.append(
                build(
                    Prediction, label=req.labels[k], class_index=k, confidence=conf[i],
                    probabilities=local.probs[i].tolist(), source="edge", reason=verdict.reason,
                    fallback=verdict.fallback, model_version=req.edge_version, timings=timings,
                    attempts=attempts if i in cloud_row else 0, request_id=rid, endpoint=None, edge=None,
                )
            )
    if failed:
        raise _unavailable(req, verdicts[failed[0]], local.edge_error, cloud_error, failed, n, predictions)
    return RouteOutcome(predictions, attempts, bytes_sent, cloud_error)


def _unavailable(req, verdict, edge_error, cloud_error, failed, n, partial) -> Exception:
    where = f"{len(failed)} of {n} images" if n > 1 else "the image"
    if verdict.reason is Reason.PRIVACY and req.mode is Mode.CLOUD_ONLY:
        return PrivacyViolation("cloud_only mode cannot answer under privacy: nothing may leave the device")
    if verdict.reason is Reason.PRIVACY:
        msg = f"the edge model failed on {where} and privacy forbids the cloud: {edge_error}"
    elif req.mode is Mode.EDGE_ONLY:
        msg = f"the edge model failed on {where} in edge_only mode: {edge_error}"
    elif verdict.reason in (Reason.BREAKER_OPEN, Reason.OFFLINE) and cloud_error is None:
        cloud_error = CircuitOpen(f"no cloud endpoint is usable ({verdict.reason.value})")
        msg = f"no answer for {where}: cloud {verdict.reason.value}" + (f"; edge failed: {edge_error}" if edge_error else "")
    else:
        msg = f"no answer for {where}: cloud failed ({cloud_error})" + (f"; edge failed: {edge_error}" if edge_error else "")
    exc = PredictionUnavailable(msg, edge_error=edge_error, cloud_error=cloud_error)
    exc.partial = partial  # answers for the other images of a batch are not lost
    return exc


def _escalate(req: RouteRequest, clock, candidates: list[EndpointState], x, pixels, reserve):
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

    retrying = make_retrying(
        cloud.retry, clock=clock, deadline=req.deadline, reserve_s=reserve,
        need_s=need_s, has_fresh_endpoint=lambda: bool(fresh()), rng=req.rng,
    )
    retrying.begin()
    state = RetryCallState(retrying, fn=None, args=(), kwargs={})
    while True:
        try:
            do = retrying.iter(state)
        except CloudError as exc:  # tenacity re-raises the last failure when it stops
            return None, None, exc, attempts, bytes_sent
        if isinstance(do, DoAttempt):
            ep = pick()
            if ep is None or not ep.breaker.acquire():
                outcome: BaseException = error or CircuitOpen("every endpoint's breaker is open")
                state.set_exception((type(outcome), outcome, None))
                continue
            timeout = min(cloud.per_try_timeout_ms / 1000.0, req.deadline - clock() - reserve)
            if timeout * 1000.0 < cloud.min_attempt_ms:
                ep.breaker.release()
                outcome = error or CloudTimeout("the deadline left no time for an attempt", endpoint=ep.endpoint.label)
                state.set_exception((type(outcome), outcome, None))
                continue
            tried.add(ep.key)
            attempts += 1
            outcome = yield CloudCall(ep, x, pixels, timeout, max(req.deadline - clock(), 0.0), req.request_id)
            if isinstance(outcome, CloudReply):
                ep.breaker.record_success()
                ep.latency.observe(outcome.elapsed_s)
                bytes_sent += outcome.bytes_sent
                state.set_result((outcome, ep))
            else:
                _record_failure(ep, outcome)
                last_error[ep.key] = error = outcome
                state.set_exception((type(outcome), outcome, outcome.__traceback__))
        elif isinstance(do, DoSleep):
            state.prepare_for_next_attempt()
            if float(do) > 0:  # failover to a fresh endpoint does not wait
                yield Sleep(float(do))
        else:
            reply, ep = do
            return reply, ep, None, attempts, bytes_sent


def _record_failure(ep: EndpointState, exc: BaseException) -> None:
    ep.last_error = exc
    if isinstance(exc, CloudRejected):
        ep.breaker.record_success()  # the server answered: it is reachable, this request was refused
        return
    ep.breaker.record_failure()
