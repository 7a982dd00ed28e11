"""How far past its deadline does ``predict()`` answer when the cloud never does?

A loopback server that accepts connections and never answers (the worst case for a deadline:
nothing fails, nothing returns). Every request escalates (threshold 1.0) and must fall back to
the edge's answer by its deadline. Overrun = time from the call to its answer minus the deadline
(negative: early). Each *first wave* runs in a fresh interpreter -- 8 sync ``predict`` threads
and 8 ``apredict`` tasks fired together at a new router -- because one-off costs (imports,
thread and loop start-up, client set-up) land there. The *steady state* is later waves in the
same process. The breaker is disabled so that every wave really waits on the network.

    .venv/bin/python bench/deadlines.py [--processes 10] [--waves 20] [--deadline-ms 50] [--json out.json]

Worker mode (used by tests/test_router_deadlines.py): ``--worker URL`` runs one process's waves
against URL and prints one JSON line ``{"first": {"sync": [...], "async": [...]}, "steady": {...}}``
of overruns in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent


class SilentServer:
    """A real loopback listener that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)  # keep it open, say nothing

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()

    def __enter__(self) -> "SilentServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def worker(url: str, n_sync: int, n_async: int, deadline_ms: float, waves: int) -> dict:
    from router import Router
    from router.policy import parse_policy
    from router_tools.datasets import load_test

    images = list(load_test().images[: n_sync + n_async])
    policy = parse_policy({
        "confidence_threshold": 1.0, "decision_log": False, "reload_check_interval_s": 0,
        "cloud": {"endpoints": [{"url": url}], "retry": {"max_attempts": 1},
                  "breaker": {"failure_threshold": 1_000_000, "min_calls": 1_000_000}},
    })
    router = Router(policy)
    deadline_s = deadline_ms / 1000.0

    def wave() -> dict:
        sync_over: list[float] = [0.0] * n_sync
        async_over: list[float] = [0.0] * n_async
        reasons: set[str] = set()
        barrier = threading.Barrier(n_sync + 1)

        def one(i: int) -> None:
            barrier.wait()
            t0 = time.monotonic()
            p = router.predict(images[i], deadline_ms=deadline_ms)
            sync_over[i] = (time.monotonic() - t0 - deadline_s) * 1000.0
            reasons.add(p.reason.value)

        async def aone(i: int) -> None:
            t0 = time.monotonic()
            p = await router.apredict(images[n_sync + i], deadline_ms=deadline_ms)
            async_over[i] = (time.monotonic() - t0 - deadline_s) * 1000.0
            reasons.add(p.reason.value)

        async def fire() -> None:
            barrier.wait()
            await asyncio.gather(*(aone(i) for i in range(n_async)))

        # Scheduler noise, measured alongside: how late a 1 ms sleep in another thread wakes.
        stop, noise = threading.Event(), [0.0]

        def control() -> None:
            while not stop.is_set():
                t = time.monotonic()
                time.sleep(0.001)
                noise[0] = max(noise[0], (time.monotonic() - t - 0.001) * 1000.0)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n_sync)]
        ctl = threading.Thread(target=control, daemon=True)
        ctl.start()
        for t in threads:
            t.start()
        asyncio.run(fire())
        for t in threads:
            t.join()
        stop.set()
        ctl.join()
        return {"sync": sync_over, "async": async_over, "reasons": sorted(reasons), "noise_ms": noise[0]}

    first = wave()
    steady = {"sync": [], "async": [], "reasons": set(), "noise_ms": 0.0}
    for _ in range(waves - 1):
        w = wave()
        steady["sync"] += w["sync"]
        steady["async"] += w["async"]
        steady["reasons"] |= set(w["reasons"])
        steady["noise_ms"] = max(steady["noise_ms"], w["noise_ms"])
    steady["reasons"] = sorted(steady["reasons"])
    router.close()
    return {"first": first, "steady": steady}


def run_worker(url: str, n_sync: int = 8, n_async: int = 8, deadline_ms: float = 50.0, waves: int = 1,
               timeout: float = 120.0, source: str | None = None) -> dict:
    """One fresh interpreter's waves (the first one is what a new process sees); ``source``: a
    folder holding another version of the packages to measure instead (e.g. a baseline)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", url, "--sync", str(n_sync),
           "--async", str(n_async), "--deadline-ms", str(deadline_ms), "--waves", str(waves)]
    env = dict(os.environ)
    if source:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
    out = subprocess.run(cmd, cwd=source or ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"deadline worker failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _dist(values: list[float]) -> dict:
    v = sorted(values)
    p99 = v[min(len(v) - 1, int(round(0.99 * (len(v) - 1))))]
    return {"n": len(v), "max_ms": round(v[-1], 3), "p99_ms": round(p99, 3), "median_ms": round(statistics.median(v), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--sync", type=int, default=8)
    ap.add_argument("--async", dest="n_async", type=int, default=8)
    ap.add_argument("--deadline-ms", type=float, default=50.0)
    ap.add_argument("--processes", type=int, default=10, help="fresh processes, one first wave each")
    ap.add_argument("--waves", type=int, default=20, help="waves per process (the first is the first wave)")
    ap.add_argument("--baseline", metavar="DIR", help="also measure the packages in DIR (e.g. `git archive REV | "
                    "tar -x -C DIR`), process by process interleaved with this tree's")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.sync, args.n_async, args.deadline_ms, args.waves)))
        return 0

    variants = {"this tree": None, **({"baseline": args.baseline} if args.baseline else {})}
    data = {v: {"first_wave": {"sync": [], "async": []}, "steady": {"sync": [], "async": []}} for v in variants}
    noise: list[float] = []
    reasons: set[str] = set()
    with SilentServer() as server:
        for _ in range(args.processes):
            for name, source in variants.items():  # interleaved: machine noise hits both alike
                r = run_worker(server.url, args.sync, args.n_async, args.deadline_ms, args.waves, source=source)
                for side in ("sync", "async"):
                    data[name]["first_wave"][side] += r["first"][side]
                    data[name]["steady"][side] += r["steady"][side]
                reasons |= set(r["first"]["reasons"]) | set(r["steady"]["reasons"])
                noise += [r["first"]["noise_ms"], r["steady"]["noise_ms"]]
    result = {
        "scheduler_noise_ms": _dist(noise),
        "deadline_ms": args.deadline_ms, "processes": args.processes, "waves": args.waves, "reasons": sorted(reasons),
        "variants": {name: {phase: {s: _dist(v) for s, v in sides.items() if v} for phase, sides in d.items()}
                     for name, d in data.items()},
    }
    print(f"overrun past a {args.deadline_ms:g} ms deadline against a silent server "
          f"({args.processes} fresh processes x {args.waves} waves of {args.sync} sync + {args.n_async} async; "
          f"answers: {', '.join(sorted(reasons))}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus)")
    for name, phases in result["variants"].items():
        for phase, sides in phases.items():
            for side, d in sides.items():
                print(f"  {name:10s} {phase:10s} {side:5s}  n={d['n']:5d}  max {d['max_ms']:+8.3f} ms  "
                      f"p99 {d['p99_ms']:+8.3f} ms  median {d['median_ms']:+8.3f} ms")
    n = result["scheduler_noise_ms"]
    print(f"  scheduler noise (a 1 ms sleep's lateness, worst per wave set): max {n['max_ms']:.3f} ms  "
          f"median {n['median_ms']:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
