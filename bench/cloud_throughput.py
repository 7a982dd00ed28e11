"""Cloud serving throughput: our service (batching on / off) vs a naive FastAPI handler vs Triton,
next to the raw ONNX Runtime ceiling -- all measured in one run, with ratios.

    .venv/bin/python bench/cloud_throughput.py                    # full run (~2-3 min)
    .venv/bin/python bench/cloud_throughput.py --quick            # smoke run (seconds per target)
    .venv/bin/python bench/cloud_throughput.py --json out.json --rounds 3

Targets, each serving the shipped cloud model (``cloud_service/artifacts/cloud-fp32.json``)
on a loopback port, each fed the same single-image v2 request (``UINT8 [1, 1, 28, 28]`` JSON,
``outputs: [probabilities]``; ``--datatype FP32`` sends normalised floats instead):

* ``(a)`` our service, dynamic batching on (``config/cloud.yaml`` or ``--config``), one uvicorn worker;
* ``(b)`` the same service with ``batching.enabled: false`` (every request runs alone, off the loop);
* ``(c)`` the naive pattern: a minimal FastAPI handler that parses the JSON body with a pydantic
  model and calls ``session.run`` once per request (defined below; same uvicorn, same threads);
* ``(d)`` Triton Inference Server from ``nvidia-pytriton`` (``cloud_service.triton``), same model,
  same batching limits -- skipped with a note when that module or pytriton is unavailable.

All use one ONNX Runtime intra-op thread (``--threads``). The ceiling is ``session.run`` alone on
that many threads, at batch 1 and at ``max_batch_size``, in this process with nothing else running.

Load generator: ``wrk`` (C, epoll; Debian package ``wrk``) with a Lua script that POSTs the
body, 1 thread and ``--connections`` (default 32) keep-alive connections, i.e. 32 concurrent
clients each sending one request at a time. It is cheap enough not to be the bottleneck on 2
cores; its own CPU use is measured (``getrusage`` of the child) and printed next to the server's
(``/proc`` of every process of the target), so the reader can check. Each measurement is
preceded by a warm-up, and with ``--rounds N`` targets run interleaved in a fresh random order
each round (all servers stay up; idle ones use no CPU) and medians are reported.

Benchmarks are not tests: nothing here asserts a speed. The issue's goals are printed next to
the measured ratios: (a) >= 2x (c), (a) >= (d), (a) >= 50 % of the raw ceiling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from pydantic import BaseModel  # noqa: E402

MANIFEST = REPO / "cloud_service" / "artifacts" / "cloud-fp32.json"
MODEL = "fashion-mnist"
INFER_PATH = f"/v2/models/{MODEL}/infer"
CLK_TCK = os.sysconf("SC_CLK_TCK")

LUA = r"""
-- POST the request body from $BENCH_BODY on every request; print machine-readable totals.
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass
class Measurement:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: dict
    loadgen_cores: float  # CPU seconds of wrk / wall seconds
    server_cores: float  # CPU seconds of the target's processes / wall seconds


@dataclass
class TargetResult:
    key: str
    label: str
    rounds: list[Measurement] = field(default_factory=list)
    note: str = ""
    server_stats: dict = field(default_factory=dict)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(m, attr) for m in self.rounds) if self.rounds else float("nan")


@dataclass
class Target:
    key: str
    label: str
    url: str  # base URL
    pids: Callable[[], list[int]]  # the processes doing the serving (CPU accounting)
    stats: Callable[[], dict] = lambda: {}


# ----------------------------------------------------------------------------- the naive pattern (c)

class NaiveTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list


class NaiveRequest(BaseModel):  # module level: FastAPI must resolve the annotation to read the JSON body
    id: Optional[str] = None
    inputs: list[NaiveTensor]
    outputs: Optional[list[dict]] = None


