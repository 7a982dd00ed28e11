"""Escalation budgets (router/budget.py): the caps with a fake clock, the rule's place in the
table, charging only on real attempts, and the real service stopping at the cap."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from router.budget import BudgetSettings, EscalationBudget, Gate
from router.decision import CloudCall, LocalResult, decide, route
from router.errors import CloudUnavailable, ConfigError, PredictionUnavailable
from router.policy import Mode, parse_policy
from router.prediction import Reason
from tests.test_decision import OK, OPEN, SLOW, FakeClock, drive, local, make_context, make_request, probs_with, reply

HOUR, DAY = 3600.0, 86400.0


class Clock:
    """One fake clock for both the monotonic and the wall reading (starts at a UTC midnight)."""

    def __init__(self, t: float = 20_000 * DAY) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def budget(clock=None, **settings) -> EscalationBudget:
    clock = clock or Clock()
    return EscalationBudget(BudgetSettings(**settings), clock, clock)


def take(b: EscalationBudget, price: float = 0.0) -> str | None:
    """One eligible image that wants to escalate: charged if it may, else the cap that bound."""
    room, cap = b.headroom(1, price)
    if room >= 1:
        b.charge("escalation", 1, price)
        return None
    b.refuse(cap)
    return cap


# ----------------------------------------------------------------------------- the caps, unit


@pytest.mark.parametrize(
    "settings, steps, expected",
    [
        # rate cap: 2/s with a bucket of 2 -- two at once, then one per half second
        (dict(rate_per_s=2), [0, 0, 0], [None, None, "rate"]),
        (dict(rate_per_s=2), [0, 0, 0.5, 0], [None, None, None, "rate"]),
        # burst: 1/s holding 3 -- three at once, the fourth waits
        (dict(rate_per_s=1, burst=3), [0, 0, 0, 0, 1.0], [None, None, None, "rate", None]),
        # refill never exceeds the burst: after a long pause still only `burst` at once
        (dict(rate_per_s=1, burst=2), [0, 0, 100, 0, 0], [None, None, None, None, "rate"]),
    ],
)
def test_token_bucket(settings, steps, expected):
    clock = Clock()
    b = budget(clock, **settings)
    seen = []
    for dt in steps:
        clock.t += dt
        seen.append(take(b))
    assert seen == expected


def test_share_cap_over_a_sliding_window():
    clock = Clock()
    b = budget(clock, max_share=0.3, window_s=60)
    # 10 eligible images that all want the cloud: only 3 of 10 may (the 4th at the 4th image: 1/4 <= 0.3)
    got = [take(b) for _ in range(10)]
    assert got.count(None) == 3 and set(got) == {None, "share"}
    assert b.snapshot()["window_share"] == pytest.approx(0.3)
    # confident traffic (eligible, not escalating) makes room again
    for _ in range(10):
        b.headroom(1)
    assert take(b) is None  # 4 of 21
    # the window slides: a minute later the old counts are gone, and the first image alone is 100 %
    clock.t += 61
    assert take(b) == "share"
    assert b.snapshot()["window_share"] == 0.0


@pytest.mark.parametrize(
    "settings, price, script, expected",
    [
        # 0.03 per hour at 0.01 a call: three, then the hour binds; the next UTC hour starts afresh
        (dict(budget_per_hour=0.03), 0.01, [0, 0, 0, 0, HOUR], [None, None, None, "cost_hour", None]),
        # the day binds across hours: 2 per hour, 3 per day
        (dict(budget_per_hour=0.02, budget_per_day=0.03), 0.01, [0, 0, 0, HOUR, HOUR, DAY],
         [None, None, "cost_hour", None, "cost_day", None]),
        # price_per_1k_calls: 1.0 per 1000 calls is 0.001 a call
        (dict(budget_per_hour=0.002), 0.001, [0, 0, 0], [None, None, "cost_hour"]),
    ],
)
def test_money_per_hour_and_day_roll_over(settings, price, script, expected):
    clock = Clock()
    b = budget(clock, **settings)
    seen = []
    for dt in script:
        clock.t += dt
        seen.append(take(b, price))
    assert seen == expected


def test_the_cap_that_binds_first_is_named_and_counted():
    clock = Clock()
    b = budget(clock, rate_per_s=100, burst=5, max_share=0.5, budget_per_hour=0.9)
    b.headroom(1)  # one confident image
    assert b.headroom(1, 0.5) == (1, "share")  # share: 1 of 2; money: 1 call; rate: 5 -- ties go to CAPS order
    b.charge("escalation", 1, 0.5)
    assert take(b, 0.5) == "share"
    b.headroom(3)
    assert take(b, 0.5) == "cost_hour"
    snap = b.snapshot()
    assert snap["refused"] == {"rate": 0, "share": 1, "cost_hour": 1, "cost_day": 0}
    assert snap["charged"]["escalation"] == 1 and snap["spent_hour"] == 0.5
    assert snap["tokens"] == pytest.approx(4)


def test_shadow_and_audit_calls_charge_the_budget():
    b = budget(rate_per_s=1, burst=2, budget_per_day=1.0)
    b.charge("audit", 1, 0.4)
    b.charge("shadow", 1, 0.4)
    assert b.headroom(1, 0.4) == (0, "rate")
    snap = b.snapshot()
    assert snap["charged"] == {"escalation": 0, "shadow": 1, "audit": 1} and snap["spent_day"] == pytest.approx(0.8)
    with pytest.raises(ValueError):
        b.charge("bogus")


def test_thread_safe_counts():
    clock = Clock()
    b = budget(clock, max_share=1.0)
    threads = [threading.Thread(target=lambda: [b.charge("escalation", 1) for _ in range(1000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert b.charged["escalation"] == 4000 and b._escalated == 4000


def test_policy_schema():
    p = parse_policy({"cloud": {"budget": {"rate_per_s": 2, "max_share": 0.3, "budget_per_day": 5},
                                "endpoints": [{"url": "http://127.0.0.1:1", "price_per_1k_calls": 1.5}]}})
    assert p.cloud.budget.enabled and p.cloud.budget.window_s == 60
    with pytest.raises(ConfigError, match="burst needs rate_per_s"):
        parse_policy({"cloud": {"budget": {"burst": 3}}})
    with pytest.raises(ConfigError, match="max_share"):
        parse_policy({"cloud": {"budget": {"max_share": 1.5}}})
    assert not parse_policy({"mode": "prefer_edge"}).cloud.budget.enabled


# ----------------------------------------------------------------------------- the rule table


@pytest.mark.parametrize(
    "kw, side, reason, fallback",
    [
        (dict(escalation_cap="rate"), "edge", Reason.ESCALATION_BUDGET, False),
        (dict(escalation_cap="share", mode=Mode.PREFER_CLOUD, confidence=0.99), "edge", Reason.ESCALATION_BUDGET, False),
        (dict(escalation_cap=None), "cloud", Reason.LOW_CONFIDENCE, False),
        # privacy, mode, confidence, connectivity and the latency deadline come first
        (dict(escalation_cap="rate", privacy=True), "edge", Reason.PRIVACY, False),
        (dict(escalation_cap="rate", mode=Mode.EDGE_ONLY), "edge", Reason.MODE, False),
        (dict(escalation_cap="rate", confidence=0.95), "edge", Reason.CONFIDENT, False),
        (dict(escalation_cap="rate", endpoints=(OPEN,)), "edge", Reason.BREAKER_OPEN, True),
        (dict(escalation_cap="rate", endpoints=(SLOW,)), "edge", Reason.BUDGET, False),
        (dict(escalation_cap="rate", now=0.140), "edge", Reason.BUDGET, False),
        # nothing local to answer with: no answer (a budget is a budget)
        (dict(escalation_cap="cost_day", confidence=None), "none", Reason.ESCALATION_BUDGET, False),
        (dict(escalation_cap="cost_day", mode=Mode.CLOUD_ONLY, confidence=None), "none", Reason.ESCALATION_BUDGET, False),
    ],
)
def test_rule_table_with_escalation_cap(kw, side, reason, fallback):
    v = decide(make_context(**kw))
    assert (v.side, v.reason, v.fallback) == (side, reason, fallback)


# ----------------------------------------------------------------------------- through the flow

PRICED = {"cloud": {"endpoints": [{"url": "http://127.0.0.1:9000", "name": "ep0", "price_per_call": 0.01},
                                  {"url": "http://127.0.0.1:9001", "name": "ep1", "price_per_call": 0.02}],
                    "retry": {"max_attempts": 3, "initial_backoff_ms": 10, "max_backoff_ms": 40}}}


def budgeted(clock, b, policy=None, **kw):
    req = make_request(clock, policy, **kw)
    req.budget = b
    return req


def test_flow_escalates_until_the_cap_then_answers_on_the_edge():
    clock = FakeClock()
    b = EscalationBudget(BudgetSettings(rate_per_s=0.001, burst=2), clock, clock)
    sources = []
    for _ in range(4):
        out, seen = drive(route(budgeted(clock, b), clock), [local(0.5), reply()], clock)
        p = out.predictions[0]
        sources.append((p.source, p.reason))
    assert sources == [("cloud", Reason.LOW_CONFIDENCE)] * 2 + [("edge", Reason.ESCALATION_BUDGET)] * 2
    assert b.snapshot()["refused"]["rate"] == 2 and b.charged["escalation"] == 2


def test_batch_escalates_only_what_the_budget_allows():
    clock = FakeClock()
    b = EscalationBudget(BudgetSettings(rate_per_s=0.001, burst=2), clock, clock)
    x = np.zeros((3, 1, 28, 28), np.float32)
    probs = np.stack([probs_with(0.4, 1), probs_with(0.4, 2), probs_with(0.4, 4)])
    out, seen = drive(route(budgeted(clock, b, n=3), clock),
                      [LocalResult(x, np.zeros((3, 28, 28), np.uint8), probs), reply(9, rows=2)], clock)
    calls = [e for e in seen if isinstance(e, CloudCall)]
    assert len(calls) == 1 and len(calls[0].x) == 2
    assert [p.reason for p in out.predictions] == [Reason.LOW_CONFIDENCE, Reason.LOW_CONFIDENCE,
                                                   Reason.ESCALATION_BUDGET]
    assert b.charged["escalation"] == 2 and b.refused["rate"] == 1


def test_charged_only_when_an_attempt_really_leaves():
    clock = FakeClock()
    b = EscalationBudget(BudgetSettings(rate_per_s=0.001, burst=1), clock, clock)
    policy = {"cloud": {"endpoints": [{"url": "http://127.0.0.1:9"}], "retry": {"max_attempts": 1},
                        "breaker": {"failure_threshold": 1, "open_duration_s": 5, "open_jitter": 0}}}
    req = budgeted(clock, b, policy)
    req.endpoints[0].breaker.record_failure()  # breaker open: the rule table keeps it local, nothing charged
    out, seen = drive(route(req, clock), [local(0.5)], clock)
    assert out.predictions[0].reason is Reason.BREAKER_OPEN and b.charged["escalation"] == 0
    # privacy never looks at the budget
    out, _ = drive(route(budgeted(clock, b, privacy=True), clock), [local(0.1)], clock)
    assert out.predictions[0].reason is Reason.PRIVACY and b.charged["escalation"] == 0
    # the one token is still there for a real escalation
    out, _ = drive(route(budgeted(clock, b), clock), [local(0.5), reply()], clock)
    assert out.predictions[0].source == "cloud" and b.charged["escalation"] == 1


def test_retries_and_failover_pay_their_price_but_one_token():
    clock = FakeClock()
    b = EscalationBudget(BudgetSettings(rate_per_s=0.001, burst=5, budget_per_hour=1.0), clock, clock)
    out, seen = drive(route(budgeted(clock, b, PRICED), clock), [local(0.5), CloudUnavailable("refused"), reply()], clock)
    assert [c.state.endpoint.name for c in seen if isinstance(c, CloudCall)] == ["ep0", "ep1"]
    snap = b.snapshot()
    assert snap["charged"]["escalation"] == 1 and snap["tokens"] == pytest.approx(4, abs=0.01)
    assert snap["spent_hour"] == pytest.approx(0.03)


def test_cost_cap_uses_the_dearest_endpoint_price():
    clock = FakeClock()
    b = EscalationBudget(BudgetSettings(budget_per_hour=0.03), clock, clock)
    req = budgeted(clock, b, PRICED)
    assert Gate(b, 1, req.endpoints).room == 1  # 0.03 / 0.02 (ep1), not 0.03 / 0.01


def test_edge_failed_and_budget_spent_is_unavailable_with_a_clear_message():
    from router.errors import EdgeError

    clock = FakeClock()
    b = EscalationBudget(BudgetSettings(rate_per_s=0.001, burst=1), clock, clock)
    b.charge("escalation", 1)
    with pytest.raises(PredictionUnavailable, match="escalation budget"):
        drive(route(budgeted(clock, b), clock), [local(edge_error=EdgeError("boom"))], clock)


# ----------------------------------------------------------------------------- the real service


@pytest.fixture(scope="module")
def service():
    from cloud_service.launch import LocalService

    with LocalService() as svc:
        yield svc


def test_real_service_escalations_stop_at_the_cap(service):
    from router import Router
    from router_tools.datasets import load_test

    policy = parse_policy({
        "confidence_threshold": 1.0,  # every request wants the cloud
        "default_deadline_ms": 2000,
        "cloud": {"endpoints": [{"url": service.url, "name": "svc", "price_per_call": 0.01}],
                  "budget": {"rate_per_s": 0.001, "burst": 3, "budget_per_hour": 1.0}},
        "decision_log": False,
    })
    images = load_test().images[:8]
    with Router(policy) as r:
        preds = [r.predict(img) for img in images]
        stats = r.stats()
    assert [p.source for p in preds] == ["cloud"] * 3 + ["edge"] * 5
    assert {p.reason for p in preds[3:]} == {Reason.ESCALATION_BUDGET}
    assert all(p.attempts == 0 and not p.fallback for p in preds[3:])
    eb = stats["escalation_budget"]
    assert eb["refused"]["rate"] == 5 and eb["charged"]["escalation"] == 3
    assert eb["spent_hour"] == pytest.approx(0.03)
    assert stats["by_source_reason"]["edge/escalation_budget"] == 5 and stats["cloud_attempts"] == 3
