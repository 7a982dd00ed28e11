"""Overload behaviour of the cloud service's dynamic batcher (issue #10 item 4, issue #13), in one run.

    .venv/bin/python bench/overload.py                     # both parts (~4 min)
    .venv/bin/python bench/overload.py --part overload     # 64 and 256 connections, 100 ms budgets
    .venv/bin/python bench/overload.py --part dispatch     # 1/4/16 connections, new vs previous dispatch
    .venv/bin/python bench/overload.py --quick             # short windows, 10 s settle (smoke run)
    .venv/bin/python bench/overload.py --part overload --peer   # and the RSS a bare FastAPI app keeps

Both parts start the real service (:class:`cloud_service.launch.LocalService`, ``config/cloud.yaml``:
one uvicorn worker, two execution instances) and send the same single-image v2 request
(``UINT8 [1, 1, 28, 28]`` JSON, ``outputs: [probabilities]``) from N keep-alive connections, each
sending its next request as soon as the previous answer arrived (closed loop).

``overload``: N = 64 and 256, every request with ``parameters.timeout`` = 100 ms. Per level:
requests answered 200 within the budget as seen by the client, per second (goodput); the share
of 503 and 504 answers; the share of computed rows that were wasted (``wasted_rows`` over
``inference_count`` from ``/metrics``); the server's RSS at rest before the load (``--rest`` s
after a warm-up), right after it, at +5/10/20/30/60 s and after ``--settle`` seconds (default 60). A connection answered 503 waits the ``Retry-After``
the server sent (times a uniform 0.5-1.5 jitter, as independent devices would spread out) before
its next request, as the router's retry policy does (``--ignore-retry-after`` hammers instead). Goals printed next to the figures: goodput at 256
>= 80 % of the 200/s at 64, <= 5 % of computed rows wasted, RSS back to baseline (within 1 MiB)
within 60 s.

``--peer`` then runs the same warm-up, rest, flood and settle against ``bench/_echo_peer.py``, a
bare FastAPI app on uvicorn answering the same request with no model (released with
``malloc_trim`` at the end, as the service releases itself when idle), and prints the RSS each
kept: what any app on CPython + uvicorn + FastAPI keeps after 256 connections at once.

``dispatch``: N = 1, 4, 16 without budgets against two services started side by side, one with
``batching.dispatch_when_idle: true`` (new: a batch starts at once when an instance is idle), one
with ``false`` (previous: wait ``max_queue_delay_ms`` for company); interleaved rounds, medians,
ratios new / previous.

The load generator is a minimal HTTP/1.1 keep-alive client on asyncio streams, written by hand
(no httpx here) because the client shares the 2 cores with the server: at 256 connections a
general-purpose client costs several times more CPU per request and would throttle the server
it measures. Its CPU time and the server's are printed so the reader can check. wrk is not used:
its Lua hooks cannot honour Retry-After per connection nor time each answer against a budget.

Benchmarks are not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from cloud_service.launch import LocalService  # noqa: E402

MODEL = "fashion-mnist"
PATH = f"/v2/models/{MODEL}/infer"
CONFIG = REPO / "config" / "cloud.yaml"
CLK_TCK = os.sysconf("SC_CLK_TCK")
JITTER = 0.5  # a 503'd connection waits Retry-After x uniform(0.5, 1.5)
RSS_TOLERANCE_MIB = 1.0  # "back to baseline": within this of the RSS at rest before the load


def request_bytes(host: str, port: int, budget_ms: Optional[float]) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (1, 1, 28, 28), dtype=np.uint8)
    body: dict = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                              "data": pixels.ravel().tolist()}],
                  "outputs": [{"name": "probabilities"}]}
    if budget_ms is not None:
        body["parameters"] = {"timeout": int(budget_ms * 1000)}  # v2: microseconds
    raw = json.dumps(body, separators=(",", ":")).encode()
    head = (f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n").encode()
    return head + raw


@dataclass
class Tally:
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_ok: list[float] = field(default_factory=list)  # seconds, 200 answers
    in_budget: int = 0
    errors: int = 0
    reconnects: int = 0

    def add(self, status: int, latency: float, budget_s: Optional[float]) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.latencies_ok.append(latency)
            if budget_s is None or latency <= budget_s:
                self.in_budget += 1

    @property
    def answers(self) -> int:
        return sum(self.statuses.values())


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
    await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return status, headers


async def _connection(host: str, port: int, req: bytes, tally: Tally, window: tuple[float, float],
                      budget_s: Optional[float], honour_retry_after: bool, jitter: float) -> None:
    start, stop = window
    reader = writer = None
    slept = False  # the server closes keep-alive connections idle for 5 s: reconnecting then is no error
    try:
        while time.perf_counter() < stop:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            t0 = time.perf_counter()
            try:
                writer.write(req)
                status, headers = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                if t0 >= start and not slept:
                    tally.errors += 1
                else:
                    tally.reconnects += 1
                slept = False
                writer.close()
                writer = None
                continue
            slept = False
            t1 = time.perf_counter()
            if start <= t0 and t1 <= stop:
                tally.add(status, t1 - t0, budget_s)
            if headers.get(b"connection") == b"close":
                writer.close()
                writer = None
            if status == 503 and honour_retry_after:
                # Jittered, as independent devices would come back: an exact 1 s makes every
                # refused connection return in the same instant (a herd this closed loop invents).
                wait = float(headers.get(b"retry-after", b"1")) * random.uniform(1 - jitter, 1 + jitter)
                await asyncio.sleep(max(0.0, min(wait, stop - time.perf_counter())))
                slept = True
    finally:
        if writer is not None:
            writer.close()


async def _drive(host: str, port: int, conns: int, seconds: float, warmup: float,
                 budget_ms: Optional[float], honour_retry_after: bool) -> Tally:
    req = request_bytes(host, port, budget_ms)
    tally = Tally()
    now = time.perf_counter()
    window = (now + warmup, now + warmup + seconds)
    budget_s = None if budget_ms is None else budget_ms / 1000.0
    await asyncio.gather(*(_connection(host, port, req, tally, window, budget_s, honour_retry_after, JITTER)
                           for _ in range(conns)))
    return tally


def drive(svc: LocalService, conns: int, seconds: float, warmup: float, budget_ms: Optional[float],
          honour_retry_after: bool = True) -> tuple[Tally, float, float]:
    """Run one load level; returns the tally, client CPU seconds and server CPU seconds."""
    cpu0, srv0 = _self_cpu(), _proc_cpu(svc.pid)
    tally = asyncio.run(_drive("127.0.0.1", svc.port, conns, seconds, warmup, budget_ms, honour_retry_after))
    return tally, _self_cpu() - cpu0, _proc_cpu(svc.pid) - srv0


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(svc: LocalService) -> dict[str, float]:
    import httpx

    text = httpx.get(svc.url + "/metrics", timeout=10, trust_env=False).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name in ("hybrid_cloud_inference_count_total", "hybrid_cloud_wasted_rows_total",
                    "hybrid_cloud_expired_requests_total", "hybrid_cloud_execution_count_total"):
            out[name] = out.get(name, 0.0) + float(value)
        elif name == "hybrid_cloud_rejected_requests_total":
            key = name + ":" + name_labels.split('reason="', 1)[1].split('"', 1)[0]
            out[key] = out.get(key, 0.0) + float(value)
    return out


def _delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


def quantile_ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return 1000.0 * float(np.quantile(np.asarray(values), q))


def service(config: Path, dispatch_when_idle: bool = True, env: Optional[dict] = None) -> LocalService:
    return LocalService(config, overrides={"batching.dispatch_when_idle": dispatch_when_idle,
                                           "server.log_level": "warning"}, ready_timeout=120, env=env)


# ----------------------------------------------------------------------------- parts

def run_overload(args) -> dict:
    levels = [int(c) for c in args.levels.split(",")]
    rows = []
    with service(args.config, env=dict(kv.split("=", 1) for kv in args.service_env)) as svc:
        drive(svc, 8, 1.0, 0.5, args.budget_ms)  # warm the connection path and the service-time model
        # At rest: past the service's release of freed heap after load (keep-alive + 1 s, 6 s by default)
        time.sleep(args.rest)
        rss_before = rss_mib(svc.pid)
        for conns in levels:
            m0 = scrape(svc)
            tally, client_cpu, server_cpu = drive(svc, conns, args.seconds, args.warmup, args.budget_ms,
                                                  not args.ignore_retry_after)
            m1 = scrape(svc)
            rss_level = rss_mib(svc.pid)
            computed = _delta(m1, m0, "hybrid_cloud_inference_count_total")
            wasted = _delta(m1, m0, "hybrid_cloud_wasted_rows_total")
            n = tally.answers
            rows.append({
                "connections": conns,
                "answers_per_s": n / args.seconds,
                "ok_per_s": tally.statuses.get(200, 0) / args.seconds,
                "goodput_per_s": tally.in_budget / args.seconds,
                "share_503": pct(tally.statuses.get(503, 0), n),
                "share_504": pct(tally.statuses.get(504, 0), n),
                "other": n - sum(tally.statuses.get(s, 0) for s in (200, 503, 504)),
                "errors": tally.errors,
                "reconnects_after_retry_after": tally.reconnects,
                "rss_mib_after": rss_level,
                "p50_ms": quantile_ms(tally.latencies_ok, 0.5),
                "p99_ms": quantile_ms(tally.latencies_ok, 0.99),
                "rows_computed": computed,
                "rows_wasted": wasted,
                "wasted_pct": pct(wasted, computed),
                "shed_by_admission": _delta(m1, m0, "hybrid_cloud_rejected_requests_total:expected_wait"),
                "shed_queue_full": _delta(m1, m0, "hybrid_cloud_rejected_requests_total:queue_full"),
                "dropped_before_compute": _delta(m1, m0, "hybrid_cloud_expired_requests_total"),
                "client_cpu_s": client_cpu,
                "server_cpu_s": server_cpu,
            })
            time.sleep(1.0)
        rss_after = rss_mib(svc.pid)
        timeline, back_after = settle(svc.pid, rss_before, args.settle)
        rss_settled = rss_mib(svc.pid)
    result = {"budget_ms": args.budget_ms, "seconds": args.seconds, "honour_retry_after": not args.ignore_retry_after,
              "levels": rows, "rss_mib": {"before": rss_before, "after_load": rss_after,
                                          f"after_{args.settle:.0f}s": rss_settled},
              "rss_mib_after_flood_s": timeline, f"rss_within_{RSS_TOLERANCE_MIB:g}mib_after_s": back_after}
    if args.peer:
        result["peer"] = run_peer(args, levels)
    print_overload(result, args)
    return result


def settle(pid: int, rss_before: float, seconds: float) -> tuple[dict[float, float], Optional[float]]:
    """Watch a process's RSS for ``seconds``: the figure at +5/10/20/30/60 s, and when it first came
    back within the tolerance of ``rss_before`` (None: never)."""
    start = time.monotonic()
    back_after = None
    timeline: dict[float, float] = {}
    marks = [m for m in (5, 10, 20, 30, 60) if m < seconds] + [seconds]
    while time.monotonic() - start < seconds:
        time.sleep(1.0)
        elapsed = time.monotonic() - start
        rss = rss_mib(pid)
        if back_after is None and rss <= rss_before + RSS_TOLERANCE_MIB:
            back_after = elapsed
        while marks and elapsed >= marks[0]:
            timeline[marks.pop(0)] = rss
    return timeline, back_after


class EchoPeer:
    """``bench/_echo_peer.py`` under uvicorn (httptools, the service's keep-alive) on a free port."""

    def __init__(self, keep_alive_s: float = 5.0) -> None:
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "_echo_peer:app", "--app-dir", str(REPO / "bench"), "--host", "127.0.0.1",
             "--port", str(self.port), "--http", "httptools", "--timeout-keep-alive", f"{keep_alive_s:g}",
             "--log-level", "warning", "--no-access-log"],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdin=subprocess.DEVNULL)
        self.pid = self._proc.pid

    def __enter__(self) -> "EchoPeer":
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("the echo peer did not start (is the server extra installed?)")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except Exception:
            self._proc.kill()

    def release(self) -> None:
        import httpx

        httpx.post(self.url + "/release", timeout=10, trust_env=False)


