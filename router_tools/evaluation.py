"""The engine of ``hybrid-router eval``: a labeled set through the real router against a real
cloud service, optionally over a simulated network, measured from the caller's side.

One run (:func:`evaluate`) does, in this order:

1. **Model figures** -- the edge model's probabilities on the whole set (the router's own edge
   model, batched) and the cloud's (batched v2 requests straight to the service): edge-only and
   cloud-only accuracy, and the accuracy-vs-escalation curve of this set.
2. **Cloud-only latency baseline** -- a second router with the same policy, every request in
   ``mode=cloud_only``, over an evenly spaced subset, through the *same* network path, waiting
   up to 5 s for each answer (so its slow tail is measured, not cut off; the share that would
   have missed the deadline is reported). The report prints the router/cloud-only ratios on the
   same images.
3. **Router pass** -- every image through :meth:`Router.apredict` with ``concurrency`` requests
   in flight, one per image, each with its own deadline. ``outage=True`` switches the proxy to
   ``refuse`` for the middle third of the requests (by start order) and back.

Latency is wall time around each ``await apredict(...)`` (what the caller waits), so it includes
event-loop scheduling; the router's own ``timings.total_ms`` is recorded too. Cloud calls and
bytes come from ``router.stats()`` (differences over the pass, so warm-up is not counted).

The router is not told about the network: it is given the proxy's URL as its endpoint.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from router_tools.labeled import LabeledSet
from router.policy import RoutingPolicy, parse_policy

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)

# The cloud-only baseline waits for its answers: cutting it at the router's deadline would drop
# its slowest requests from its latency figures (and let timeouts open its breaker); how many
# would have missed the deadline is reported instead.
BASELINE_BUDGET_MS = 5000.0


@dataclass
class EvalSettings:
    policy: RoutingPolicy
    cloud_url: str  # the service itself (scoring goes here directly)
    route_url: str  # what the router is given (the proxy's URL, or cloud_url)
    deadline_ms: Optional[float] = None
    threshold: Optional[float] = None
    concurrency: int = 2
    baseline_limit: int = 1000
    outage: bool = False
    scoring_batch: int = 64


def policy_for(policy: RoutingPolicy, url: str, **overrides: Any) -> RoutingPolicy:
    """The policy with its endpoints replaced by one endpoint at ``url`` (keeping the first
    endpoint's model, key variable and settings), and no reload from the file mid-run."""
    data = policy.model_dump(mode="json")
    first = dict(data["cloud"]["endpoints"][0]) if data["cloud"]["endpoints"] else {}
    first.update(url=url, name=first.get("name") or "cloud")
    data["cloud"]["endpoints"] = [first]
    data["reload_check_interval_s"] = 0
    data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_policy(data, "eval policy")


def latency_summary(values_ms) -> dict:
    a = np.asarray(values_ms, dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(p50), "p95": float(p95),
            "p99": float(p99), "max": float(a.max())}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


async def _stream(router, pixels: np.ndarray, indices: np.ndarray, *, concurrency: int, deadline_ms: float,
                  threshold: Optional[float], mode: Optional[str], on_start: Callable[[int], Any] | None,
                  progress: Callable[[int], None] | None, tag: str) -> list[dict]:
    """``apredict`` for each index with ``concurrency`` in flight; one record per request."""
    from router.errors import RouterError

    records: list[Optional[dict]] = [None] * len(indices)
    next_job = 0
    done = 0

    async def worker() -> None:
        nonlocal next_job, done
        while next_job < len(indices):
            j = next_job
            next_job += 1
            if on_start is not None:
                await on_start(j)
            i = int(indices[j])
            t0 = time.perf_counter()
            try:
                p = await router.apredict(pixels[i], deadline_ms=deadline_ms, threshold=threshold, mode=mode,
                                          request_id=f"{tag}-{i}")
                wall = (time.perf_counter() - t0) * 1000.0
                rec = {"i": i, "pred": p.class_index, "source": p.source, "reason": p.reason.value,
                       "fallback": p.fallback, "confidence": p.confidence, "attempts": p.attempts,
                       "latency_ms": wall, "router_ms": p.timings.total_ms, "cloud_ms": p.timings.cloud_ms,
                       "error": None}
            except RouterError as exc:
                wall = (time.perf_counter() - t0) * 1000.0
                rec = {"i": i, "pred": None, "source": None, "reason": None, "fallback": None, "confidence": None,
                       "attempts": None, "latency_ms": wall, "router_ms": None, "cloud_ms": None,
                       "error": f"{type(exc).__name__}: {exc}"}
            rec["done_at"] = time.perf_counter()
            records[j] = rec
            done += 1
            if progress is not None:
                progress(done)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(indices))))))
    return [r for r in records if r is not None]