def naive_app(manifest: Path):
    """What a first FastAPI model server usually looks like: one ``session.run`` per request."""
    import onnxruntime as ort
    from fastapi import FastAPI

    from edge_model.manifest import Manifest

    m = Manifest.load(manifest)
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(os.environ.get("BENCH_THREADS", "1"))
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(manifest.parent / m.file), sess_options=so, providers=["CPUExecutionProvider"])
    mean, std, inv_t = m.input.mean, m.input.std, 1.0 / m.temperature

    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready():
        return {"ready": True}

    @app.post(INFER_PATH)
    def infer(req: NaiveRequest):  # a sync handler: FastAPI runs it in its thread pool
        t = req.inputs[0]
        x = np.asarray(t.data, dtype=np.float32).reshape(t.shape)
        if t.datatype == "UINT8":
            x = (x / 255.0 - mean) / std
        x = x.reshape(-1, 1, 28, 28).astype(np.float32)
        logits = session.run(None, {m.input.name: x})[0]
        z = np.exp((logits - logits.max(axis=1, keepdims=True)) * inv_t)
        probs = z / z.sum(axis=1, keepdims=True)
        return {"model_name": MODEL, "id": req.id, "outputs": [
            {"name": "probabilities", "shape": list(probs.shape), "datatype": "FP32", "data": probs.ravel().tolist()}]}

    return app


def serve_naive(fd: int, manifest: Path) -> int:
    import uvicorn

    config = uvicorn.Config(naive_app(manifest), fd=fd, log_level="warning", access_log=False)
    uvicorn.Server(config).run()
    return 0


@contextlib.contextmanager
def naive_target(manifest: Path, threads: int) -> Iterator[Target]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    env = {**os.environ, "BENCH_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, __file__, "--serve-naive", str(sock.fileno()), "--manifest", str(manifest)],
                            pass_fds=(sock.fileno(),), env=env, stdin=subprocess.DEVNULL)
    sock.close()
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc)
        yield Target("c", "(c) naive FastAPI + session.run", url, lambda: [proc.pid])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during start-up")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s")


# ----------------------------------------------------------------------------- our service (a), (b)

@contextlib.contextmanager
def service_target(key: str, label: str, config: Optional[Path], overrides: dict) -> Iterator[Target]:
    from cloud_service.launch import LocalService

    svc = LocalService(config, overrides={"server.log_level": "warning", **overrides})
    with svc:
        yield Target(key, label, svc.url, lambda: [svc.pid] if svc.pid else [], lambda: _batch_stats(svc.url))


def _batch_stats(url: str) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    values = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("hybrid_cloud_inference_count_total", "hybrid_cloud_execution_count_total",
                          "hybrid_cloud_rejected_requests_total", "hybrid_cloud_expired_requests_total"):
                values[s.name] = values.get(s.name, 0.0) + s.value
    rows = values.get("hybrid_cloud_inference_count_total", 0.0)
    execs = values.get("hybrid_cloud_execution_count_total", 0.0)
    return {"images": int(rows), "executions": int(execs), "avg_batch": round(rows / execs, 2) if execs else None,
            "rejected": int(values.get("hybrid_cloud_rejected_requests_total", 0))}


# ----------------------------------------------------------------------------- Triton (d)

@contextlib.contextmanager
def triton_target(datatype: str, max_batch: int, delay_ms: float, threads: int, instances: int) -> Iterator[Target]:
    """Triton via ``cloud_service.triton`` (another module); raises ImportError/RuntimeError if unavailable."""
    from cloud_service.triton import TritonModelServer

    with TritonModelServer(input_datatype=datatype, max_batch_size=max_batch,
                           max_queue_delay_us=int(delay_ms * 1000), intra_op_threads=threads, instances=instances,
                           startup_timeout_s=120) as srv:
        # tritonserver and its python-backend stub are our descendants; the model itself runs in this process.
        yield Target("d", "(d) Triton (nvidia-pytriton)", srv.url,
                     lambda: [os.getpid(), *_descendants(os.getpid())], lambda: _triton_stats(srv.metrics_url))


