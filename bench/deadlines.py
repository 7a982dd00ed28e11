"""How far past its deadline does ``predict()`` answer when the cloud never does?

A loopback server that accepts connections and never answers (the worst case for a deadline:
nothing fails, nothing returns). Every request escalates (threshold 1.0) and must fall back to
the edge's answer by its deadline. Overrun = time from the call to its answer minus the deadline
(negative: early). Each *first wave* runs in a fresh interpreter -- 8 sync ``predict`` threads
and 8 ``apredict`` tasks fired together at a new router -- because one-off costs (imports,
thread and loop start-up, client set-up) land there. The *steady state* is later waves in the
same process. The breaker is disabled so that every wave really waits on the network.

    .venv/bin/python bench/deadlines.py [--processes 10] [--waves 20] [--deadline-ms 50] [--json out.json]
        [--concurrent 3] [--switch-intervals 0.001,0.0002] [--gc-freeze] [--baseline DIR] [--sleepers]

Each wave also runs *control* sleepers (``--control`` threads and as many tasks on the apredict
loop) that only sleep for the deadline: their lateness is what the OS scheduler and the GIL add
to anything waking at that moment in that process, so the router's overrun can be told apart
from the machine's. ``--concurrent K`` runs K worker processes at once (K x 18 threads on the
cores: oversubscribed); ``--switch-intervals`` adds variants run under ``sys.setswitchinterval``.

CPython's full (generation 2) collections stop every thread: with the router's ~57 k tracked
objects one takes 15-40 ms on the 2-core machines here. Each worker records those that overlap a
wave, and the report says how many of the waves over 2 ms had one. ``--gc-freeze`` adds the
variant an application with tight deadlines is advised to run (README): ``gc.collect();
gc.freeze()`` once the router is built, so later full collections skip the start-up objects.

``--sleepers`` adds the peer the 2 ms goal is judged against: the same processes, router and
waves with every ``predict`` / ``apredict`` replaced by a plain ``time.sleep`` / ``asyncio.sleep``
for the deadline. How often *its* waves go over 2 ms is what this machine does to 16 callers
waking at a deadline with no network and no router work at all; the router answers a reserve
before the deadline, so it should go over less often than its peer, not more.

Worker mode (used by tests/test_router_deadlines.py): ``--worker URL`` runs one process's waves
against URL and prints one JSON line ``{"first": {"sync": [...], "async": [...], "control_sync": ...,
"noise_ms": ...}, "steady": {...}}`` of overruns in milliseconds (``noise_ms``: the control's worst).
"""

from __future__ import annotations

import argparse
import gc
import asyncio
import concurrent.futures
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