def phase_summary(rs: list[dict], deadline_ms: float) -> dict:
    """Accuracy, escalation, fallbacks and latency of a slice of the records."""
    answered = [r for r in rs if r["error"] is None]
    n = len(rs)
    return {
        "requests": n,
        "answered": len(answered),
        "accuracy": sum(r["pred"] == r["label"] for r in answered) / n if n else None,
        "escalation_rate": sum(r["source"] == "cloud" for r in answered) / n if n else None,
        "fallbacks": sum(bool(r["fallback"]) for r in answered),
        "within_deadline": sum(r["latency_ms"] <= deadline_ms for r in answered),
        "latency_ms": latency_summary([r["latency_ms"] for r in rs]),
        "reasons": _count(f"{r['source']}/{r['reason']}" for r in answered),
    }


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in items:
        out[k] = out.get(k, 0) + 1
    return out


def _diff(after: dict, before: dict, key: str) -> int:
    return int(after.get(key, 0)) - int(before.get(key, 0))


async def _warm(router, pixels: np.ndarray, deadline_ms: float) -> None:
    """Connect and read model metadata before measuring (not counted: stats are diffed)."""
    from router.errors import RouterError

    for k in range(3):
        try:
            await router.apredict(pixels[k % len(pixels)], mode="cloud_only", deadline_ms=max(deadline_ms, 2000.0))
        except RouterError:
            pass


