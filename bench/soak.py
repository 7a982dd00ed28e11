"""Does a long-running router stay flat? Resident memory, file descriptors and threads over a
million confident predictions and a hundred thousand escalations (issue 13: flat within 1 MB).

    .venv/bin/python bench/soak.py                                      # 1 M confident + 100 k escalations
    .venv/bin/python bench/soak.py --confident 200000 --escalations 20000
    .venv/bin/python bench/soak.py --confident 20000 --escalations 30000 --trace   # name the growth sites
    .venv/bin/python bench/soak.py --cloud stub      # escalate to a loopback stub: the client's memory alone, faster

Phases, one ``Router`` throughout: a warm-up (pools, caches, lazily imported modules, the
allocator's arenas), then the confident phase (the edge answers; no network), then the
escalation phase (images the edge is unsure about go to the cloud: the real service started
with ``LocalService``, or with ``--cloud stub`` a netsim ``FaultServer`` answering valid v2
responses at once). Gauges are read at checkpoints after a ``gc.collect()``: VmRSS from
/proc/self/status, open descriptors from /proc/self/fd, kernel and Python threads.

Per phase it prints the growth from its first to its last checkpoint and over its second half
(a cache that fills and levels off grows in the first half only; a leak grows in both).

``--trace`` runs tracemalloc (several times slower: scale the counts down): the top growth
sites between the end of the warm-up and each phase's end, and a side experiment on
``oip.protocol.InferenceResponse.model_validate_json`` -- parse responses with unique ``id``
strings and count what stays allocated, with pydantic's default string cache and with
``cache_strings=False``. Benchmarks are not tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import linecache
import math
import os
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _reliability import Gauges, exit_on_sigterm, gauges, split_by_confidence, test_images  # noqa: E402

GOAL_KB = 1024  # issue 13: memory flat within 1 MB


@dataclass(frozen=True)
class Checkpoint:
    phase: str
    done: int
    seconds: float
    g: Gauges
    traced_kb: float = float("nan")


@contextlib.contextmanager
def _cloud(kind: str):
    if kind == "real":
        from cloud_service.launch import LocalService

        with LocalService() as svc:
            yield svc.url, lambda: None
    else:
        from router_tools.netsim import FaultServer, infer_ok

        # Echoes the request id, as the real service does: the response parser sees unique strings.
        # It runs in this process and logs every request it gets: that log is dropped at each
        # checkpoint (``reset_counts``) so that only the router's memory is measured.
        with FaultServer(infer=infer_ok([0.91] + [0.01] * 9)) as fs:
            yield fs.url, fs.reset_counts


def _snapshot() -> tracemalloc.Snapshot:
    return tracemalloc.take_snapshot().filter_traces((
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
        tracemalloc.Filter(False, linecache.__file__),
    ))


def _run_phase(name: str, n: int, checkpoints: int, one, threads: int, out: list[Checkpoint],
               trace: bool, before_reading=lambda: None, stop_at: float = math.inf) -> dict:
    """Run ``one(i)`` n times (split over ``threads`` persistent threads), gauges at checkpoints;
    stops early, with a last checkpoint, once ``time.monotonic()`` passes ``stop_at``."""
    counts = {"ok": 0, "other": 0, "stopped": False}
    lock = threading.Lock()
    step = max(1, n // max(1, checkpoints))
    t0 = time.monotonic()

    def chunk(lo: int, hi: int, k: int) -> None:
        ok = other = 0
        for i in range(lo + k, hi, threads):
            if time.monotonic() >= stop_at:
                break
            if one(i):
                ok += 1
            else:
                other += 1
        with lock:
            counts["ok"] += ok
            counts["other"] += other

    def checkpoint(done: int) -> None:
        before_reading()
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] / 1024 if trace else float("nan")
        out.append(Checkpoint(name, done, time.monotonic() - t0, gauges(), traced))
        print(f"  {name} {done}/{n} after {out[-1].seconds:.0f} s: RSS {out[-1].g.rss_kb} KB", file=sys.stderr, flush=True)

    checkpoint(0)
    pool = None
    if threads > 1:
        import concurrent.futures

        pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=f"soak-{name}")
    try:
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            if pool is None:
                chunk(lo, hi, 0)
            else:
                for f in [pool.submit(chunk, lo, hi, k) for k in range(threads)]:
                    f.result()
            checkpoint(counts["ok"] + counts["other"])
            if time.monotonic() >= stop_at:
                counts["stopped"] = True
                break
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return counts


def _growth(points: list[Checkpoint]) -> dict:
    first, last, mid = points[0], points[-1], points[len(points) // 2]
    rss = [p.g.rss_kb for p in points]
    return {"rss_kb": last.g.rss_kb - first.g.rss_kb, "rss_second_half_kb": last.g.rss_kb - mid.g.rss_kb,
            "rss_range_kb": max(rss) - min(rss), "fds": last.g.fds - first.g.fds,
            "os_threads": last.g.os_threads - first.g.os_threads, "py_threads": last.g.py_threads - first.g.py_threads,
            "traced_kb": last.traced_kb - first.traced_kb}


def _top_growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int, per: int) -> list[str]:
    lines = []
    for stat in after.compare_to(before, "traceback")[:n]:
        if stat.size_diff <= 0:
            break
        frames = [f for f in stat.traceback if not f.filename.endswith(("threading.py", "concurrent/futures/thread.py"))]
        where = " <- ".join(f"{_short(f.filename)}:{f.lineno}" for f in reversed(frames[-4:]))  # innermost first
        innermost = stat.traceback[-1] if len(stat.traceback) else None
        code = linecache.getline(innermost.filename, innermost.lineno).strip() if innermost else ""
        avg = stat.size / stat.count if stat.count else 0
        lines.append(f"  {stat.size_diff / 1024:+9.1f} KB {stat.count_diff:+7d} blocks (avg {avg:.0f} B, "
                     f"{stat.count_diff / per:.3f}/request)  {where}\n      {code[:110]}")
    return lines


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/work/main/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def pydantic_cache_experiment(total: int, step: int) -> list[str]:
    """What ``InferenceResponse.model_validate_json`` keeps per unique ``id``: parse ``total``
    responses whose ids are all different (as the router's are), drop the results, and count what
    is still allocated -- with the model as shipped and with pydantic's string cache turned off."""
    from pydantic import ConfigDict

    from oip.protocol import InferenceResponse

    class NoStringCache(InferenceResponse):
        model_config = ConfigDict(**{**InferenceResponse.model_config, "cache_strings": False})

    prefix = os.urandom(4).hex()
    body = {"model_name": "fashion-mnist", "model_version": "1", "outputs": [
        {"name": "probabilities", "shape": [1, 10], "datatype": "FP32", "data": [0.91] + [0.01] * 9}]}

    def payload(i: int) -> bytes:
        return json.dumps({**body, "id": f"{prefix}-{i}"}).encode()

    rows = {}
    for label, cls in (("as shipped", InferenceResponse), ("cache_strings=False", NoStringCache)):
        payloads = [payload(i) for i in range(total)]  # built before measuring
        for p in payloads[:10]:
            cls.model_validate_json(p)  # validator set-up, outside the measurement
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        series = []
        for i, p in enumerate(payloads, 1):
            cls.model_validate_json(p)
            if i % step == 0:
                gc.collect()
                series.append((i, (tracemalloc.get_traced_memory()[0] - base) / 1024))
        rows[label] = series
        del payloads
    out = [f"  {'unique ids':>10s} " + " ".join(f"{k:>20s}" for k in rows) + "   (KB still allocated)"]
    for j, (i, _) in enumerate(rows["as shipped"]):
        out.append(f"  {i:10d} " + " ".join(f"{rows[k][j][1]:20.1f}" for k in rows))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--confident", type=int, default=1_000_000, help="confident predictions (edge only)")
    ap.add_argument("--escalations", type=int, default=100_000, help="predictions that escalate to the cloud")
    ap.add_argument("--warmup-confident", type=int, default=20_000)
    ap.add_argument("--warmup-escalations", type=int, default=2_000)
    ap.add_argument("--checkpoints", type=int, default=10, help="gauge readings per phase")
    ap.add_argument("--threads", type=int, default=1, help="caller threads for the escalation phase")
    ap.add_argument("--deadline-ms", type=float, default=1000.0,
                    help="deadline of escalations (generous: this measures memory, not latency)")
    ap.add_argument("--cloud", choices=("real", "stub"), default="real",
                    help="the real service (LocalService), or a netsim FaultServer answering at once")
    ap.add_argument("--max-minutes", type=float, default=math.inf,
                    help="time budget of the whole run: a phase still going then stops early (and says so)")
    ap.add_argument("--trace", action="store_true", help="tracemalloc: name the growth sites (slow: scale down)")
    ap.add_argument("--trace-frames", type=int, default=8)
    ap.add_argument("--top", type=int, default=8, help="growth sites to print per phase with --trace")
    ap.add_argument("--pydantic-only", type=int, metavar="N", default=0,
                    help="only the pydantic string-cache check, with N unique ids (no router, no service)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    if args.pydantic_only:
        tracemalloc.start(1)
        print("pydantic check: InferenceResponse.model_validate_json on responses with unique ids, results dropped")
        for line in pydantic_cache_experiment(args.pydantic_only, max(1, args.pydantic_only // 10)):
            print(line)
        return 0

    from router import Router, RoutingPolicy

    started = time.monotonic()
    exit_on_sigterm()
    with _cloud(args.cloud) as (url, drop_stub_log):
        router = Router(RoutingPolicy.model_validate({"decision_log": False, "cloud": {"endpoints": [
            {"name": "soak", "url": url}]}}))
        confident, unsure = split_by_confidence(router, test_images(), 512, 512)
        deadline = args.deadline_ms
        mismatched = {"confident": 0, "escalation": 0}
        stopped = {"confident": False, "escalation": False}
        stop_at = started + args.max_minutes * 60.0

        def one_confident(i: int) -> bool:
            p = router.predict(confident[i % len(confident)])
            return p.source == "edge" and p.reason.value == "confident"

        def one_escalation(i: int) -> bool:
            p = router.predict(unsure[i % len(unsure)], deadline_ms=deadline)
            return p.source == "cloud"

        print(f"cloud: {args.cloud} ({url}); {len(confident)} confident and {len(unsure)} unsure test images; "
              f"escalation threads {args.threads}; {os.cpu_count()} CPUs shared with the service and other work"
              + ("; tracemalloc ON (slow)" if args.trace else ""), flush=True)
        if args.trace:
            tracemalloc.start(args.trace_frames)
        points: list[Checkpoint] = []
        warm: list[Checkpoint] = []
        _run_phase("warm-up", args.warmup_confident, 1, one_confident, 1, warm, args.trace)
        _run_phase("warm-up", args.warmup_escalations, 1, one_escalation, args.threads, warm, args.trace,
                   drop_stub_log)
        base = _snapshot() if args.trace else None
        phases = {}
        snaps = {}
        for name, n, fn, threads in (("confident", args.confident, one_confident, 1),
                                     ("escalation", args.escalations, one_escalation, args.threads)):
            pts: list[Checkpoint] = []
            counts = _run_phase(name, n, args.checkpoints, fn, threads, pts, args.trace, drop_stub_log, stop_at)
            mismatched[name] = counts["other"]
            stopped[name] = counts["stopped"]
            phases[name] = pts
            points += pts
            if args.trace:
                snaps[name] = _snapshot()
        stats = router.stats()
        router.close()

    print(f"\n{'phase':11s} {'done':>9s} {'s':>7s} {'RSS MB':>8s} {'dRSS KB':>8s} {'fds':>4s} {'thr':>4s} {'py thr':>6s}"
          + (f" {'traced KB':>10s}" if args.trace else ""))
    ref = points[0].g.rss_kb
    for p in warm[-1:] + points:
        print(f"{p.phase:11s} {p.done:9d} {p.seconds:7.1f} {p.g.rss_kb / 1024:8.2f} {p.g.rss_kb - ref:+8d} "
              f"{p.g.fds:4d} {p.g.os_threads:4d} {p.g.py_threads:6d}"
              + (f" {p.traced_kb:10.1f}" if args.trace else ""))
    print()
    summary = {}
    for name, pts in phases.items():
        g = _growth(pts)
        summary[name] = g
        n = pts[-1].done
        rate = n / pts[-1].seconds if pts[-1].seconds else 0.0
        verdict = "within" if abs(g["rss_kb"]) <= GOAL_KB else "NOT within"
        cut = f" (of {args.confident if name == 'confident' else args.escalations}: time budget)" if stopped[name] else ""
        print(f"{name:11s} {n:9d} requests{cut} ({rate:,.1f}/s; {mismatched[name]} not answered as expected): "
              f"RSS {g['rss_kb']:+d} KB (second half {g['rss_second_half_kb']:+d} KB, range {g['rss_range_kb']} KB) "
              f"-> {verdict} 1 MB; fds {g['fds']:+d}, threads {g['os_threads']:+d} (python {g['py_threads']:+d})"
              + (f"; traced {g['traced_kb']:+.1f} KB" if args.trace else ""))
    whole = _growth(points)
    print(f"{'both':11s} RSS {whole['rss_kb']:+d} KB from the end of the warm-up to the end "
          f"-> {'within' if abs(whole['rss_kb']) <= GOAL_KB else 'NOT within'} 1 MB; "
          f"fds {whole['fds']:+d}; threads {whole['os_threads']:+d}; {time.monotonic() - started:.0f} s in all; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    counters = {k: v for k, v in stats.items() if k in ("requests", "escalation_rate", "fallbacks")}
    if counters:
        print(f"router stats: {counters}")

    if args.trace:
        prev = base
        for name in phases:
            print(f"\ntop growth sites during the {name} phase (tracemalloc, {args.trace_frames} frames; innermost first):")
            for line in _top_growth(prev, snaps[name], args.top, max(1, phases[name][-1].done)):
                print(line)
            prev = snaps[name]
        print("\npydantic check: InferenceResponse.model_validate_json on responses with unique ids, results dropped")
        for line in pydantic_cache_experiment(40_000, 4_000):
            print(line)
        tracemalloc.stop()

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "summary": summary, "whole": whole,
                       "checkpoints": [{"phase": p.phase, "done": p.done, "seconds": p.seconds, **p.g.__dict__,
                                        "traced_kb": p.traced_kb} for p in warm + points]}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
