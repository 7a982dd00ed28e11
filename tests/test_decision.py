"""Unit tests of the sans-I/O core: table-driven rules and the effect flow, with a fake clock."""

from __future__ import annotations

import random

import numpy as np
import pytest

from router.decision import (
    CloudCall,
    CloudReply,
    EndpointView,
    LocalResult,
    LocalWork,
    RouteContext,
    RouteRequest,
    Sleep,
    decide,
    route,
)
from router.errors import (
    CloudAuthError,
    CloudServerError,
    CloudTimeout,
    CloudUnavailable,
    EdgeError,
    PredictionUnavailable,
    PrivacyViolation,
)
from router.health import EndpointState
from router.policy import Mode, parse_policy
from router.prediction import Reason

OK = EndpointView("a", "a", "ok", 0.020)
OPEN = EndpointView("a", "a", "breaker_open", 0.020)
DOWN = EndpointView("a", "a", "offline", 0.020)
SLOW = EndpointView("s", "s", "ok", 0.500)


def make_context(**kw) -> RouteContext:
    base = dict(mode=Mode.PREFER_EDGE, privacy=False, now=0.0, deadline=0.150, reserve_s=0.003,
                threshold=0.8, confidence=0.5, endpoints=(OK,))
    base.update(kw)
    return RouteContext(**base)


@pytest.mark.parametrize(
    "kw, side, reason, fallback",
    [
        # prefer_edge: the cascade
        (dict(confidence=0.95), "edge", Reason.CONFIDENT, False),
        (dict(confidence=0.80), "edge", Reason.CONFIDENT, False),  # >= threshold
        (dict(confidence=0.5), "cloud", Reason.LOW_CONFIDENCE, False),
        (dict(confidence=0.5, endpoints=(OPEN,)), "edge", Reason.BREAKER_OPEN, True),
        (dict(confidence=0.5, endpoints=(DOWN,)), "edge", Reason.OFFLINE, True),
        (dict(confidence=0.5, endpoints=()), "edge", Reason.OFFLINE, True),
        (dict(confidence=0.5, endpoints=(DOWN, OPEN)), "edge", Reason.BREAKER_OPEN, True),
        (dict(confidence=0.5, endpoints=(SLOW,)), "edge", Reason.BUDGET, False),
        (dict(confidence=0.5, now=0.140), "edge", Reason.BUDGET, False),  # 10 ms left < 20 ms estimate
        (dict(confidence=0.5, endpoints=(SLOW, OK)), "cloud", Reason.LOW_CONFIDENCE, False),
        (dict(confidence=None), "cloud", Reason.EDGE_ERROR, True),  # edge failed
        (dict(confidence=None, endpoints=(SLOW,)), "cloud", Reason.EDGE_ERROR, True),  # nothing local: try anyway
        (dict(confidence=None, endpoints=(OPEN,)), "none", Reason.BREAKER_OPEN, False),
        # privacy beats everything
        (dict(privacy=True, confidence=0.1), "edge", Reason.PRIVACY, False),
        (dict(privacy=True, confidence=None), "none", Reason.PRIVACY, False),
        (dict(privacy=True, mode=Mode.CLOUD_ONLY), "none", Reason.PRIVACY, False),
        (dict(privacy=True, mode=Mode.PREFER_CLOUD), "edge", Reason.PRIVACY, False),
        # modes
        (dict(mode=Mode.EDGE_ONLY, confidence=0.1), "edge", Reason.MODE, False),
        (dict(mode=Mode.EDGE_ONLY, confidence=None), "none", Reason.MODE, False),
        (dict(mode=Mode.PREFER_CLOUD, confidence=0.99), "cloud", Reason.MODE, False),
        (dict(mode=Mode.PREFER_CLOUD, endpoints=(OPEN,)), "edge", Reason.BREAKER_OPEN, True),
        (dict(mode=Mode.PREFER_CLOUD, endpoints=(SLOW,)), "edge", Reason.BUDGET, False),
        (dict(mode=Mode.CLOUD_ONLY, confidence=None), "cloud", Reason.MODE, False),
        (dict(mode=Mode.CLOUD_ONLY, confidence=None, endpoints=(SLOW,)), "cloud", Reason.MODE, False),
        (dict(mode=Mode.CLOUD_ONLY, confidence=None, endpoints=(OPEN,)), "none", Reason.BREAKER_OPEN, False),
    ],
)
def test_decide_table(kw, side, reason, fallback):
    v = decide(make_context(**kw))
    assert (v.side, v.reason, v.fallback) == (side, reason, fallback)


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("privacy", [False, True])
@pytest.mark.parametrize("endpoints", [(OK,), (OPEN,), (DOWN,), (), (SLOW,), (SLOW, OK), (DOWN, OPEN)])
@pytest.mark.parametrize("now", [0.0, 0.140])
def test_decide_each_is_the_table_image_by_image(mode, privacy, endpoints, now):
    """The batch's shortcut (one decision per outcome of confidence >= threshold) gives what the
    table gives for every image's own context: thresholds per class, ties, NaN, 0 and 1."""
    from router.rules import BatchContexts, decide_each

    rng = random.Random(7)
    thresholds = [rng.choice([0.0, 0.5, 0.8, 1.0]) for _ in range(40)]
    confidences = [rng.choice([0.0, 0.5, 0.8, 0.9, 1.0, float("nan"), rng.random()]) for _ in range(40)]
    base = make_context(mode=mode, privacy=privacy, endpoints=endpoints, now=now)
    for n in (1, 2, 40):
        batch = BatchContexts(base, thresholds[:n], confidences[:n])
        contexts = [base._replace(threshold=t, confidence=c) for t, c in zip(thresholds[:n], confidences[:n])]
        assert [tuple(batch[i]) == tuple(ctx) for i, ctx in enumerate(contexts)] == [True] * n  # NaN is itself
        assert decide_each(batch) == [decide(ctx) for ctx in contexts]


