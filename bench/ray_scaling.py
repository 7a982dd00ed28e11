"""Ray Serve scaling: throughput of the cloud service with 1 vs 2 replicas, side by side in one run.

    .venv/bin/python bench/ray_scaling.py                 # full run (~2 min after Ray is up)
    .venv/bin/python bench/ray_scaling.py --quick         # smoke run
    .venv/bin/python bench/ray_scaling.py --rounds 3 --json out.json

One private local Ray (``num_cpus=2``, loopback only, via ``cloud_service.ray_serve.LocalRayServe``)
serves the same app as ``hybrid-router serve --engine ray``; between measurements the deployment
is re-applied with 1 or 2 replicas (in place, same HTTP proxy and port). With ``--rounds N`` the
replica counts alternate (1, 2, 2, 1, ...) and medians are reported. For reference the same app
also runs without Ray (``python -m cloud_service``, one uvicorn process: the "local" engine).

Two request shapes, both v2 JSON ``UINT8``: ``light`` = 1 image per request (HTTP-bound: the
Serve proxy and JSON handling dominate), ``heavy`` = ``--heavy-images`` images per request
(compute-bound: ONNX Runtime dominates). Replicas only help where the replicas are the bottleneck.

Load generator: ``wrk`` (C, epoll; Debian package ``wrk``), 1 thread, ``--connections``
keep-alive connections, Lua POST body. Its CPU use (``getrusage`` of the child) is printed, and
so is the CPU of the Serve proxy and of the replicas (``/proc``), so the reader sees where the
two cores went. Benchmarks are not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

MODEL = "fashion-mnist"
INFER_PATH = f"/v2/models/{MODEL}/infer"
CLK_TCK = os.sysconf("SC_CLK_TCK")

LUA = r"""
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Row:
    target: str  # "local", "ray x1", "ray x2"
    shape: str  # "light" / "heavy"
    images_per_request: int
    req_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    wrk_cores: float
    proxy_cores: float
    replica_cores: float
    other_cores: float


# ----------------------------------------------------------------------------- load

def request_body(n_images: int) -> bytes:
    from router_tools.datasets import load_test

    pixels = load_test().images[:n_images][:, None]  # uint8 [n, 1, 28, 28]
    body = {"inputs": [{"name": "input", "shape": list(pixels.shape), "datatype": "UINT8",
                        "data": pixels.ravel().tolist()}], "outputs": [{"name": "probabilities"}]}
    return json.dumps(body, separators=(",", ":")).encode()


def run_wrk(url: str, lua: Path, body: Path, connections: int, seconds: float) -> tuple[dict, float]:
    cmd = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(lua), url + INFER_PATH]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_BODY": str(body)},
                          timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    n, dur_us, e_conn, e_read, e_write, e_status, e_timeout, p50, p99 = (int(v) for v in line.split()[1:])
    wall = dur_us / 1e6
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stats = {"requests": n, "seconds": wall, "errors": e_conn + e_read + e_write + e_status + e_timeout,
             "p50_ms": p50 / 1000, "p99_ms": p99 / 1000}
    return stats, cpu / wall if wall else 0.0


# ----------------------------------------------------------------------------- CPU by role

def _cpu_by_role(root: int) -> dict[str, float]:
    """CPU seconds so far of ``root``'s descendants, grouped: proxy, replica, other."""
    from cloud_service.ray_serve import _descendants

    out = {"proxy": 0.0, "replica": 0.0, "other": 0.0}
    for pid, _ in _descendants(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
        role = "proxy" if "ProxyActor" in comm else "replica" if "ServeRepli" in comm else "other"
        out[role] += seconds
    return out


def measure(target: str, url: str, shape: str, n_images: int, lua: Path, body: Path, args) -> Row:
    run_wrk(url, lua, body, args.connections, args.warmup)  # warm-up (connections, batcher, caches)
    cpu0 = _cpu_by_role(os.getpid())
    stats, wrk_cores = run_wrk(url, lua, body, args.connections, args.seconds)
    cpu1 = _cpu_by_role(os.getpid())
    wall = stats["seconds"]
    cores = {k: max(0.0, cpu1[k] - cpu0[k]) / wall for k in cpu0}
    rps = stats["requests"] / wall
    return Row(target, shape, n_images, rps, rps * n_images, stats["p50_ms"], stats["p99_ms"], stats["errors"],
               wrk_cores, cores["proxy"], cores["replica"], cores["other"])


def check_answer(url: str, body: bytes) -> None:
    r = httpx.post(url + INFER_PATH, content=body, headers={"content-type": "application/json"}, timeout=30)
    r.raise_for_status()
    probs = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32)
    if not np.isfinite(probs).all():
        raise RuntimeError(f"{url}: non-finite probabilities")