def evaluate(data: LabeledSet, settings: EvalSettings, *, proxy=None,
             progress: Optional[ProgressFn] = None) -> dict:
    """Run the three phases (module docstring) and return the report as a JSON-able dict."""
    from router import Router
    from router_tools.thresholds import sweep
    from router_tools.scoring import V2BatchClient, model_probs

    policy = policy_for(settings.policy, settings.route_url)
    deadline_ms = float(settings.deadline_ms or policy.default_deadline_ms)
    threshold = settings.threshold if settings.threshold is not None else policy.confidence_threshold
    n = len(data)
    report: dict[str, Any] = {"data": {"name": data.name, "n": n}}
    t_start = time.perf_counter()

    router = Router(policy)
    baseline_router = Router(policy)
    try:
        edge = router.edge_model
        if edge is None:
            from router.errors import EdgeError

            raise EdgeError("the policy's edge model cannot be loaded; nothing to evaluate")
        # ------------------------------------------------------------ 1. model figures
        edge_probs = model_probs(edge, data.pixels)
        ep = policy.cloud.endpoints[0]
        with V2BatchClient(settings.cloud_url, ep.model, version=ep.version, api_key_env=ep.api_key_env,
                           batch_size=settings.scoring_batch) as client:
            cloud_probs, remote = client.predict_proba(
                data.pixels, edge.preprocess_config,
                progress=(lambda d, t: progress("cloud-only accuracy", d, t)) if progress else None)
        s = sweep(edge_probs, cloud_probs, data.labels)
        edge_pred, edge_conf = edge_probs.argmax(axis=1), edge_probs.max(axis=1)
        cloud_pred = cloud_probs.argmax(axis=1)
        predicted = s.at(threshold)
        images = data.app_images(edge.preprocess_config)  # what an app passes: RGB [H, W, 3], not the model's layout

        # ------------------------------------------------------------ 2. cloud-only baseline
        m = min(n, max(0, settings.baseline_limit))
        base_idx = np.unique(np.linspace(0, n - 1, m).round().astype(np.int64)) if m else np.empty(0, np.int64)

        async def phases() -> tuple[list[dict], list[dict], dict, dict, dict]:
            await _warm(baseline_router, images, deadline_ms)
            base_records = await _stream(
                baseline_router, images, base_idx, concurrency=settings.concurrency, deadline_ms=BASELINE_BUDGET_MS,
                threshold=None, mode="cloud_only", on_start=None, tag="baseline",
                progress=(lambda d: progress("cloud-only baseline", d, len(base_idx))) if progress else None)
            await baseline_router.aclose()
            await _warm(router, images, deadline_ms)
            before = router.stats()
            proxy_before = proxy.stats() if proxy is not None else None
            third = n // 3
            outage = {"active": False, "start": None, "end": None}

            async def on_start(j: int) -> None:
                if not settings.outage or proxy is None:
                    return
                if j == third and not outage["active"]:
                    await asyncio.to_thread(proxy.set_mode, "refuse")
                    outage.update(active=True, start=j, t0=time.perf_counter())
                elif j == 2 * third and outage["active"]:
                    await asyncio.to_thread(proxy.set_mode, "normal")
                    outage.update(active=False, end=j, t1=time.perf_counter(), seconds=time.perf_counter() - outage["t0"])

            records = await _stream(
                router, images, np.arange(n), concurrency=settings.concurrency, deadline_ms=deadline_ms,
                threshold=settings.threshold, mode=None, on_start=on_start, tag="eval",
                progress=(lambda d: progress("router", d, n)) if progress else None)
            if outage["active"]:  # fewer than 2/3 of the requests started after the switch
                await asyncio.to_thread(proxy.set_mode, "normal")
                outage.update(active=False, end=n, seconds=time.perf_counter() - outage["t0"])
            after = router.stats()
            proxy_after = proxy.stats() if proxy is not None else None
            await router.aclose()  # this loop's connection pool, before the loop ends
            return base_records, records, before, after, {"outage": outage, "proxy": (proxy_before, proxy_after)}

        base_records, records, before, after, extra = asyncio.run(phases())
    finally:
        baseline_router.close()
        router.close()

    # ---------------------------------------------------------------- per-request records
    labels = data.labels
    for r in records:
        i = r["i"]
        r.update(label=int(labels[i]), edge_pred=int(edge_pred[i]), edge_conf=float(edge_conf[i]),
                 cloud_pred=int(cloud_pred[i]))
    outage = extra["outage"]
    if outage.get("start") is not None:
        by_i = {r["i"]: r for r in records}
        for i in range(outage["start"], outage["end"]):
            if i in by_i:
                by_i[i]["outage"] = True

    answered = [r for r in records if r["error"] is None]
    lat = [r["latency_ms"] for r in records]
    base_lat = [r["latency_ms"] for r in base_records if r["error"] is None]
    router_lat = latency_summary(lat)
    base_summary = latency_summary(base_lat)
    base_ok = {r["i"] for r in base_records if r["error"] is None}
    paired = latency_summary([r["latency_ms"] for r in records if r["i"] in base_ok])
    reasons: dict[str, int] = {}
    for r in answered:
        key = f"{r['source']}/{r['reason']}" + ("+fallback" if r["fallback"] else "")
        reasons[key] = reasons.get(key, 0) + 1

    def within(rs: list[dict]) -> dict:
        ok = [r for r in rs if r["error"] is None and r["latency_ms"] <= deadline_ms]
        over = [r["latency_ms"] - deadline_ms for r in rs if r["latency_ms"] > deadline_ms]
        return {"requests": len(rs), "answered": sum(r["error"] is None for r in rs),
                "within_deadline": len(ok), "share_within_deadline": len(ok) / len(rs) if rs else None,
                "max_overrun_ms": max(over) if over else 0.0}

    escalated = [r for r in answered if r["source"] == "cloud"]
    report.update({
        "models": {
            "edge": {"name": edge.name, "version": edge.version, "manifest": str(edge.manifest_path)},
            "cloud": {"model": remote.model, "version": remote.version, "url": settings.cloud_url,
                      "input_datatype": remote.datatype},
        },
        "policy": {"mode": policy.mode.value, "threshold": threshold, "deadline_ms": deadline_ms,
                   "class_thresholds": dict(policy.class_thresholds), "breaker": policy.cloud.breaker.model_dump()},
        "run": {"concurrency": settings.concurrency, "baseline_requests": len(base_idx), "outage": settings.outage,
                "seconds": time.perf_counter() - t_start, "route_url": settings.route_url},
        "accuracy": {
            "edge_only": s.edge_accuracy,
            "cloud_only": s.cloud_accuracy,
            "router": sum(r["pred"] == r["label"] for r in answered) / n if n else None,
            "router_predicted": predicted.accuracy,
        },
        "escalation_rate": len(escalated) / n if n else None,
        "escalation_predicted": predicted.escalation,
        "fallback_rate": sum(bool(r["fallback"]) for r in answered) / n if n else None,
        "errors": n - len(answered),
        "error_types": _count(r["error"].split(":")[0] for r in records if r["error"]),
        "reasons": dict(sorted(reasons.items())),
        "latency_ms": {
            "router": router_lat,
            "router_confident": latency_summary([r["latency_ms"] for r in answered if r["source"] == "edge"]),
            "router_escalated": latency_summary([r["latency_ms"] for r in escalated]),
            "cloud_only": base_summary,
            # the ratios compare the same images: the router's latency on the baseline's subset
            "router_on_baseline_images": paired,
            "ratio_mean": _ratio(paired["mean"], base_summary["mean"]),
            "ratio_p50": _ratio(paired["p50"], base_summary["p50"]),
            "ratio_p99": _ratio(paired["p99"], base_summary["p99"]),
            "cloud_only_errors": sum(r["error"] is not None for r in base_records),
            "cloud_only_error_types": _count(r["error"].split(":")[0] for r in base_records if r["error"]),
            "cloud_only_over_deadline": sum(r["latency_ms"] > deadline_ms for r in base_records),
        },
        "deadline": within(records),
        "cloud": {
            "calls": _diff(after, before, "cloud_attempts"),
            "bytes_sent": _diff(after, before, "bytes_sent"),
            "escalated_requests": len(escalated),
            "breaker": {k: v["breaker"] for k, v in after.get("endpoints", {}).items()},
            "breaker_opened": sum(v["breaker_opened"] for v in after.get("endpoints", {}).values())
            - sum(v["breaker_opened"] for v in before.get("endpoints", {}).values()),
        },
        "curve": {"escalation": s.escalation.round(6).tolist(), "accuracy": s.accuracy.round(6).tolist(),
                  "thresholds": s.thresholds.round(7).tolist()},
        "records": records,
    })
    if outage.get("start") is not None:
        report["outage"] = {"range": [outage["start"], outage["end"]], "seconds": outage.get("seconds"),
                            **within([r for r in records if r.get("outage")])}
        # before / during / after, and how long after the path came back escalations succeeded again
        # (the breaker stays open for open_duration_s, then lets a trial call through)
        phases = {"before": records[:outage["start"]], "during": records[outage["start"]:outage["end"]],
                  "after": records[outage["end"]:]}
        report["outage"]["phases"] = {k: phase_summary(v, deadline_ms) for k, v in phases.items()}
        t1 = outage.get("t1")
        back = [r["done_at"] - t1 for r in phases["after"] if t1 is not None and r["source"] == "cloud"]
        report["outage"]["first_escalation_after_s"] = min(back) if back else None
    t_base = min((r["done_at"] for r in records), default=0.0)
    for r in records:
        r["done_at"] = round(r["done_at"] - t_base, 6)  # seconds since the first answer
    pb, pa = extra["proxy"]
    if pa is not None:
        report["network"] = {"profile": proxy.profile.describe(), "proxy": {
            k: getattr(pa, k) - getattr(pb, k) if isinstance(getattr(pa, k), int) else getattr(pa, k)
            for k in pa.__dataclass_fields__}}
    else:
        report["network"] = {"profile": "direct (no proxy)", "proxy": None}
    report["_sweep"] = s  # for the curve; removed before JSON
    return report
