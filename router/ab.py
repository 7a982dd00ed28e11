"""A/B tests of routing policies: arms, deterministic assignment, per-arm statistics.

The policy names one experiment (``experiments:``) with two or more arms, each a traffic share
and overrides of the routing policy (``confidence_threshold``, ``mode``, ``default_deadline_ms``,
``budget``). A request goes to an arm by a stable hash -- blake2b of the experiment name and the
caller's key (``predict(img, ab_key="user-42")``: the same user always lands in the same arm,
on any device and across restarts), or of the request id when there is no key (or ``key:
request``). Explicit per-call arguments (``threshold=``, ``mode=``, ``deadline_ms=``) still win
over the arm's overrides.

Per arm the router counts requests, escalations and latency, and -- when the caller reports the
true label with ``Router.record_outcome(request_id, label)`` -- accuracy. Proportions carry Wilson
score intervals; arms are compared with Newcombe's hybrid score interval for a difference of two
independent proportions (Newcombe 1998, method 10): the difference is "not yet significant" while
that interval contains 0. Written by hand on the standard library (``statistics.NormalDist``):
the device client does not take scipy or statsmodels for a dozen lines of closed-form math;
tests/test_ab.py checks them against published values.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict, deque
from statistics import NormalDist
from typing import Any, Literal, NamedTuple, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from router.budget import BudgetSettings

_LATENCY_SAMPLES = 10_000  # per arm, the most recent (percentiles of the recent traffic)
_PENDING_OUTCOMES = 100_000  # answers remembered for record_outcome (oldest forgotten first)


class ArmOverrides(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    confidence_threshold: Optional[float] = Field(None, ge=0, le=1)
    mode: Optional[Literal["prefer_edge", "edge_only", "prefer_cloud", "cloud_only"]] = None
    default_deadline_ms: Optional[float] = Field(None, gt=0)
    budget: Optional[BudgetSettings] = Field(None, description="this arm's own escalation budget (cloud.budget)")


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    share: float = Field(gt=0, le=1)
    overrides: ArmOverrides = ArmOverrides()


class ExperimentSettings(BaseModel):
    """``experiments:`` in the policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="part of the assignment hash: a new name reshuffles users")
    key: Literal["caller", "request"] = Field("caller", description="caller: by ab_key when given; request: per request")
    arms: tuple[Arm, ...] = Field(min_length=2)

    @model_validator(mode="after")
    def _arms(self) -> "ExperimentSettings":
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        total = sum(a.share for a in self.arms)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"arm shares must add up to 1, they add up to {total:g}")
        return self