def _triton_stats(metrics_url: str) -> dict:
    import httpx

    text = httpx.get(metrics_url, timeout=10, trust_env=False).text
    values = {}
    for line in text.splitlines():
        for name in ("nv_inference_count", "nv_inference_exec_count"):
            if line.startswith(name + "{"):
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    rows, execs = values.get("nv_inference_count", 0.0), values.get("nv_inference_exec_count", 0.0)
    return {"images": int(rows), "executions": int(execs), "avg_batch": round(rows / execs, 2) if execs else None}


# ----------------------------------------------------------------------------- measurement

def request_body(datatype: str, n_images: int = 1) -> tuple[bytes, np.ndarray]:
    """The single-image v2 request every target gets, and the reference probabilities for it."""
    from router_tools.datasets import load_test
    from edge_model.preprocess import normalise
    from edge_model.runtime import OnnxClassifier, SessionOptions

    clf = OnnxClassifier(MANIFEST, SessionOptions(warmup_runs=1))
    pixels = np.ascontiguousarray(load_test().images[:n_images])[:, None]
    x = normalise(pixels, clf.preprocess_config)
    data = pixels if datatype == "UINT8" else x
    body = {"inputs": [{"name": "input", "shape": list(data.shape), "datatype": datatype, "data": data.ravel().tolist()}],
            "outputs": [{"name": "probabilities"}]}
    return json.dumps(body, separators=(",", ":")).encode(), clf.predict_proba(x)


def check_answer(target: Target, body: bytes, reference: np.ndarray) -> str:
    """'' if the target answers this body correctly, else what is wrong."""
    import httpx

    r = httpx.post(target.url + INFER_PATH, content=body, headers={"Content-Type": "application/json"},
                   timeout=30, trust_env=False)
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    out = next((o for o in r.json()["outputs"] if o["name"] == "probabilities"), None)
    if out is None:
        return "no probabilities output"
    probs = np.asarray(out["data"], np.float32).reshape(reference.shape)
    if not np.allclose(probs, reference, atol=1e-4):
        return f"probabilities differ from OnnxClassifier by {np.abs(probs - reference).max():.2e}"
    return ""


def _process_cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime of all threads
    return total / CLK_TCK


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def run_wrk(url: str, lua: Path, body: Path, connections: int, duration: float) -> tuple[Measurement, float]:
    cmd = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{max(1, round(duration))}s", "--timeout", "10s",
           "-s", str(lua), url + INFER_PATH]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_BODY": str(body)}, timeout=duration + 60)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    n, dur_us, e_conn, e_read, e_write, e_status, e_timeout, p50, p99, pmax = (int(v) for v in line.split()[1:])
    dur = dur_us / 1e6
    loadgen = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / wall
    errors = {k: v for k, v in (("connect", e_conn), ("read", e_read), ("write", e_write), ("status", e_status),
                                ("timeout", e_timeout)) if v}
    ok = n - e_status
    return Measurement(n, round(dur, 3), round(ok / dur, 1), p50 / 1000, p99 / 1000, pmax / 1000, errors,
                       round(loadgen, 3), 0.0), dur


def measure(target: Target, lua: Path, body: Path, connections: int, duration: float, warmup: float) -> Measurement:
    if warmup > 0:
        run_wrk(target.url, lua, body, connections, warmup)
    pids = target.pids()
    cpu0 = _process_cpu(pids)
    m, dur = run_wrk(target.url, lua, body, connections, duration)
    m.server_cores = round((_process_cpu(pids) - cpu0) / dur, 3)
    return m