def test_candidates_fit_first_then_by_latency_or_priority():
    a = EndpointView("a", "a", "ok", 0.030, priority=1)
    b = EndpointView("b", "b", "ok", 0.010, priority=2)
    slow = EndpointView("c", "c", "ok", 0.400, priority=0)
    ctx = make_context(endpoints=(slow, a, b, OPEN))
    assert [e.key for e in decide(ctx).candidates] == ["b", "a", "c"]
    ctx = make_context(endpoints=(slow, a, b), selection="priority")
    assert [e.key for e in decide(ctx).candidates] == ["a", "b", "c"]  # fitting first, then priority


# ----------------------------------------------------------------------------- the flow


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


LABELS = tuple(f"c{i}" for i in range(10))


def probs_with(conf: float, k: int = 3) -> np.ndarray:
    p = np.full(10, (1 - conf) / 9, dtype=np.float32)
    p[k] = conf
    return p


def make_request(clock, policy_data=None, n=1, mode=None, privacy=False, endpoints=1, deadline_ms=150):
    policy = parse_policy(policy_data or {
        "cloud": {"endpoints": [{"url": f"http://127.0.0.1:{9000 + i}", "name": f"ep{i}"} for i in range(endpoints)],
                  "retry": {"max_attempts": 3, "initial_backoff_ms": 10, "max_backoff_ms": 40}},
    })
    states = [EndpointState(ep, policy.cloud, clock) for ep in policy.cloud.endpoints]
    return RouteRequest(
        images=[object()] * n, policy=policy, mode=mode or policy.mode, privacy=privacy,
        deadline=clock() + deadline_ms / 1000, started=clock(), request_id="rid", labels=LABELS,
        thresholds=(0.8,) * 10, edge_version="e1", endpoints=states, rng=random.Random(0),
    )


def local(conf=0.5, n=1, edge_error=None):
    x = np.zeros((n, 1, 28, 28), np.float32)
    pixels = np.zeros((n, 28, 28), np.uint8)
    if edge_error:
        return LocalResult(x, pixels, None, edge_error)
    return LocalResult(x, pixels, np.stack([probs_with(conf)] * n))


def reply(k=7, rows=1):
    return CloudReply(np.stack([probs_with(0.97, k)] * rows), "c1", 0.010, 100)