# ----------------------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "config" / "cloud.yaml")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--heavy-images", type=int, default=32)
    parser.add_argument("--num-cpus-per-replica", type=float, default=None, help="default: ray.num_cpus of the config")
    parser.add_argument("--no-local", action="store_true", help="skip the reference run without Ray")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s measurements, 1 s warm-up")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup = 2.0, 1.0
    if shutil.which("wrk") is None:
        print("wrk not found (Debian: apt-get install wrk)", file=sys.stderr)
        return 2

    from ray import serve

    from cloud_service.launch import LocalService
    from cloud_service.ray_serve import APP_NAME, LocalRayServe, build_application
    from cloud_service.settings import apply_overrides, load_settings

    settings = load_settings(args.config)
    settings = apply_overrides(settings, {"server.port": ("bench", 0), "server.host": ("bench", "127.0.0.1"),
                                          "ray.num_cpus": ("--num-cpus-per-replica", args.num_cpus_per_replica)})
    shapes = [("light", 1), ("heavy", args.heavy_images)]
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    lua = work / "post.lua"
    lua.write_text(LUA)
    bodies = {}
    for shape, n in shapes:
        bodies[shape] = work / f"{shape}.json"
        bodies[shape].write_bytes(request_body(n))

    rows: list[Row] = []
    try:
        if not args.no_local:
            svc = LocalService(args.config, log_path=work / "local-service.log")
            try:
                svc.start()
                for shape, n in shapes:
                    check_answer(svc.url, bodies[shape].read_bytes())
                    rows.append(measure("local (uvicorn, no Ray)", svc.url, shape, n, lua, bodies[shape], args))
                    _print_row(rows[-1])
            finally:
                svc.stop()

        t0 = time.monotonic()
        with LocalRayServe(settings, num_cpus=2, timeout_s=240) as srv:
            print(f"Ray Serve up in {srv.startup_s:.1f} s at {srv.url} "
                  f"({settings.ray.num_cpus} CPU per replica, max_ongoing_requests {settings.ray.max_ongoing_requests})")
            order = []
            for r in range(args.rounds):
                order += [1, 2] if r % 2 == 0 else [2, 1]
            current = settings.ray.replicas
            for replicas in order:
                if replicas != current:
                    s = apply_overrides(settings, {"ray.replicas": ("bench", replicas)})
                    started = time.monotonic()
                    serve.run(build_application(s), name=APP_NAME, route_prefix="/")
                    print(f"  re-deployed with {replicas} replica(s) in {time.monotonic() - started:.1f} s")
                    current = replicas
                for shape, n in shapes:
                    check_answer(srv.url, bodies[shape].read_bytes())
                    rows.append(measure(f"ray x{replicas}", srv.url, shape, n, lua, bodies[shape], args))
                    _print_row(rows[-1])
        print(f"(Ray start + measurements + shutdown: {time.monotonic() - t0:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = _report(rows, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _print_row(row: Row) -> None:
    print(f"  {row.target:24} {row.shape:5} {row.req_per_s:9.0f} req/s {row.images_per_s:9.0f} img/s "
          f"p50 {row.p50_ms:7.1f} ms p99 {row.p99_ms:7.1f} ms err {row.errors}", flush=True)


def _median_rows(rows: list[Row]) -> dict[tuple[str, str], Row]:
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.target, row.shape), []).append(row)
    out = {}
    for key, group in groups.items():
        med = {f: statistics.median(getattr(r, f) for r in group)
               for f in ("req_per_s", "images_per_s", "p50_ms", "p99_ms", "wrk_cores", "proxy_cores",
                         "replica_cores", "other_cores")}
        out[key] = Row(key[0], key[1], group[0].images_per_request, errors=sum(r.errors for r in group), **med)
    return out


def _report(rows: list[Row], args) -> dict:
    med = _median_rows(rows)
    print()
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}; wrk 1 thread, {args.connections} connections, "
          f"{args.seconds:.0f} s per measurement, {args.rounds} round(s) (medians)")
    print(f"{'target':24} {'shape':>6} {'req/s':>8} {'img/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'err':>4} "
          f"{'wrk':>5} {'proxy':>6} {'replicas':>8} {'other':>6}  (cores)")
    for (target, shape), r in med.items():
        print(f"{target:24} {shape:>6} {r.req_per_s:8.0f} {r.images_per_s:8.0f} {r.p50_ms:7.1f} {r.p99_ms:7.1f} "
              f"{r.errors:4d} {r.wrk_cores:5.2f} {r.proxy_cores:6.2f} {r.replica_cores:8.2f} {r.other_cores:6.2f}")
    ratios = {}
    for shape in ("light", "heavy"):
        one, two = med.get(("ray x1", shape)), med.get(("ray x2", shape))
        if one and two and one.req_per_s:
            ratios[shape] = two.req_per_s / one.req_per_s
            print(f"scaling ratio 2 replicas / 1 replica ({shape}): {ratios[shape]:.2f}x")
        local = med.get(("local (uvicorn, no Ray)", shape))
        if local and one and local.req_per_s:
            print(f"ray x1 / local engine ({shape}): {one.req_per_s / local.req_per_s:.2f}x  (cost of the Serve proxy hop)")
    print("note: 2 cores are shared by wrk, the Serve proxy, the replicas and Ray's own processes; "
          "a 2x ratio would need the replicas to be the only bottleneck and a free core each.")
    return {"rows": [asdict(r) for r in rows], "medians": [asdict(r) for r in med.values()], "ratios": ratios,
            "connections": args.connections, "seconds": args.seconds, "rounds": args.rounds}


if __name__ == "__main__":
    sys.exit(main())