def run_peer(args, levels: list[int]) -> dict:
    """The same warm-up, rest, flood and settle against the bare FastAPI peer; it is released
    (``malloc_trim``) at the end of its settle, as the service releases itself once idle."""
    with EchoPeer() as peer:
        drive(peer, 8, 1.0, 0.5, args.budget_ms)
        time.sleep(args.rest)
        peer.release()
        time.sleep(1.0)
        before = rss_mib(peer.pid)
        answers = {}
        for conns in levels:
            tally, _, _ = drive(peer, conns, args.seconds, args.warmup, args.budget_ms, not args.ignore_retry_after)
            answers[conns] = tally.answers / args.seconds
            time.sleep(1.0)
        after_load = rss_mib(peer.pid)
        settle(peer.pid, before, args.settle)
        peer.release()
        time.sleep(1.0)
        settled = rss_mib(peer.pid)
    return {"answers_per_s": answers, "rss_mib": {"before": before, "after_load": after_load,
                                                  f"after_{args.settle:.0f}s_released": settled}}


def print_overload(result: dict, args) -> None:
    print(f"\n== overload: {result['budget_ms']:.0f} ms budgets, {result['seconds']:.0f} s per level, "
          f"Retry-After {'honoured' if result['honour_retry_after'] else 'ignored'} ==")
    hdr = (f"{'conns':>5} {'answers/s':>9} {'200/s':>7} {'goodput/s':>9} {'503%':>6} {'504%':>6} {'err':>4} "
           f"{'p50ms':>6} {'p99ms':>6} {'rows':>7} {'wasted%':>7} {'shed':>6} {'dropped':>7} {'cpu cli/srv s':>13} {'RSS MiB':>7}")
    print(hdr)
    for r in result["levels"]:
        print(f"{r['connections']:>5} {r['answers_per_s']:>9.0f} {r['ok_per_s']:>7.0f} {r['goodput_per_s']:>9.0f} "
              f"{r['share_503']:>6.1f} {r['share_504']:>6.1f} {r['errors'] + r['other']:>4} {r['p50_ms']:>6.1f} "
              f"{r['p99_ms']:>6.1f} {r['rows_computed']:>7.0f} {r['wasted_pct']:>7.2f} {r['shed_by_admission']:>6.0f} "
              f"{r['dropped_before_compute']:>7.0f} {r['client_cpu_s']:>6.1f}/{r['server_cpu_s']:<6.1f} {r['rss_mib_after']:>7.1f}")
    by = {r["connections"]: r for r in result["levels"]}
    rss = result["rss_mib"]
    settled_key = [k for k in rss if k.startswith("after_") and k != "after_load"][0]
    print(f"RSS MiB: before {rss['before']:.1f}, after load {rss['after_load']:.1f}, "
          f"{settled_key.replace('_', ' ')} {rss[settled_key]:.1f}; "
          f"reconnects after a Retry-After wait (server closed the idle keep-alive connection): "
          f"{', '.join(str(r['reconnects_after_retry_after']) for r in result['levels'])}")
    if 64 in by and 256 in by and by[64]["ok_per_s"]:
        ratio = by[256]["goodput_per_s"] / by[64]["ok_per_s"]
        print(f"goal: goodput@256 / 200-per-s@64 = {ratio:.2f} (>= 0.80)")
    worst = max(r["wasted_pct"] for r in result["levels"])
    print(f"goal: computed rows wasted, worst level = {worst:.2f} % (<= 5 %)")
    print("RSS MiB after the flood: " + ", ".join(f"+{t:g} s {v:.1f}" for t, v in result["rss_mib_after_flood_s"].items()))
    back = result[f"rss_within_{RSS_TOLERANCE_MIB:g}mib_after_s"]
    print(f"goal: RSS back to baseline (within {RSS_TOLERANCE_MIB:g} MiB) within 60 s: "
          + (f"after {back:.0f} s" if back is not None else "NOT within the settle period")
          + f"; {settled_key.replace('_', ' ')} - before = {rss[settled_key] - rss['before']:+.1f} MiB")
    peer = result.get("peer")
    if peer:
        prss = peer["rss_mib"]
        kept = list(prss.values())[-1] - prss["before"]
        print(f"peer (bare FastAPI echo app, same flood: "
              + ", ".join(f"{a:.0f} answers/s at {c}" for c, a in peer["answers_per_s"].items())
              + f"): RSS MiB before {prss['before']:.1f}, after load {prss['after_load']:.1f}, "
              f"+{args.settle:.0f} s and malloc_trim {list(prss.values())[-1]:.1f}")
        print(f"RSS kept after the flood: service {rss[settled_key] - rss['before']:+.1f} MiB, "
              f"peer {kept:+.1f} MiB")