def worker(url: str, n_sync: int, n_async: int, deadline_ms: float, waves: int, n_control: int = 2,
           switch_interval: float | None = None, gc_freeze: bool = False, sleepers: bool = False) -> dict:
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
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
    if gc_freeze:  # as the README advises an application with tight deadlines, once started
        gc.collect()
        gc.freeze()
    deadline_s = deadline_ms / 1000.0
    full_gc: list[tuple[float, float]] = []  # (start, end) of each full collection from here on
    gc_started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                gc_started[0] = time.monotonic()
            else:
                full_gc.append((gc_started[0], time.monotonic()))

    gc.callbacks.append(on_gc)

    def wave() -> dict:
        sync_over: list[float] = [0.0] * n_sync
        async_over: list[float] = [0.0] * n_async
        # The control: threads and tasks of the same wave that only sleep for the deadline. Their
        # lateness is what the OS scheduler and the GIL add to *anything* waking at that moment
        # in this process; the router's overrun beyond it is the router's own.
        ctl_sync: list[float] = [0.0] * n_control
        ctl_async: list[float] = [0.0] * n_control
        reasons: set[str] = set()
        barrier = threading.Barrier(n_sync + n_control + 1)

        def one(i: int) -> None:
            barrier.wait()
            t0 = time.monotonic()
            if sleepers:  # the peer: the same callers, only sleeping for the deadline
                time.sleep(deadline_s)
            else:
                reasons.add(router.predict(images[i], deadline_ms=deadline_ms).reason.value)
            sync_over[i] = (time.monotonic() - t0 - deadline_s) * 1000.0

        def ctl(i: int) -> None:
            barrier.wait()
            t0 = time.monotonic()
            time.sleep(deadline_s)
            ctl_sync[i] = (time.monotonic() - t0 - deadline_s) * 1000.0

        async def aone(i: int) -> None:
            t0 = time.monotonic()
            if sleepers:
                await asyncio.sleep(deadline_s)
            else:
                reasons.add((await router.apredict(images[n_sync + i], deadline_ms=deadline_ms)).reason.value)
            async_over[i] = (time.monotonic() - t0 - deadline_s) * 1000.0

        async def actl(i: int) -> None:
            t0 = time.monotonic()
            await asyncio.sleep(deadline_s)
            ctl_async[i] = (time.monotonic() - t0 - deadline_s) * 1000.0

        async def fire() -> None:
            barrier.wait()
            await asyncio.gather(*(aone(i) for i in range(n_async)), *(actl(i) for i in range(n_control)))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n_sync)]
        threads += [threading.Thread(target=ctl, args=(i,)) for i in range(n_control)]
        began = time.monotonic()
        for t in threads:
            t.start()
        asyncio.run(fire())
        for t in threads:
            t.join()
        ended = time.monotonic()
        pauses = [(b - a) * 1000.0 for a, b in full_gc if b > began and a < ended]
        return {"sync": sync_over, "async": async_over, "control_sync": ctl_sync, "control_async": ctl_async,
                "reasons": sorted(reasons), "noise_ms": max(ctl_sync + ctl_async + [0.0]), "full_gc_ms": pauses}

    first = wave()
    steady = {"sync": [], "async": [], "control_sync": [], "control_async": [], "reasons": set(), "noise_ms": 0.0,
              "excess_sync": [], "excess_async": [], "full_gc_ms": [], "waves_over_2ms": 0, "over_2ms_with_full_gc": 0}
    for _ in range(waves - 1):
        w = wave()
        steady["full_gc_ms"] += w["full_gc_ms"]
        if max(w["sync"] + w["async"] + [-1e9]) > 2.0:
            steady["waves_over_2ms"] += 1
            steady["over_2ms_with_full_gc"] += bool(w["full_gc_ms"])
        for k in ("sync", "async", "control_sync", "control_async"):
            steady[k] += w[k]
        for side in ("sync", "async"):  # per wave: the router's worst minus the control's worst
            if w[side]:
                steady[f"excess_{side}"].append(max(w[side]) - max(w[f"control_{side}"] or [0.0]))
        steady["reasons"] |= set(w["reasons"])
        steady["noise_ms"] = max(steady["noise_ms"], w["noise_ms"])
    for side in ("sync", "async"):
        if first[side]:
            first[f"excess_{side}"] = [max(first[side]) - max(first[f"control_{side}"] or [0.0])]
    steady["reasons"] = sorted(steady["reasons"])
    gc.callbacks.remove(on_gc)
    router.close()
    return {"first": first, "steady": steady}