def bucket(experiment: str, key: str) -> float:
    """A stable point in [0, 1) for ``key`` in ``experiment`` (blake2b, the same on every machine)."""
    digest = hashlib.blake2b(f"{experiment}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign(settings: ExperimentSettings, key: str) -> Arm:
    u = bucket(settings.name, key)
    edge = 0.0
    for arm in settings.arms:
        edge += arm.share
        if u < edge:
            return arm
    return settings.arms[-1]  # shares summing to 1 - 1e-7


class ArmRoute(NamedTuple):
    """What a request assigned to an arm runs with (built once per policy, not per request)."""

    name: str
    policy: Any  # RoutingPolicy
    thresholds: tuple[float, ...]
    budget: Any = None  # EscalationBudget | None


class ExperimentPlan:
    """An experiment ready to route: each arm's policy, thresholds and budget."""

    def __init__(self, settings: ExperimentSettings, routes: dict[str, ArmRoute]) -> None:
        self.settings = settings
        self.routes = routes

    @classmethod
    def build(cls, policy, labels: tuple[str, ...], main_budget, old: Optional["ExperimentPlan"], clock):
        """Arms' policies from ``policy`` (a RoutingPolicy with ``experiments`` set). An arm with its
        own ``budget`` gets its own budget state (kept across reloads); the others share ``main_budget``."""
        from router.budget import budget_for
        from router.errors import ConfigError
        from router.policy import RoutingPolicy

        settings: ExperimentSettings = policy.experiments
        base = policy.model_dump()
        base["experiments"] = None
        routes = {}
        for arm in settings.arms:
            data = {**base, "cloud": dict(base["cloud"])}
            ov = arm.overrides
            for k in ("confidence_threshold", "mode", "default_deadline_ms"):
                if getattr(ov, k) is not None:
                    data[k] = getattr(ov, k)
            if ov.budget is not None:
                data["cloud"]["budget"] = ov.budget.model_dump()
            try:
                arm_policy = RoutingPolicy.model_validate(data)
            except ValueError as exc:
                raise ConfigError(f"experiments: arm {arm.name!r}: {exc}") from None
            budget = main_budget
            if ov.budget is not None:
                prev = old.routes.get(arm.name) if old is not None else None
                prev_budget = prev.budget if prev is not None and prev.budget is not main_budget else None
                budget = budget_for(ov.budget, prev_budget, clock)
            routes[arm.name] = ArmRoute(name=arm.name, policy=arm_policy,
                                        thresholds=arm_policy.thresholds_for(labels), budget=budget)
        return cls(settings, routes)

    def route_for(self, ab_key: Optional[str], request_id: str) -> ArmRoute:
        key = ab_key if ab_key is not None and self.settings.key == "caller" else f"request:{request_id}"
        return self.routes[assign(self.settings, key).name]


# ----------------------------------------------------------------------------- statistics


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927); (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(s1: int, n1: int, s2: int, n2: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """p1 - p2 and its hybrid score interval (Newcombe 1998, method 10), from Wilson intervals."""
    p1 = s1 / n1 if n1 else 0.0
    p2 = s2 / n2 if n2 else 0.0
    l1, u1 = wilson(s1, n1, confidence)
    l2, u2 = wilson(s2, n2, confidence)
    d = p1 - p2
    lower = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, lower, upper


def _percentiles(values) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    s = sorted(values)

    def q(p: float) -> float:  # nearest-rank
        return float(s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))])

    return {"p50": q(0.50), "p95": q(0.95), "p99": q(0.99)}


class _ArmCounts:
    __slots__ = ("requests", "escalated", "budget_refused", "labeled", "correct", "latency")

    def __init__(self) -> None:
        self.requests = self.escalated = self.budget_refused = self.labeled = self.correct = 0
        self.latency: deque[float] = deque(maxlen=_LATENCY_SAMPLES)


class ExperimentStats:
    """Per-arm counters of one experiment (thread-safe); :meth:`snapshot` is ``stats()["experiments"]``."""

    def __init__(self, settings: ExperimentSettings) -> None:
        self._lock = threading.Lock()
        self.settings = settings
        self.arms: dict[str, _ArmCounts] = {a.name: _ArmCounts() for a in settings.arms}
        self._pending: OrderedDict[str, tuple[str, str, int]] = OrderedDict()  # request id -> (arm, label, index)

    def reconfigure(self, settings: ExperimentSettings) -> "ExperimentStats":
        """Keep the counts when the same experiment is reloaded; a renamed experiment starts afresh."""
        if settings.name != self.settings.name:
            return ExperimentStats(settings)
        with self._lock:
            self.settings = settings
            for a in settings.arms:
                self.arms.setdefault(a.name, _ArmCounts())
        return self

    def record(self, predictions) -> None:
        with self._lock:
            for p in predictions:
                c = self.arms.get(p.arm)
                if c is None:
                    continue
                c.requests += 1
                c.escalated += p.source == "cloud"
                c.budget_refused += p.reason.value == "escalation_budget"
                c.latency.append(p.timings.total_ms)
                self._pending[p.request_id] = (p.arm, p.label, p.class_index)
                if len(self._pending) > _PENDING_OUTCOMES:
                    self._pending.popitem(last=False)

    def record_outcome(self, request_id: str, label) -> bool:
        """The true label of an answered request (name or class index); False when the request is
        unknown (never answered under an arm, already reported, or forgotten)."""
        with self._lock:
            entry = self._pending.pop(request_id, None)
            if entry is None:
                return False
            arm, predicted, index = entry
            c = self.arms[arm]
            c.labeled += 1
            c.correct += (label == index) if isinstance(label, int) else (str(label) == predicted)
            return True

    def snapshot(self, confidence: float = 0.95) -> dict:
        with self._lock:
            arms = {}
            shares = {a.name: a.share for a in self.settings.arms}
            for name, c in self.arms.items():
                arms[name] = {
                    "share": shares.get(name, 0.0),
                    "requests": c.requests,
                    "escalated": c.escalated,
                    "escalation_share": c.escalated / c.requests if c.requests else 0.0,
                    "escalation_ci": list(wilson(c.escalated, c.requests, confidence)),
                    "budget_refused": c.budget_refused,
                    "latency_ms": _percentiles(c.latency),
                    "labeled": c.labeled,
                    "correct": c.correct,
                    "accuracy": c.correct / c.labeled if c.labeled else None,
                    "accuracy_ci": list(wilson(c.correct, c.labeled, confidence)) if c.labeled else None,
                }
            return {"name": self.settings.name, "key": self.settings.key, "confidence": confidence, "arms": arms}