def run_dispatch(args) -> dict:
    levels = [int(c) for c in args.dispatch_levels.split(",")]
    samples: dict[tuple[str, int], list[dict]] = {}
    names = ("new", "previous")
    with service(args.config, True) as new, service(args.config, False) as old:
        targets = {"new": new, "previous": old}
        for svc in targets.values():
            drive(svc, 4, 1.0, 0.5, None)
        rng = np.random.default_rng(1)
        for _ in range(args.rounds):
            for conns in levels:
                for name in rng.permutation(names):
                    tally, client_cpu, server_cpu = drive(targets[name], conns, args.dispatch_seconds, args.warmup, None)
                    wall = args.dispatch_seconds + args.warmup
                    samples.setdefault((name, conns), []).append({
                        "rps": tally.statuses.get(200, 0) / args.dispatch_seconds,
                        "p50_ms": quantile_ms(tally.latencies_ok, 0.5), "p99_ms": quantile_ms(tally.latencies_ok, 0.99),
                        "client_cores": client_cpu / wall, "server_cores": server_cpu / wall})
    rows = []
    for conns in levels:
        new_s, old_s = samples[("new", conns)], samples[("previous", conns)]
        ratios = [a["rps"] / b["rps"] for a, b in zip(new_s, old_s) if b["rps"]]  # same round, back to back
        med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
        rows.append({"connections": conns, "new_rps": med(new_s, "rps"), "previous_rps": med(old_s, "rps"),
                     "rps_ratio": statistics.median(ratios), "rps_ratio_min": min(ratios), "rps_ratio_max": max(ratios),
                     "rounds_new_faster": sum(r > 1 for r in ratios), "rounds": len(ratios),
                     "new_p50_ms": med(new_s, "p50_ms"), "previous_p50_ms": med(old_s, "p50_ms"),
                     "new_p99_ms": med(new_s, "p99_ms"), "previous_p99_ms": med(old_s, "p99_ms"),
                     "client_cores": med(new_s + old_s, "client_cores"), "server_cores": med(new_s + old_s, "server_cores")})
    print(f"\n== dispatch: dispatch_when_idle true (new) vs false (previous, waits max_queue_delay), "
          f"no budgets, {args.dispatch_seconds:.0f} s x {args.rounds} interleaved rounds; medians, "
          "new/prev = median of the per-round ratios [min-max] ==")
    print(f"{'conns':>5} {'new req/s':>9} {'prev req/s':>10} {'new/prev':>20} {'new faster':>10} "
          f"{'p50 new/prev ms':>16} {'p99 new/prev ms':>16} {'cores cli/srv':>13}")
    for r in rows:
        print(f"{r['connections']:>5} {r['new_rps']:>9.0f} {r['previous_rps']:>10.0f} "
              f"{r['rps_ratio']:>6.2f}x [{r['rps_ratio_min']:.2f}-{r['rps_ratio_max']:.2f}] "
              f"{r['rounds_new_faster']:>5}/{r['rounds']:<4} {r['new_p50_ms']:>7.2f}/{r['previous_p50_ms']:<8.2f} "
              f"{r['new_p99_ms']:>7.1f}/{r['previous_p99_ms']:<8.1f} {r['client_cores']:>5.2f}/{r['server_cores']:<6.2f}")
    print("(cores: CPU seconds per wall second of this client and of the measured service; the machine has "
          f"{os.cpu_count()})")
    return {"levels": rows, "seconds": args.dispatch_seconds, "rounds": args.rounds}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("all", "overload", "dispatch"), default="all")
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the service's process only (e.g. PYTHONMALLOC=malloc)")
    p.add_argument("--levels", default="64,256", help="connections of the overload part")
    p.add_argument("--budget-ms", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=20.0, help="measured window per overload level")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each window")
    p.add_argument("--settle", type=float, default=60.0, help="seconds to watch RSS after the load")
    p.add_argument("--rest", type=float, default=8.0,
                   help="seconds at rest after the warm-up before the baseline RSS (the service releases "
                        "freed heap keep_alive_s + 1 s after load)")
    p.add_argument("--ignore-retry-after", action="store_true", help="503'd connections resend at once")
    p.add_argument("--peer", action="store_true",
                   help="also run the same flood against a bare FastAPI echo app (bench/_echo_peer.py) and print "
                        "the RSS it keeps next to the service's")
    p.add_argument("--dispatch-levels", default="1,4,16")
    p.add_argument("--dispatch-seconds", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="5 s windows, 1 round, 10 s settle")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.dispatch_seconds, args.rounds, args.settle, args.warmup = 5.0, 3.0, 1, 10.0, 1.0
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; config {args.config}")
    out = {}
    if args.part in ("all", "overload"):
        out["overload"] = run_overload(args)
    if args.part in ("all", "dispatch"):
        out["dispatch"] = run_dispatch(args)
    print(f"load average {os.getloadavg()[0]:.1f} at end (other processes on the machine skew every figure)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