def run_worker(url: str, n_sync: int = 8, n_async: int = 8, deadline_ms: float = 50.0, waves: int = 1,
               timeout: float = 120.0, source: str | None = None, switch_interval: float | None = None,
               gc_freeze: bool = False, sleepers: bool = False) -> dict:
    """One fresh interpreter's waves (the first one is what a new process sees); ``source``: a
    folder holding another version of the packages to measure instead (e.g. a baseline)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", url, "--sync", str(n_sync),
           "--async", str(n_async), "--deadline-ms", str(deadline_ms), "--waves", str(waves)]
    if switch_interval is not None:
        cmd += ["--switch-interval", str(switch_interval)]
    if gc_freeze:
        cmd += ["--gc-freeze-worker"]
    if sleepers:
        cmd += ["--sleepers-worker"]
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
    ap.add_argument("--control", type=int, default=2, help="control sleepers per side in every wave")
    ap.add_argument("--deadline-ms", type=float, default=50.0)
    ap.add_argument("--processes", type=int, default=10, help="fresh processes per variant, one first wave each")
    ap.add_argument("--waves", type=int, default=20, help="waves per process (the first is the first wave)")
    ap.add_argument("--concurrent", type=int, default=1,
                    help="worker processes running at once (more than the cores: oversubscribed)")
    ap.add_argument("--switch-interval", type=float, default=None, help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--gc-freeze-worker", action="store_true", help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--sleepers-worker", action="store_true", help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--sleepers", action="store_true",
                    help="also measure the peer: the same waves with every predict replaced by a sleep for the deadline")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="also measure the variant that runs gc.collect(); gc.freeze() once the router is built")
    ap.add_argument("--switch-intervals", default="",
                    help="comma-separated sys.setswitchinterval values (s) to measure as variants too, e.g. 0.001")
    ap.add_argument("--baseline", metavar="DIR", help="also measure the packages in DIR (e.g. `git archive REV | "
                    "tar -x -C DIR`), process by process interleaved with this tree's")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.sync, args.n_async, args.deadline_ms, args.waves, args.control,
                                args.switch_interval, args.gc_freeze_worker, args.sleepers_worker)))
        return 0

    # name -> (source folder, switch interval, gc.freeze(), sleepers instead of predict)
    variants: dict[str, tuple[str | None, float | None, bool, bool]] = {"this tree": (None, None, False, False)}
    for si in filter(None, args.switch_intervals.split(",")):
        variants[f"this tree, switch {float(si) * 1000:g} ms"] = (None, float(si), False, False)
    if args.gc_freeze:
        variants["this tree, gc.freeze()"] = (None, None, True, False)
    if args.baseline:
        variants["baseline"] = (args.baseline, None, False, False)
    if args.sleepers:
        variants["peer: plain sleepers"] = (None, None, False, True)
    keys = ("sync", "async", "control_sync", "control_async", "excess_sync", "excess_async")
    data = {v: {"first_wave": {k: [] for k in keys}, "steady": {k: [] for k in keys}} for v in variants}
    gcs = {v: {"steady_waves": 0, "full_gc_ms": [], "waves_over_2ms": 0, "over_2ms_with_full_gc": 0} for v in variants}
    reasons: set[str] = set()
    load = [os.getloadavg()[0]]
    with SilentServer() as server, concurrent.futures.ThreadPoolExecutor(args.concurrent) as pool:
        for _ in range(args.processes):
            for name, (source, si, freeze, sleep) in variants.items():  # interleaved: machine noise hits them alike
                runs = [pool.submit(run_worker, server.url, args.sync, args.n_async, args.deadline_ms, args.waves,
                                    source=source, switch_interval=si, gc_freeze=freeze, sleepers=sleep)
                        for _ in range(args.concurrent)]
                for fut in runs:
                    r = fut.result()
                    for phase, src in (("first_wave", r["first"]), ("steady", r["steady"])):
                        for k in keys:
                            data[name][phase][k] += src.get(k, [])
                    reasons |= set(r["first"]["reasons"]) | set(r["steady"]["reasons"])
                    g = gcs[name]
                    g["steady_waves"] += args.waves - 1
                    g["full_gc_ms"] += r["steady"]["full_gc_ms"]
                    g["waves_over_2ms"] += r["steady"]["waves_over_2ms"]
                    g["over_2ms_with_full_gc"] += r["steady"]["over_2ms_with_full_gc"]
                load.append(os.getloadavg()[0])
    result = {
        "deadline_ms": args.deadline_ms, "processes": args.processes, "waves": args.waves,
        "concurrent": args.concurrent, "reasons": sorted(reasons),
        "load_average": {"min": min(load), "max": max(load)},
        "variants": {name: {phase: {k: _dist(v) for k, v in sides.items() if v} for phase, sides in d.items()}
                     for name, d in data.items()},
        "full_collections": {name: {**{k: v for k, v in g.items() if k != "full_gc_ms"},
                                    "full_gc": len(g["full_gc_ms"]),
                                    "max_pause_ms": round(max(g["full_gc_ms"], default=0.0), 1)}
                             for name, g in gcs.items()},
    }
    print(f"overrun past a {args.deadline_ms:g} ms deadline against a silent server ({args.processes} fresh "
          f"processes x {args.waves} waves of {args.sync} sync + {args.n_async} async + {args.control} control "
          f"sleepers per side; {args.concurrent} process(es) at once on {os.cpu_count()} cpus; answers: "
          f"{', '.join(sorted(reasons))}; load average {min(load):.1f}..{max(load):.1f})")
    print("  control = a thread / task of the same wave that only sleeps for the deadline (what the OS and the GIL")
    print("  add to anything waking then); excess = per wave, the router's worst overrun minus the control's worst")
    print(f"  {'variant':28s} {'phase':10s} {'side':5s} {'router max / p99 / median':>28s} "
          f"{'control max / p99 / median':>28s} {'excess max / median':>21s}")
    for name, phases in result["variants"].items():
        for phase, sides in phases.items():
            for side in ("sync", "async"):
                if side not in sides:
                    continue
                d, c, e = sides[side], sides.get(f"control_{side}"), sides.get(f"excess_{side}")
                fmt = lambda x: f"{x['max_ms']:+7.2f} / {x['p99_ms']:+7.2f} / {x['median_ms']:+7.2f}" if x else "-"
                ex = f"{e['max_ms']:+7.2f} / {e['median_ms']:+7.2f}" if e else "-"
                print(f"  {name:28s} {phase:10s} {side:5s} {fmt(d):>28s} {fmt(c):>28s} {ex:>21s}")
    print("  steady waves: how many went over 2 ms (router's worst), and CPython's full collections during waves")
    for name, g in result["full_collections"].items():
        print(f"  {name:28s} {g['waves_over_2ms']} of {g['steady_waves']} waves over 2 ms, {g['over_2ms_with_full_gc']} "
              f"of them during a full collection; {g['full_gc']} full collections during waves, longest "
              f"{g['max_pause_ms']:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