def drive(gen, outcomes, clock):
    """Feed scripted outcomes; each CloudCall consumes one (a reply, an error, or a callable
    advancing the clock); Sleep advances the fake clock. Returns (result, effects seen)."""
    seen = []
    outcomes = list(outcomes)
    try:
        effect = next(gen)
        while True:
            seen.append(effect)
            if isinstance(effect, LocalWork):
                result = outcomes.pop(0)
            elif isinstance(effect, CloudCall):
                result = outcomes.pop(0)
                if isinstance(result, tuple):  # (seconds elapsed, outcome)
                    clock.t += result[0]
                    result = result[1]
            else:
                assert isinstance(effect, Sleep)
                clock.t += effect.seconds
                result = None
            effect = gen.send(result)
    except StopIteration as stop:
        return stop.value, seen


def test_confident_never_touches_cloud():
    clock = FakeClock()
    out, seen = drive(route(make_request(clock), clock), [local(0.95)], clock)
    p = out.predictions[0]
    assert (p.source, p.reason, p.attempts, p.edge) == ("edge", Reason.CONFIDENT, 0, None)
    assert [type(e) for e in seen] == [LocalWork]


def test_low_confidence_escalates_and_keeps_edge_opinion():
    clock = FakeClock()
    out, seen = drive(route(make_request(clock), clock), [local(0.5), reply(7)], clock)
    p = out.predictions[0]
    assert (p.source, p.reason, p.class_index, p.label, p.model_version) == ("cloud", Reason.LOW_CONFIDENCE, 7, "c7", "c1")
    assert p.edge.class_index == 3 and p.edge.model_version == "e1"
    call = seen[1]
    assert call.timeout_s <= 0.150 - 0.003 + 1e-9 and call.budget_s == pytest.approx(0.150)


def test_retryable_failure_backs_off_then_succeeds():
    clock = FakeClock()
    out, seen = drive(route(make_request(clock), clock),
                      [local(), (0.005, CloudUnavailable("503", retry_after=None)), reply()], clock)
    assert out.predictions[0].source == "cloud" and out.predictions[0].attempts == 2
    sleeps = [e for e in seen if isinstance(e, Sleep)]
    assert len(sleeps) == 1 and 0 <= sleeps[0].seconds <= 0.010


def test_retry_after_honoured_only_when_it_fits():
    clock = FakeClock()
    out, seen = drive(route(make_request(clock), clock),
                      [local(), CloudUnavailable("503", retry_after=0.05), reply()], clock)
    assert [e.seconds for e in seen if isinstance(e, Sleep)] == [0.05]
    assert out.predictions[0].source == "cloud"
    clock = FakeClock()  # Retry-After: 1 s cannot fit a 150 ms budget: fall back now, no sleep
    out, seen = drive(route(make_request(clock), clock), [local(), CloudUnavailable("503", retry_after=1.0)], clock)
    p = out.predictions[0]
    assert (p.source, p.reason, p.fallback, p.attempts) == ("edge", Reason.CLOUD_ERROR, True, 1)
    assert not [e for e in seen if isinstance(e, Sleep)]


@pytest.mark.parametrize("error", [CloudAuthError("401", status=401), CloudServerError("500", status=500)])
def test_non_retryable_errors_fall_back_without_retry(error):
    clock = FakeClock()
    out, seen = drive(route(make_request(clock), clock), [local(), error], clock)
    p = out.predictions[0]
    assert (p.source, p.reason, p.fallback, p.attempts) == ("edge", Reason.CLOUD_ERROR, True, 1)
    assert out.cloud_error is error


def test_never_attempts_past_the_deadline():
    clock = FakeClock()
    # Each attempt burns 60 ms of a 150 ms budget: a third attempt cannot start.
    outcomes = [local(), (0.060, CloudTimeout("t")), (0.060, CloudTimeout("t")), reply()]
    out, seen = drive(route(make_request(clock), clock), outcomes, clock)
    calls = [e for e in seen if isinstance(e, CloudCall)]
    assert len(calls) == 2
    assert out.predictions[0].reason == Reason.CLOUD_ERROR
    assert clock.t - 100.0 <= 0.150
    # every attempt's timeout ended before the deadline minus the reserve
    assert calls[1].timeout_s <= 0.150 - 0.060 - 0.003 + 1e-9


def test_failover_to_second_endpoint_without_sleeping():
    clock = FakeClock()
    out, seen = drive(route(make_request(clock, endpoints=2), clock),
                      [local(), CloudUnavailable("refused"), reply()], clock)
    calls = [e for e in seen if isinstance(e, CloudCall)]
    assert [c.state.endpoint.name for c in calls] == ["ep0", "ep1"]
    assert not [e for e in seen if isinstance(e, Sleep)]
    assert out.predictions[0].endpoint == "ep1"


