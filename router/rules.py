"""The rule table: where one request is answered, as a pure function of a :class:`RouteContext`.

An ordered list of small rules, each looking at one context and either passing (``None``) or
giving a :class:`Verdict`; :func:`decide` returns the first verdict. Table-driven tests build
contexts directly (tests/test_decision.py). No I/O, no clock, no state.
"""

from __future__ import annotations

from operator import ge as _GE
from typing import Callable, Literal, NamedTuple, Optional, Sequence

from router.policy import Mode
from router.prediction import Reason


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
    # The escalation-budget cap that binds if this image escalates (router/budget.py Gate); None: room.
    escalation_cap: Optional[str] = None

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


def escalation_budget_rule(ctx: RouteContext) -> Verdict | None:
    # After privacy, connectivity and the latency budget: those reasons say more, and cost nothing.
    if ctx.escalation_cap is None:
        return None
    return _local_or_none(ctx, Reason.ESCALATION_BUDGET, fallback=False)


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
    escalation_budget_rule,
    escalate_rule,
)


def decide(ctx: RouteContext) -> Verdict:
    for rule in RULES:
        verdict = rule(ctx)
        if verdict is not None:
            return verdict
    raise AssertionError("escalate_rule always decides")  # pragma: no cover


class BatchContexts(Sequence):
    """The contexts of a batch's images, all of them ``base`` but for the threshold of the class
    each image was given and its confidence: made only when looked at (a confident batch looks
    at none: see :func:`decide_each`)."""

    __slots__ = ("_head", "_tail", "thresholds", "confidences")

    def __init__(self, base: RouteContext, thresholds: Sequence[float], confidences: Sequence[float]) -> None:
        self._head, self._tail = base[:_THRESHOLD], base[_THRESHOLD + 2:]  # threshold, confidence: adjacent
        self.thresholds, self.confidences = thresholds, confidences

    def __getitem__(self, i: int) -> RouteContext:
        # As namedtuple's _make makes it (tuple.__new__), a third of _replace's cost.
        return _tuple_new(RouteContext, self._head + (self.thresholds[i], self.confidences[i]) + self._tail)

    def __len__(self) -> int:
        return len(self.confidences)


_THRESHOLD = RouteContext._fields.index("threshold")
assert RouteContext._fields[_THRESHOLD + 1] == "confidence"
_tuple_new = tuple.__new__


def decide_each(batch: BatchContexts) -> list[Verdict]:
    """``[decide(ctx) for ctx in batch]`` for images the edge answered. The table reads a
    context's threshold and confidence only as ``confidence >= threshold`` (confident_rule; the
    others ask whether the edge answered, the same for the whole batch), so it is consulted once
    per outcome of that comparison -- with the first image of each -- and that verdict stands for
    the others (tests/test_decision.py holds the table to it, image by image). A 64-image batch:
    two decisions, not 64 contexts and 64 walks down the table."""
    if len(batch) == 1:
        return [decide(batch[0])]
    confident = list(map(_GE, batch.confidences, batch.thresholds))
    verdicts = {outcome: decide(batch[confident.index(outcome)]) for outcome in (True, False) if outcome in confident}
    return list(map(verdicts.__getitem__, confident))


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