def raw_ceiling(threads: int, instances: int, batch_sizes: tuple[int, ...], seconds: float) -> dict[int, float]:
    """Images/s of ``session.run`` alone -- same model, same ``threads`` per call, ``instances``
    concurrent callers on one shared session (as the service runs it) -- per batch size."""
    import threading

    from router_tools.datasets import load_test
    from edge_model.runtime import OnnxClassifier, SessionOptions

    clf = OnnxClassifier(MANIFEST, SessionOptions(intra_op_threads=threads, warmup_runs=5))
    run, outs, name = clf.session.run, [clf.manifest.output_name], clf.input_name
    images = clf.preprocess_batch(list(load_test().images[:max(batch_sizes)]))
    result = {}
    for b in batch_sizes:
        x = np.ascontiguousarray(images[:b])
        for _ in range(20):
            run(outs, {name: x})
        counts = [0] * instances
        stop = threading.Event()

        def loop(i: int) -> None:
            while not stop.is_set():
                run(outs, {name: x})
                counts[i] += 1

        workers = [threading.Thread(target=loop, args=(i,)) for i in range(instances)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        time.sleep(seconds)
        stop.set()
        for w in workers:
            w.join()
        result[b] = round(sum(counts) * b / (time.perf_counter() - t0), 1)
    return result


# ----------------------------------------------------------------------------- report

def print_report(results: list[TargetResult], ceiling: dict[int, float], args) -> dict:
    by = {r.key: r for r in results}
    print()
    print(f"{'target':38} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>8} {'server cores':>13} {'wrk cores':>10}  batching")
    for r in results:
        if not r.rounds:
            print(f"{r.label:38} {'skipped':>9}  {r.note}")
            continue
        errs = sum(sum(m.errors.values()) for m in r.rounds)
        stats = r.server_stats
        batch = f"avg batch {stats['avg_batch']}" if stats.get("avg_batch") else ""
        print(f"{r.label:38} {r.median('rps'):9.0f} {r.median('p50_ms'):8.2f} {r.median('p99_ms'):8.2f} {errs:8d} "
              f"{r.median('server_cores'):13.2f} {r.median('loadgen_cores'):10.2f}  {batch}")
        if r.note:
            print(f"{'':38} note: {r.note}")
    print()
    print(f"raw ONNX Runtime ceiling (session.run alone, {args.threads} intra-op thread(s) x {args.instances} "
          "concurrent caller(s), as in (a)): "
          + ", ".join(f"batch {b}: {v:.0f} images/s" for b, v in ceiling.items()))
    best = max(ceiling.values())

    def ratio(a: str, b: str) -> Optional[float]:
        if a in by and b in by and by[a].rounds and by[b].rounds:
            return by[a].median("rps") / by[b].median("rps")
        return None

    ratios = {
        "a_over_b": ratio("a", "b"),
        "a_over_c": ratio("a", "c"),
        "a_over_d": ratio("a", "d"),
        "a_over_ceiling": by["a"].median("rps") / best if "a" in by and by["a"].rounds else None,
    }
    goals = {"a_over_c": ("(a) / (c)", 2.0), "a_over_d": ("(a) / (d)", 1.0), "a_over_ceiling": ("(a) / raw ceiling", 0.5),
             "a_over_b": ("(a) / (b)", None)}
    print("ratios:")
    for key, (label, goal) in goals.items():
        value = ratios[key]
        shown = "n/a" if value is None else f"{value:.2f}"
        verdict = "" if goal is None or value is None else ("  goal >= %.1f: %s" % (goal, "met" if value >= goal else "NOT met"))
        print(f"  {label:22} {shown:>6}{verdict}")
    print()
    print(f"load generator: wrk (1 thread, {args.connections} connections, keep-alive, Lua POST body); "
          f"{args.duration:.0f} s per measurement after {args.warmup:.0f} s warm-up, {args.rounds} round(s), medians")
    return ratios


# ----------------------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=32, help="concurrent clients (wrk connections)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up before each measurement")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime intra-op threads of every target (default: runtime.intra_op_threads of --config)")
    parser.add_argument("--instances", type=int, default=None,
                        help="concurrent executions of (a), (b), (d) and the ceiling (default: runtime.instances of --config)")
    parser.add_argument("--datatype", choices=("UINT8", "FP32"), default="UINT8")
    parser.add_argument("--config", type=Path, default=REPO / "config" / "cloud.yaml", help="settings of (a) and (b)")
    parser.add_argument("--targets", default="abcd", help="subset of a, b, c, d")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s measurements, 1 s warm-up")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--serve-naive", type=int, default=None, metavar="FD", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, default=MANIFEST, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_naive is not None:
        return serve_naive(args.serve_naive, args.manifest)
    if args.quick:
        args.duration, args.warmup = 2.0, 1.0
    if shutil.which("wrk") is None:
        print("bench/cloud_throughput.py needs wrk (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2

    from cloud_service.settings import load_settings

    settings = load_settings(args.config, env={})
    max_batch, delay_ms = settings.batching.max_batch_size, settings.batching.max_queue_delay_ms
    args.threads = args.threads or settings.runtime.intra_op_threads
    args.instances = instances = args.instances or settings.runtime.instances
    threads_override = {"runtime.intra_op_threads": args.threads, "runtime.instances": instances}
    print(f"cloud throughput bench: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}; model {MANIFEST.name}; request: 1 image {args.datatype} JSON; "
          f"batching max {max_batch} rows / {delay_ms} ms; ONNX Runtime {args.threads} thread(s) x {instances} instance(s)")
    if subprocess.run(["pgrep", "-f", "router_tools.train"], capture_output=True).returncode == 0:
        print("WARNING: model training is running on this machine; numbers will be depressed and noisy")
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"WARNING: load average {load_before:.2f} before the run: the machine is not idle; "
              "compare the 'server cores' column with the CPU count")

    # The ceiling first, while nothing else runs (and a broken artifact fails the run at once).
    ceiling = raw_ceiling(args.threads, instances, (1, max_batch), seconds=min(3.0, args.duration))
    work = Path(tempfile.mkdtemp(prefix="cloud-bench-"))
    body_bytes, reference = request_body(args.datatype)
    body = work / "body.json"
    body.write_bytes(body_bytes)
    lua = work / "post.lua"
    lua.write_text(LUA)

    results: dict[str, TargetResult] = {}
    with contextlib.ExitStack() as stack:
        targets: list[Target] = []
        factories = {
            "a": lambda: service_target("a", "(a) our service, batching on", args.config, threads_override),
            "b": lambda: service_target("b", "(b) our service, batching off", args.config,
                                        {**threads_override, "batching.enabled": False}),
            "c": lambda: naive_target(MANIFEST, args.threads),
            "d": lambda: triton_target(args.datatype, max_batch, delay_ms, args.threads, instances),
        }
        labels = {"a": "(a) our service, batching on", "b": "(b) our service, batching off",
                  "c": "(c) naive FastAPI + session.run", "d": "(d) Triton (nvidia-pytriton)"}
        for key in "abcd":
            if key not in args.targets:
                continue
            results[key] = TargetResult(key, labels[key])
            try:
                target = stack.enter_context(factories[key]())
            except Exception as exc:  # (d) depends on another module and a bundled binary: report, go on
                note = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                print(f"{labels[key]}: {note}", flush=True)
                results[key].note = note
                continue
            wrong = check_answer(target, body_bytes, reference)
            if wrong:
                results[key].note = f"WRONG ANSWER, not measured: {wrong}"
                print(f"{labels[key]}: {results[key].note}", flush=True)
                continue
            targets.append(target)
        for rnd in range(args.rounds):
            order = targets[:]
            random.shuffle(order)
            for target in order:
                print(f"round {rnd + 1}/{args.rounds}: {target.label} ...", flush=True)
                results[target.key].rounds.append(measure(target, lua, body, args.connections, args.duration, args.warmup))
        for target in targets:
            results[target.key].server_stats = target.stats()
    shutil.rmtree(work, ignore_errors=True)

    ordered = [results[k] for k in "abcd" if k in results]
    ratios = print_report(ordered, ceiling, args)
    print(f"load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (includes this run's own load)")
    if args.json:
        args.json.write_text(json.dumps({
            "settings": {"connections": args.connections, "duration_s": args.duration, "rounds": args.rounds,
                         "threads": args.threads, "instances": instances, "datatype": args.datatype, "max_batch_size": max_batch,
                         "max_queue_delay_ms": delay_ms, "load_generator": "wrk -t1"},
            "targets": {r.key: {"label": r.label, "note": r.note, "server_stats": r.server_stats,
                                "rounds": [asdict(m) for m in r.rounds]} for r in ordered},
            "ceiling_images_per_s": ceiling,
            "ratios": ratios,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
