"""Does ``predict()`` always answer, within its deadline, whatever the network and the cloud do?

For every fault the loopback tools can produce (``router_tools.netsim``: a TCP proxy with
latency/jitter/loss/resets/blackhole/bandwidth, and a misbehaving v2 server in front of the real
service), N requests that escalate (test images the edge model is unsure about) go through a
fresh ``Router`` from T threads with a 150 ms deadline. Per fault it prints: answered %, crashes
(exceptions escaping ``predict``), where the answers came from, fallback %, answers that are not
a distribution over the model's classes ("bad"), and the deadline overrun (``total_ms -
deadline`` as the router timed it, and the caller's own wall clock minus the deadline).

    .venv/bin/python bench/fault_matrix.py                    # 2000 requests x 8 threads per fault
    .venv/bin/python bench/fault_matrix.py --quick            # 200 x 4
    .venv/bin/python bench/fault_matrix.py --cases blackhole,500 --breaker off --json out.json

Each case starts with a fresh router that has read the model metadata (``connect()``), as a
started app would have; the process warms up once on the healthy service, unmeasured.
Each fault runs twice by default (``--breaker both``): with the shipped circuit breaker (after a
few failures most requests answer at once with ``breaker_open``), and with the breaker disabled
so that every request meets the fault -- the harder case for the deadline. Every case is bounded
(``--case-limit-s``) and the run stops by itself; all traffic stays on 127.0.0.1. Overruns are
timing-sensitive: T threads and the service share the machine's cores. Benchmarks are not
tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _reliability import exit_on_sigterm, pct, split_by_confidence, test_images  # noqa: E402

from router_tools.netsim import (Behaviour, FaultServer, NetworkProfile, NetworkProxy, close,  # noqa: E402
                                 closed_port, garbage, infer_ok, slow, status)


# ----------------------------------------------------------------------------- extra faults
# Two answers FaultServer has no factory for, written as FaultServer behaviours (its public
# extension point) rather than a second server.

class SlowBody(Behaviour):
    """Status line and headers at once, then a valid 10-class v2 body trickled over ``seconds``."""

    def __init__(self, seconds: float, steps: int = 20) -> None:
        self.seconds, self.steps = seconds, steps

    async def respond(self, ctx) -> bool:
        try:
            batch = int(json.loads(ctx.request.body)["inputs"][0]["shape"][0])
        except (ValueError, KeyError, IndexError, TypeError):
            batch = 1
        body = json.dumps({"model_name": ctx.model or "model", "model_version": "slow-body", "outputs": [
            {"name": "probabilities", "shape": [batch, 10], "datatype": "FP32",
             "data": ([0.91] + [0.01] * 9) * batch}]}).encode()
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        ctx.writer.write(head)
        await ctx.writer.drain()
        step = max(1, math.ceil(len(body) / self.steps))
        for i in range(0, len(body), step):
            await asyncio.sleep(self.seconds / self.steps)
            ctx.writer.write(body[i:i + step])
            await ctx.writer.drain()  # raises once the client gave up: the server drops the connection
        return False

    def describe(self) -> str:
        return f"slow body over {self.seconds:g}s"


class EveryNth(Behaviour):
    """Every ``n``-th request gets ``fault``; the others the route's default (the real service)."""

    def __init__(self, n: int, fault: Behaviour) -> None:
        self.n, self.fault, self.calls = n, fault, 0  # calls: only touched on the server's loop

    async def respond(self, ctx) -> bool:
        self.calls += 1
        return await (self.fault if self.calls % self.n == 0 else ctx.fallback).respond(ctx)

    def describe(self) -> str:
        return f"every {self.n}th: {self.fault.describe()}"


# ----------------------------------------------------------------------------- the cases

Hook = Callable[[int, int], None]  # (request index, total) -> None, called before the request


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    target: Callable[[str], "contextlib.AbstractContextManager[tuple[str, Optional[Hook]]]"]


@contextlib.contextmanager
def _direct(service_url: str):
    yield service_url, None


def _proxied(profile: NetworkProfile, mode: str = "normal"):
    @contextlib.contextmanager
    def target(service_url: str):
        with NetworkProxy(service_url, profile, seed=1) as proxy:
            if mode != "normal":
                proxy.set_mode(mode)
            yield proxy.url_for("http"), None
    return target


def _faulty(behaviour: Behaviour):
    @contextlib.contextmanager
    def target(service_url: str):
        with FaultServer(upstream=service_url, infer=behaviour) as fs:
            yield fs.url, None
    return target


@contextlib.contextmanager
def _refused(service_url: str):
    with closed_port() as (host, port):
        yield f"http://{host}:{port}", None


