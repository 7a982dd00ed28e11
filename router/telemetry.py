"""Router telemetry: counters and latency histograms per source and reason, and one structured
decision log line per request (logger ``router.decision``) that never carries the payload."""

from __future__ import annotations

import json
import logging
import threading
from bisect import bisect_left
from collections import Counter
from operator import attrgetter

from router.ab import ExperimentSettings, ExperimentStats
from router.prediction import Prediction

decision_log = logging.getLogger("router.decision")

# The reason's plain value, not the Enum: hashing a Reason runs Enum.__hash__ in Python, per answer.
_GROUP = attrgetter("source", "reason._value_", "timings.total_ms")
_FALLBACK = attrgetter("fallback")
_FAILURE = attrgetter("cloud_failure")

# Upper bounds in milliseconds (Prometheus-style cumulative buckets are derived on export).
LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, float("inf"))


class Histogram:
    def __init__(self, bounds=LATENCY_BUCKETS_MS) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float, count: int = 1) -> None:
        """``count`` observations of ``value`` (a batch's answers share one timing)."""
        self.counts[bisect_left(self.bounds, value)] += count
        self.sum += value * count
        self.n += count

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-quantile (coarse, for dashboards)."""
        if not self.n:
            return 0.0
        target, seen = q * self.n, 0
        for bound, count in zip(self.bounds, self.counts):
            seen += count
            if seen >= target:
                return bound
        return self.bounds[-1]

    def snapshot(self) -> dict:
        return {
            "count": self.n,
            "mean_ms": self.sum / self.n if self.n else 0.0,
            "p50_ms_le": self.quantile(0.5),
            "p99_ms_le": self.quantile(0.99),
            "buckets_ms": {str(b): c for b, c in zip(self.bounds, self.counts) if c},
        }


class Telemetry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_source_reason: Counter[tuple[str, str]] = Counter()
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.requests = 0
        self.fallbacks = 0
        self.failures: Counter[str] = Counter()
        self.cloud_failures: Counter[str] = Counter()  # failed escalations by CloudFailure category
        self.cloud_attempts = 0
        self.bytes_sent = 0
        self.experiment: ExperimentStats | None = None  # per-arm counts, when the policy names an experiment
        self.budgets: dict = {}  # "" (the policy's) or an arm name -> router.budget.EscalationBudget

    def attach(self, budgets: dict, experiment: ExperimentSettings | None) -> None:
        """What the current policy routes with (called on construction and on every reload):
        its escalation budgets, and its experiment (counts kept while the name stays)."""
        with self._lock:
            self.budgets = {k: b for k, b in budgets.items() if b is not None}
            if experiment is None:
                self.experiment = None
            elif self.experiment is None:
                self.experiment = ExperimentStats(experiment)
            else:
                self.experiment = self.experiment.reconfigure(experiment)

    def record_outcome(self, request_id: str, label) -> bool:
        experiment = self.experiment
        return experiment.record_outcome(request_id, label) if experiment is not None else False

    def record(self, predictions: list[Prediction], attempts: int, bytes_sent: int, log: bool,
               details: bool = True) -> None:
        """``details=False`` (a privacy request, unless the policy asks otherwise): the log line
        says where and why, not what -- no label, no confidence."""
        # Counted per (source, reason, latency) group, not per answer: the answers of a batch
        # share one Timings, so a confident batch of 64 is one counter add and one histogram add.
        if len(predictions) == 1:  # one image (the confident hot path): no loop, no grouping
            p = predictions[0]
            groups = (((p.source, p.reason._value_, p.timings.total_ms), 1),)
            fallbacks, failure = p.fallback, p.cloud_failure
        else:  # per answer only C-level passes (attrgetter, Counter, sum, filter): no Python loop
            groups = Counter(map(_GROUP, predictions)).items()
            fallbacks = sum(map(_FALLBACK, predictions))
            # One request has at most one escalation: its failure counts once, not per row.
            failure = next(filter(None, map(_FAILURE, predictions)), None)  # (a CloudFailure is truthy)
        with self._lock:
            self.cloud_attempts += attempts
            self.bytes_sent += bytes_sent
            if failure is not None:
                self.cloud_failures[failure.category] += 1
            self.requests += len(predictions)
            self.fallbacks += fallbacks
            for (source, reason, total_ms), count in groups:
                key = (source, reason)
                self.by_source_reason[key] += count
                hist = self.latency.get(key)
                if hist is None:
                    hist = self.latency[key] = Histogram()
                hist.observe(total_ms, count)
        experiment = self.experiment
        if experiment is not None:
            experiment.record(predictions)
        if log and decision_log.isEnabledFor(logging.INFO):
            for p in predictions:
                line = {
                    "request_id": p.request_id, "source": p.source, "reason": p.reason.value,
                    "fallback": p.fallback, "label": p.label, "confidence": round(p.confidence, 4),
                    "attempts": p.attempts, "endpoint": p.endpoint, "edge_ms": round(p.timings.edge_ms, 3),
                    "cloud_ms": round(p.timings.cloud_ms, 3), "total_ms": round(p.timings.total_ms, 3),
                    "cloud_failure": p.cloud_failure.category if p.cloud_failure is not None else None,
                }
                if p.arm is not None:
                    line["arm"] = p.arm
                if not details:
                    del line["label"], line["confidence"]
                decision_log.info(json.dumps(line))

    def record_failure(self, exc: BaseException, attempts: int = 0) -> None:
        with self._lock:
            self.failures[type(exc).__name__] += 1
            self.cloud_attempts += attempts
            category = getattr(getattr(exc, "cloud_error", None), "category", None)
            if attempts and category is not None:  # an escalation was tried and failed (not "none was usable")
                self.cloud_failures[category] += 1

    def snapshot(self) -> dict:
        with self._lock:
            cloud = sum(c for (s, _), c in self.by_source_reason.items() if s == "cloud")
            out = {
                "requests": self.requests,
                "escalation_rate": cloud / self.requests if self.requests else 0.0,
                "fallbacks": self.fallbacks,
                "by_source_reason": {f"{s}/{r}": c for (s, r), c in sorted(self.by_source_reason.items())},
                "failures": dict(self.failures),
                "cloud_failures": dict(self.cloud_failures),
                "cloud_attempts": self.cloud_attempts,
                "bytes_sent": self.bytes_sent,
                "latency": {f"{s}/{r}": h.snapshot() for (s, r), h in sorted(self.latency.items())},
            }
            budgets, experiment = dict(self.budgets), self.experiment
        if budgets:
            # Refusals by the cap that bound (rate, share, cost_hour, cost_day), calls charged by kind.
            main = budgets.pop("", None)
            out["escalation_budget"] = main.snapshot() if main is not None else {}
            if budgets:
                out["escalation_budget"]["arms"] = {name: b.snapshot() for name, b in budgets.items()}
        if experiment is not None:
            out["experiments"] = experiment.snapshot()
        return out