# ----------------------------------------------------------------------------- the comparison


def _pt(x: float) -> str:
    return f"{x * 100:+.1f} pt"


def compare(experiment: dict, confidence: float = 0.95) -> list[str]:
    """Each arm against the first, on accuracy (when labeled) and escalation share, as lines of
    text; from the counts in ``experiment`` (``stats()["experiments"]``), so any confidence level works."""
    arms = list(experiment["arms"].items())
    (base_name, base), others = arms[0], arms[1:]
    pct = f"{confidence * 100:g}%"
    lines = []
    for name, arm in others:
        for what, s_key, n_key in (("accuracy", "correct", "labeled"), ("escalation share", "escalated", "requests")):
            n1, n2 = arm.get(n_key, 0), base.get(n_key, 0)
            if not n1 or not n2:
                lines.append(f"{name} vs {base_name}: {what}: no data yet ({n_key}: {n1} vs {n2})")
                continue
            d, lo, hi = newcombe(arm[s_key], n1, base[s_key], n2, confidence)
            verdict = ("not yet significant (the interval contains 0; collect more "
                       f"{'labeled requests' if n_key == 'labeled' else 'requests'})"
                       if lo <= 0 <= hi else f"significant at {pct}")
            lines.append(f"{name} vs {base_name}: {what} {_pt(d)} ({pct} Newcombe interval {_pt(lo)} to {_pt(hi)}, "
                         f"n = {n1} vs {n2}): {verdict}")
    return lines


def table(experiment: dict, confidence: float = 0.95) -> list[str]:
    """Per-arm figures as aligned text lines (CIs recomputed at ``confidence`` from the counts)."""
    head = ("arm", "share", "requests", "escalated", "esc. CI", "p50/p95/p99 ms", "labeled", "accuracy", "acc. CI")
    rows = [head]
    for name, a in experiment["arms"].items():
        lo, hi = wilson(a["escalated"], a["requests"], confidence)
        lat = a.get("latency_ms") or {}
        acc = f"{a['correct'] / a['labeled']:.2%}" if a.get("labeled") else "-"
        acc_ci = "-"
        if a.get("labeled"):
            alo, ahi = wilson(a["correct"], a["labeled"], confidence)
            acc_ci = f"{alo:.1%}–{ahi:.1%}"
        rows.append((name, f"{a.get('share', 0):.2f}", str(a["requests"]),
                     f"{a['escalated']} ({a['escalated'] / a['requests']:.1%})" if a["requests"] else "0",
                     f"{lo:.1%}–{hi:.1%}" if a["requests"] else "-",
                     "/".join(f"{lat.get(k, 0):.1f}" for k in ("p50", "p95", "p99")),
                     str(a.get("labeled", 0)), acc, acc_ci))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