@contextlib.contextmanager
def _outage_mid_run(service_url: str):
    """Healthy, then refused for the middle third of the requests, then healthy again."""
    with NetworkProxy(service_url, "loopback", seed=1) as proxy:
        lock = threading.Lock()

        def hook(i: int, n: int) -> None:
            if i in (n // 3, 2 * n // 3):
                with lock:
                    proxy.set_mode("refuse" if i == n // 3 else "normal")
        yield proxy.url_for("http"), hook


def _retry_after(code: int) -> Behaviour:
    return status(code, {"error": f"injected {code}"}, headers={"Retry-After": "1"})


CASES: list[Case] = [
    Case("healthy", "the real service, direct", _direct),
    Case("latency 40ms", "proxy: RTT 40 ms +-1 ms (wan40)", _proxied(NetworkProfile("wan40", rtt_ms=40, jitter_ms=2))),
    Case("latency 200ms", "proxy: RTT 200 ms, more than the deadline", _proxied(NetworkProfile("rtt200", rtt_ms=200))),
    Case("jitter", "proxy: RTT 60 ms +-60 ms", _proxied(NetworkProfile("jitter", rtt_ms=60, jitter_ms=120))),
    Case("loss 5%", "proxy: RTT 10 ms, 5 % segment loss (200 ms RTO)",
         _proxied(NetworkProfile("loss5", rtt_ms=10, loss=0.05))),
    Case("resets 20%", "proxy: 20 % of requests reset (RST)", _proxied(NetworkProfile("resets", reset_probability=0.2))),
    Case("reset all", "proxy: every connection reset", _proxied(NetworkProfile("reset"), "reset")),
    Case("blackhole", "proxy: accepts, never answers", _proxied(NetworkProfile("blackhole"), "blackhole")),
    Case("slow link", "proxy: 2 kB/s each way", _proxied(NetworkProfile("2kBps", bandwidth_bytes_per_s=2000))),
    Case("refused", "nothing listens (service down)", _refused),
    Case("outage mid-run", "proxy refuses during the middle third, then recovers", _outage_mid_run),
    Case("stall 1s", "server: answers after 1 s", _faulty(slow(1.0))),
    Case("slow body", "server: headers now, body trickled over 1 s", _faulty(SlowBody(1.0))),
    Case("close", "server: closes without answering", _faulty(close())),
    Case("500", "server: HTTP 500", _faulty(status(500))),
    Case("503 retry-after", "server: HTTP 503, Retry-After: 1", _faulty(_retry_after(503))),
    Case("503 every 2nd", "server: every 2nd request 503 (no Retry-After), else real",
         _faulty(EveryNth(2, status(503)))),
    Case("429", "server: HTTP 429, Retry-After: 1", _faulty(_retry_after(429))),
    Case("malformed json", "server: 200 with cut-off JSON", _faulty(garbage("invalid_json"))),
    Case("truncated body", "server: 200, Content-Length promises more, then close", _faulty(garbage("truncated"))),
    Case("html 200", "server: 200 with an HTML page", _faulty(garbage("html"))),
    Case("empty 200", "server: 200 with no body", _faulty(garbage("empty"))),
    Case("wrong schema", "server: 200, JSON that is not a v2 response", _faulty(garbage("wrong_schema"))),
    Case("wrong shape", "server: shape [1,10] with 3 values", _faulty(garbage("wrong_shape"))),
    Case("wrong class count", "server: well-formed answer over 12 classes",
         _faulty(infer_ok([0.01] * 11 + [0.89]))),
    Case("not a distribution", "server: 10 values, negative and > 1", _faulty(infer_ok([2.0, -1.0] + [0.0] * 8))),
    Case("nan", "server: 10 NaN probabilities", _faulty(infer_ok([float("nan")] * 10))),
]


# ----------------------------------------------------------------------------- one run

@dataclass
class Result:
    case: str
    breaker: str
    requested: int
    sent: int = 0
    answered: int = 0
    crashes: int = 0
    cloud: int = 0
    fallback: int = 0
    bad: int = 0
    late: int = 0
    p50_ms: float = math.nan
    p99_over_ms: float = math.nan
    max_over_ms: float = math.nan
    max_wall_over_ms: float = math.nan
    seconds: float = 0.0
    hung_threads: int = 0
    load: float = math.nan  # 1-minute load average at the end of the case (other work on the machine)
    breaker_opened: int = 0
    by_source_reason: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)
    crash_types: dict = field(default_factory=dict)
    failure_examples: dict = field(default_factory=dict)


def _policy(url: str, deadline_ms: float, breaker: str) -> dict:
    cloud: dict = {"endpoints": [{"name": "bench", "url": url}]}
    if breaker == "off":
        # Never opens: a consecutive-failure count and a rate window that cannot be reached.
        cloud["breaker"] = {"failure_threshold": 10**9, "min_calls": 10**9}
    return {"decision_log": False, "default_deadline_ms": deadline_ms, "cloud": cloud}


def _is_bad(p, n_labels: int) -> bool:
    """Not a probability distribution over the model's classes (what the app would act on)."""
    probs = p.probabilities
    if len(probs) != n_labels or not 0 <= p.class_index < n_labels:
        return True
    if not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in probs):
        return True
    return abs(sum(probs) - 1.0) > 1e-3