def test_failover_on_auth_error_but_no_retry_of_same_endpoint():
    clock = FakeClock()
    out, seen = drive(route(make_request(clock, endpoints=2), clock),
                      [local(), CloudAuthError("401"), CloudAuthError("401")], clock)
    assert len([e for e in seen if isinstance(e, CloudCall)]) == 2
    assert out.predictions[0].reason == Reason.CLOUD_ERROR


def test_breaker_opens_and_requests_stop_trying():
    clock = FakeClock()
    policy = {"cloud": {"endpoints": [{"url": "http://127.0.0.1:9"}],
                        "retry": {"max_attempts": 1}, "breaker": {"failure_threshold": 2, "open_duration_s": 5, "open_jitter": 0}}}
    req = make_request(clock, policy)
    state = req.endpoints[0]
    for _ in range(2):
        req = make_request(clock, policy)
        req.endpoints = [state]
        drive(route(req, clock), [local(), CloudUnavailable("refused")], clock)
    req = make_request(clock, policy)
    req.endpoints = [state]
    out, seen = drive(route(req, clock), [local()], clock)
    assert out.predictions[0].reason == Reason.BREAKER_OPEN and not any(isinstance(e, CloudCall) for e in seen)
    clock.t += 5.0  # half-open: one trial goes through and closes the breaker
    req = make_request(clock, policy)
    req.endpoints = [state]
    out, _ = drive(route(req, clock), [local(), reply()], clock)
    assert out.predictions[0].source == "cloud" and state.breaker.state.value == "closed"


def test_edge_error_escalates_and_both_failing_raise_with_both_causes():
    clock = FakeClock()
    err = EdgeError("boom")
    out, _ = drive(route(make_request(clock), clock), [local(edge_error=err), reply()], clock)
    p = out.predictions[0]
    assert (p.source, p.reason, p.fallback, p.edge) == ("cloud", Reason.EDGE_ERROR, True, None)
    clock = FakeClock()
    cloud_err = CloudServerError("500")
    with pytest.raises(PredictionUnavailable) as info:
        drive(route(make_request(clock), clock), [local(edge_error=err), cloud_err], clock)
    assert info.value.edge_error is err and info.value.cloud_error is cloud_err


def test_privacy_never_looks_at_the_cloud():
    clock = FakeClock()
    out, seen = drive(route(make_request(clock, privacy=True), clock), [local(0.1)], clock)
    assert out.predictions[0].reason == Reason.PRIVACY and len(seen) == 1
    with pytest.raises(PredictionUnavailable):
        drive(route(make_request(clock, privacy=True), clock), [local(edge_error=EdgeError("x"))], clock)
    with pytest.raises(PrivacyViolation):
        drive(route(make_request(clock, privacy=True, mode=Mode.CLOUD_ONLY), clock), [local()], clock)


def test_cloud_only_skips_the_edge_and_fails_strictly():
    clock = FakeClock()
    gen = route(make_request(clock, mode=Mode.CLOUD_ONLY), clock)
    first = next(gen)
    assert isinstance(first, LocalWork) and first.run_edge is False
    gen.close()
    with pytest.raises(PredictionUnavailable):
        drive(route(make_request(clock, mode=Mode.CLOUD_ONLY), clock),
              [LocalResult(np.zeros((1, 1, 28, 28), np.float32), None), CloudServerError("500")], clock)


def test_batch_escalates_only_unsure_rows_in_one_call():
    clock = FakeClock()
    x = np.zeros((3, 1, 28, 28), np.float32)
    probs = np.stack([probs_with(0.95, 1), probs_with(0.4, 2), probs_with(0.99, 4)])
    out, seen = drive(route(make_request(clock, n=3), clock),
                      [LocalResult(x, np.zeros((3, 28, 28), np.uint8), probs), reply(9, rows=1)], clock)
    calls = [e for e in seen if isinstance(e, CloudCall)]
    assert len(calls) == 1 and len(calls[0].x) == 1
    assert [(p.source, p.class_index) for p in out.predictions] == [("edge", 1), ("cloud", 9), ("edge", 4)]
    assert [p.request_id for p in out.predictions] == ["rid-0", "rid-1", "rid-2"]
