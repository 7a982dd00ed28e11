"""Prometheus metrics of one service instance, on its own ``CollectorRegistry`` (never the global one).

Names follow Triton's where there is an equivalent: ``inference_count`` (rows computed) over
``execution_count`` (ONNX Runtime calls) is the average batch size, as with Triton's
``nv_inference_count`` / ``nv_inference_exec_count``.

With ``server.workers > 1`` every uvicorn worker process has its own registry, so a scrape
sees one worker; use one worker per container (or the Ray engine) when exact totals matter.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "hybrid_cloud"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ServiceMetrics:
    """All metrics of one app; ``render()`` gives the exposition text."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "HTTP requests by route template and status code", ["endpoint", "status"], registry=r
        )
        self.request_latency = Histogram(
            f"{PREFIX}_request_duration_seconds", "HTTP request latency by route template", ["endpoint"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", "HTTP requests being handled", registry=r)
        self.queue_time = Histogram(
            f"{PREFIX}_queue_duration_seconds", "time a request waited in the batch queue before execution", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.compute_time = Histogram(
            f"{PREFIX}_compute_duration_seconds", "ONNX Runtime time of one execution (batch)", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "rows per ONNX Runtime execution", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.inference_count = Counter(
            f"{PREFIX}_inference_count", "rows (images) computed", ["model"], registry=r
        )
        self.execution_count = Counter(
            f"{PREFIX}_execution_count", "ONNX Runtime executions (batches)", ["model"], registry=r
        )
        self.request_count = Counter(
            f"{PREFIX}_inference_requests", "inference requests computed successfully", ["model"], registry=r
        )
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "requests waiting in the batch queue", ["model"], registry=r)
        self.rejected = Counter(
            f"{PREFIX}_rejected_requests",
            "requests refused before queueing (queue_full; expected_wait: the budget could not be met; shutting_down)",
            ["model", "reason"], registry=r,
        )
        self.expired = Counter(
            f"{PREFIX}_expired_requests",
            "requests dropped from the queue because their budget ran out or would before their batch ends "
            "(answered 504, not computed)",
            ["model"], registry=r,
        )
        self.wasted_rows = Counter(
            f"{PREFIX}_wasted_rows", "rows computed for nobody (deadline passed during inference, client gone); "
            "compare with inference_count", ["model"], registry=r,
        )
        self.service_time = Gauge(
            f"{PREFIX}_service_time_estimate_seconds",
            "the batcher's batch-time model used for admission: fixed, per_row, and rel_error (mean relative error)",
            ["model", "term"], registry=r,
        )
        self.failures = Counter(f"{PREFIX}_inference_failures", "executions onnxruntime failed", ["model"], registry=r)
        self.model_ready = Gauge(f"{PREFIX}_model_ready", "1 when the model is loaded and warmed up", ["model", "version"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def model(self, name: str) -> "ModelMetrics":
        return ModelMetrics(self, name)


class ModelMetrics:
    """The per-model children, resolved once (label lookup is not free on the hot path)."""

    def __init__(self, metrics: ServiceMetrics, model: str) -> None:
        self.queue_time = metrics.queue_time.labels(model)
        self.compute_time = metrics.compute_time.labels(model)
        self.batch_size = metrics.batch_size.labels(model)
        self.inference_count = metrics.inference_count.labels(model)
        self.execution_count = metrics.execution_count.labels(model)
        self.request_count = metrics.request_count.labels(model)
        self.queue_depth = metrics.queue_depth.labels(model)
        self.rejected_full = metrics.rejected.labels(model, "queue_full")
        self.rejected_closed = metrics.rejected.labels(model, "shutting_down")
        self.rejected_deadline = metrics.rejected.labels(model, "expected_wait")
        self.wasted_rows = metrics.wasted_rows.labels(model)
        self.estimate_fixed = metrics.service_time.labels(model, "fixed")
        self.estimate_per_row = metrics.service_time.labels(model, "per_row")
        self.estimate_rel_error = metrics.service_time.labels(model, "rel_error")
        self.expired = metrics.expired.labels(model)
        self.failures = metrics.failures.labels(model)


class FleetMetrics:
    """What devices report to ``POST /v1/fleet/report``: aggregate counts per edge model version
    (never inputs), summed across the fleet and exposed on the service's ``/metrics`` labelled by
    ``edge_version``. At most ``max_versions`` distinct labels; later versions count as ``other``
    (a version string comes from the device, so it must not grow the registry without bound)."""

    FIELDS = ("answers", "escalated", "edge_ran", "unsure", "audited", "agreed")

    def __init__(self, registry: CollectorRegistry, max_versions: int = 32) -> None:
        self.max_versions = max_versions
        self.totals: dict[str, dict[str, int]] = {}
        self.reports = Counter(f"{PREFIX}_fleet_reports", "fleet reports accepted", registry=registry)
        self.counts = Counter(
            f"{PREFIX}_fleet_counts",
            "device counts summed across the fleet by edge version: answers, escalated (answered by the cloud), "
            "edge_ran, unsure (edge confidence under threshold), audited, agreed (audit: edge label == cloud label)",
            ["edge_version", "kind"], registry=registry)
        self.agreement = Gauge(f"{PREFIX}_fleet_agreement", "audit agreement (agreed / audited) by edge version",
                               ["edge_version"], registry=registry)
        self.escalation = Gauge(f"{PREFIX}_fleet_escalation_rate", "escalated / answers by edge version",
                                ["edge_version"], registry=registry)

    def label(self, version: str) -> str:
        if version in self.totals or len(self.totals) < self.max_versions:
            return version
        return "other"

    def record(self, versions: dict[str, dict[str, int]]) -> None:
        for version, counts in versions.items():
            v = self.label(version)
            total = self.totals.setdefault(v, dict.fromkeys(self.FIELDS, 0))
            for kind in self.FIELDS:
                n = int(counts.get(kind, 0))
                if n:
                    total[kind] += n
                    self.counts.labels(v, kind).inc(n)
            if total["audited"]:
                self.agreement.labels(v).set(total["agreed"] / total["audited"])
            if total["answers"]:
                self.escalation.labels(v).set(total["escalated"] / total["answers"])
        self.reports.inc()