def run_case(case: Case, service_url: str, images, edge_model, *, n: int, threads: int, deadline_ms: float,
             breaker: str, limit_s: float) -> Result:
    from router import Router, RoutingPolicy

    res = Result(case.name, breaker, n)
    lock = threading.Lock()
    counter = itertools.count()
    totals: list[float] = []
    walls: list[float] = []
    by: Counter = Counter()
    failures: Counter = Counter()
    crashes: Counter = Counter()
    examples: dict[str, str] = {}
    with case.target(service_url) as (url, hook):
        router = Router(RoutingPolicy.model_validate(_policy(url, deadline_ms, breaker)), edge_model=edge_model)
        # What a started app has done: read the model metadata (never raises; a fault may fail it,
        # then the first escalations read it themselves, inside their deadlines).
        router.connect(timeout_s=2.0)
        n_labels = len(edge_model.labels)
        t_start = time.monotonic()
        stop_at = t_start + limit_s

        def worker() -> None:
            while time.monotonic() < stop_at:
                i = next(counter)
                if i >= n:
                    return
                if hook is not None:
                    hook(i, n)
                img = images[i % len(images)]
                t0 = time.perf_counter()
                try:
                    p = router.predict(img, deadline_ms=deadline_ms)
                except Exception as exc:  # noqa: BLE001 -- what escapes predict() is the measurement
                    wall = (time.perf_counter() - t0) * 1000.0
                    with lock:
                        res.sent += 1
                        res.crashes += 1
                        crashes[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                        walls.append(wall)
                    continue
                wall = (time.perf_counter() - t0) * 1000.0
                failure = getattr(p, "cloud_failure", None)  # newer routers name why an escalation failed
                with lock:
                    res.sent += 1
                    res.answered += 1
                    res.cloud += p.source == "cloud"
                    res.fallback += bool(p.fallback)
                    res.bad += _is_bad(p, n_labels)
                    by[f"{p.source}/{p.reason.value}"] += 1
                    if failure is not None:
                        category = getattr(failure, "category", None) or str(failure)
                        failures[category] += 1
                        examples.setdefault(category, str(getattr(failure, "message", ""))[:100])
                    totals.append(p.timings.total_ms)
                    walls.append(wall)

        pool = [threading.Thread(target=worker, name=f"fault-{k}", daemon=True) for k in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(max(0.0, stop_at + 10.0 - time.monotonic()))  # a predict() stuck past its deadline
        res.hung_threads = sum(t.is_alive() for t in pool)
        res.seconds = time.monotonic() - t_start
        res.load = os.getloadavg()[0]
        try:
            stats = router.stats()
            res.breaker_opened = sum(e.get("breaker_opened", 0) for e in stats.get("endpoints", {}).values())
            if not failures and stats.get("cloud_failures"):  # routers whose answers do not carry the category
                failures.update(stats["cloud_failures"])
        except Exception:  # noqa: BLE001 -- stats are a bonus, not the measurement
            pass
        router.close()
    if totals:
        over = [t - deadline_ms for t in totals]
        res.p50_ms = pct(totals, 0.5)
        res.p99_over_ms = pct(over, 0.99)
        res.max_over_ms = max(over)
        res.late = sum(o > 0 for o in over)
    if walls:
        res.max_wall_over_ms = max(walls) - deadline_ms
    res.by_source_reason = dict(by.most_common())
    res.failures = dict(failures.most_common())
    res.failure_examples = examples
    res.crash_types = dict(crashes.most_common(5))
    return res


# ----------------------------------------------------------------------------- report

HEADER = (f"{'case':20s} {'sent':>5s} {'answered':>9s} {'crashes':>7s} {'cloud':>6s} {'fallbk':>6s} {'bad':>4s} "
          f"{'late':>4s} {'p50 ms':>7s} {'p99 over':>8s} {'max over':>8s} {'wall over':>9s} {'s':>5s} {'load':>5s}")


def _row(r: Result) -> str:
    def share(k: int) -> str:
        return f"{100.0 * k / r.sent:5.1f}%" if r.sent else "    -"
    return (f"{r.case:20s} {r.sent:5d} {share(r.answered):>9s} {r.crashes:7d} {share(r.cloud):>6s} "
            f"{share(r.fallback):>6s} {r.bad:4d} {r.late:4d} {r.p50_ms:7.1f} {r.p99_over_ms:+8.1f} {r.max_over_ms:+8.1f} "
            f"{r.max_wall_over_ms:+9.1f} {r.seconds:5.1f} {r.load:5.1f}")


def _detail(r: Result) -> str:
    parts = [", ".join(f"{k} {v}" for k, v in r.by_source_reason.items()) or "no answers"]
    if r.failures:
        parts.append("failures: " + ", ".join(f"{k} {v}" for k, v in r.failures.items()))
    if r.breaker_opened:
        parts.append(f"breaker opened {r.breaker_opened}x")
    if r.crash_types:
        parts.append("CRASHES: " + "; ".join(f"{k} x{v}" for k, v in r.crash_types.items()))
    if r.hung_threads:
        parts.append(f"HUNG threads: {r.hung_threads}")
    if r.sent < r.requested:
        parts.append(f"stopped at the case limit after {r.sent} of {r.requested}")
    return "    " + "; ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per case")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="200 requests x 4 threads per case")
    ap.add_argument("--deadline-ms", type=float, default=150.0)
    ap.add_argument("--breaker", choices=("policy", "off", "both"), default="both",
                    help="shipped circuit breaker, disabled (every request meets the fault), or both")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all); --list shows them")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--case-limit-s", type=float, default=120.0, help="stop sending after this long per case")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    if args.list:
        for c in CASES:
            print(f"{c.name:20s} {c.what}")
        return 0
    if args.quick:
        args.requests, args.threads = 200, 4
    chosen = CASES
    if args.cases:
        wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
        chosen = [c for c in CASES if c.name in wanted]
        unknown = set(wanted) - {c.name for c in chosen}
        if unknown:
            ap.error(f"unknown case(s): {', '.join(sorted(unknown))} (see --list)")

    from cloud_service.launch import LocalService
    from router import Router, RoutingPolicy

    probe = Router(RoutingPolicy.model_validate({"decision_log": False}))
    edge = probe.edge_model
    _, unsure = split_by_confidence(probe, test_images(), 0, 256)
    probe.close()
    variants = ["policy", "off"] if args.breaker == "both" else [args.breaker]
    print(f"{args.requests} escalating requests x {args.threads} threads per case, deadline {args.deadline_ms:g} ms; "
          f"edge {edge.name} {edge.version}; {len(unsure)} distinct unsure test images; {os.cpu_count()} CPUs "
          "shared with the service (timing-sensitive)")
    results: list[Result] = []
    exit_on_sigterm()
    with LocalService() as svc:
        # Once per process, unmeasured: lazy imports and the first-call costs of the HTTP stack, so
        # the first case does not pay them inside its deadlines.
        with Router(RoutingPolicy.model_validate(_policy(svc.url, 1000.0, "off")), edge_model=edge) as warm:
            warm.connect(timeout_s=5.0)
            for img in unsure[:50]:
                warm.predict(img)
        for breaker in variants:
            title = ("shipped policy (circuit breaker on)" if breaker == "policy"
                     else "circuit breaker disabled: every request meets the fault")
            print(f"\n== {title}\n{HEADER}")
            for case in chosen:
                r = run_case(case, svc.url, unsure, edge, n=args.requests, threads=args.threads,
                             deadline_ms=args.deadline_ms, breaker=breaker, limit_s=args.case_limit_s)
                results.append(r)
                print(_row(r))
                print(_detail(r), flush=True)
    total = sum(r.sent for r in results)
    crashes = sum(r.crashes for r in results)
    answered = sum(r.answered for r in results)
    worst = max((r for r in results if not math.isnan(r.max_over_ms)), key=lambda r: r.max_over_ms, default=None)
    print(f"\n{len(results)} runs, {total} requests: {answered} answered ({100.0 * answered / max(total, 1):.2f} %), "
          f"{crashes} crashes, {sum(r.bad for r in results)} bad answers"
          + (f"; worst overrun {worst.max_over_ms:+.1f} ms ({worst.case}, breaker {worst.breaker})" if worst else ""))
    print("columns: answered/cloud/fallbk = share of requests sent; bad = answers that are not a distribution over "
          "the classes; late = answers after the deadline; p50 ms = router total_ms; p99/max over = total_ms - deadline (negative: inside it); "
          "wall over = the caller's own clock - deadline; load = 1-min load average at the end of the case "
          f"({os.cpu_count()} CPUs)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"requests": args.requests, "threads": args.threads, "deadline_ms": args.deadline_ms,
                       "results": [asdict(r) for r in results]}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
