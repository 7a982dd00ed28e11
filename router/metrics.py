"""Optional Prometheus exporter on the device: ``router.metrics.serve(port)``.

Needs ``pip install 'hybrid-edge-router[metrics]'`` (prometheus-client). A collector on
prometheus_client's own ``CollectorRegistry`` (never the global one) reads the router's
``stats()`` at scrape time, so nothing is counted twice and the request path does no extra work.
Served on 127.0.0.1 by default. Refused under privacy mode: the exporter is a listening socket.

Metric names (prefix ``hybrid_router``): ``answers_total{source,reason}``,
``escalation_rate``, ``request_latency_seconds{source,reason}`` (histogram),
``breaker_open{endpoint,state}``, and per edge version ``edge_answers_total{edge_version}``,
``edge_escalation_rate{edge_version}``, ``edge_unsure_rate{edge_version}``,
``edge_audits_total{edge_version,outcome}``, ``edge_agreement{edge_version,bound}`` (point,
lower, upper) and ``drift_alarm`` (1 while an alarm stands for the answering version).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Optional

from router.errors import ConfigError, PrivacyViolation

if TYPE_CHECKING:
    from router.api import Router

INSTALL_HINT = "pip install 'hybrid-edge-router[metrics]'"
PREFIX = "hybrid_router"


def require_prometheus() -> None:
    if importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError(f"router.metrics needs prometheus-client; run: {INSTALL_HINT}")


class RouterCollector:
    """Reads one router's ``stats()`` at each scrape."""

    def __init__(self, router: "Router") -> None:
        self.router = router

    def describe(self):
        return []  # collected lazily: registering must not run stats()

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        s = self.router.stats()
        answers = CounterMetricFamily(f"{PREFIX}_answers", "answers by source and reason", labels=["source", "reason"])
        for key, n in s["by_source_reason"].items():
            answers.add_metric(key.split("/", 1), n)
        yield answers
        yield GaugeMetricFamily(f"{PREFIX}_escalation_rate", "answers given by the cloud / all answers",
                                value=s["escalation_rate"])
        hist = HistogramMetricFamily(f"{PREFIX}_request_latency_seconds", "answer latency by source and reason",
                                     labels=["source", "reason"])
        with self.router._telemetry._lock:
            latency = {k: (list(h.bounds), list(h.counts), h.sum) for k, h in self.router._telemetry.latency.items()}
        for (source, reason), (bounds, counts, total_ms) in sorted(latency.items()):
            buckets, seen = [], 0
            for b, c in zip(bounds, counts):
                seen += c
                buckets.append(("+Inf" if b == float("inf") else repr(b / 1000.0), seen))
            hist.add_metric([source, reason], buckets, total_ms / 1000.0)
        yield hist
        breaker = GaugeMetricFamily(f"{PREFIX}_breaker_state", "1 for the breaker's current state per endpoint",
                                    labels=["endpoint", "state"])
        for name, ep in s["endpoints"].items():
            for state in ("closed", "open", "half_open"):
                breaker.add_metric([name, state], 1.0 if ep["breaker"] == state else 0.0)
        yield breaker
        field = s.get("field", {})
        per = field.get("versions", {})
        v_answers = CounterMetricFamily(f"{PREFIX}_edge_answers", "answers per edge model version",
                                        labels=["edge_version"])
        v_esc = GaugeMetricFamily(f"{PREFIX}_edge_escalation_rate", "realised escalation per edge version",
                                  labels=["edge_version"])
        v_unsure = GaugeMetricFamily(f"{PREFIX}_edge_unsure_rate",
                                     "edge answers under their threshold per edge version (calibration predicts it)",
                                     labels=["edge_version"])
        audits = CounterMetricFamily(f"{PREFIX}_edge_audits", "shadow audits per edge version by outcome",
                                     labels=["edge_version", "outcome"])
        agreement = GaugeMetricFamily(f"{PREFIX}_edge_agreement", "audit agreement with its Wilson interval",
                                      labels=["edge_version", "bound"])
        for v, c in per.items():
            v_answers.add_metric([v], c["requests"])
            v_esc.add_metric([v], c["escalation_rate"])
            if c["unsure_rate"] is not None:
                v_unsure.add_metric([v], c["unsure_rate"])
            a = c["audits"]
            for outcome, n in (("agreed", a["agreed"]), ("disagreed", a["sent"] - a["failed"] - a["agreed"]),
                               ("failed", a["failed"]), ("dropped", a["dropped"]),
                               ("skipped_budget", a["skipped_budget"])):
                audits.add_metric([v, outcome], n)
            if c["agreement"] is not None:
                lo, hi = c["agreement_ci"]
                for bound, value in (("point", c["agreement"]), ("lower", lo), ("upper", hi)):
                    agreement.add_metric([v, bound], value)
        yield from (v_answers, v_esc, v_unsure, audits, agreement)
        alarm = field.get("alarm")
        yield GaugeMetricFamily(f"{PREFIX}_drift_alarm", "1 while a drift alarm stands for the answering version",
                                value=1.0 if alarm and alarm["version"] == field.get("edge_version") else 0.0)


def registry_for(router: "Router"):
    """A fresh ``CollectorRegistry`` holding only this router's collector."""
    require_prometheus()
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RouterCollector(router))
    return registry


def serve(port: int = 9464, *, router: Optional["Router"] = None, addr: str = "127.0.0.1"):
    """Serve ``router``'s metrics (default: the process-wide default router) on ``addr:port``
    (port 0: any free one). Returns ``(server, thread)``; ``server.server_address[1]`` is the port,
    ``server.shutdown()`` stops it."""
    require_prometheus()
    from prometheus_client import start_http_server

    if router is None:
        from router._default import default_router

        router = default_router()
    if router.policy.privacy_mode:
        raise PrivacyViolation("router.metrics.serve: privacy mode forbids sockets; scrape stats() in-process instead")
    return start_http_server(port, addr=addr, registry=registry_for(router))
