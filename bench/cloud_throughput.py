"""Cloud serving throughput: our service against KServe, Triton (pytriton), a naive FastAPI handler
and the ONNX batch ceiling, at several concurrency levels, side by side in one run, with ratios.

    .venv/bin/python bench/cloud_throughput.py                     # scaling table: a, d, k, w at 1/4/16/64 (~12 min)
    .venv/bin/python bench/cloud_throughput.py --targets abcdkw --rounds 5 --json out.json
    .venv/bin/python bench/cloud_throughput.py --connections 32 --targets abcd   # issue 3's single-level table
    .venv/bin/python bench/cloud_throughput.py --quick             # smoke run (1 round, 2 s per measurement)

Targets, each serving the shipped cloud model (``cloud_service/artifacts/cloud-fp32.json``) on a
loopback port with one ONNX Runtime intra-op thread per execution, each fed the same single-image
v2 request (``UINT8 [1, 1, 28, 28]`` JSON, ``outputs: [probabilities]``; ``--datatype FP32``
sends normalised floats instead):

* ``(a)`` our service, dynamic batching on (``config/cloud.yaml`` or ``--config``), one uvicorn worker;
* ``(b)`` the same service with ``batching.enabled: false`` (every request runs alone, off the loop);
* ``(o)`` the same service with ``runtime.solo_threads: 0`` (a batch that runs alone uses one thread
  like the others; what the solo session buys at each level);
* ``(c)`` the naive pattern: a minimal FastAPI handler that parses the JSON body with a pydantic
  model and calls ``session.run`` once per request (defined below; same uvicorn, same threads);
* ``(d)`` Triton Inference Server from ``nvidia-pytriton`` (``cloud_service.triton``), same model,
  same batching limits and instances -- skipped with a note when pytriton is unavailable;
* ``(k)``/``(w)`` KServe's ``ModelServer`` with 1 / 2 uvicorn workers running ``bench/kserve_model.py``
  (a ~50-line custom ``kserve.Model``: same ONNX file, one thread, same normalisation and softmax).
  KServe lives in its own environment, ``bench/.venvs/kserve``, which this script creates on
  first use (``python -m venv`` + ``pip install kserve onnxruntime numpy``; reused afterwards;
  never a dependency of the project). It gets the same request bytes: KServe's v2 endpoint takes
  UINT8 JSON as our service does. Differences: KServe ignores ``outputs`` (the model returns only
  ``probabilities``), adds a generated ``id``, does not batch (its batcher is a separate agent),
  and runs a synchronous ``predict`` on its event loop, as its custom-model examples do. Request
  logging (access, latency and timing lines) is off for it, as it is in our service.

The ceiling is ``session.run`` alone on that many threads x instances, at batch 1 and at
``max_batch_size``, in this process with nothing else running; it is re-measured before every round.

Load generator: ``wrk`` (C, epoll; Debian package ``wrk``) with a Lua script that POSTs the
body, 1 thread and N keep-alive connections, i.e. N concurrent clients each sending one request
at a time. Its CPU use (``getrusage`` of the child) is printed next to the server's (``/proc`` of
every process of the target): on 2 cores it competes with the server. Each measurement is preceded
by a warm-up. Every round visits each level and, per level, the targets in a fresh random order;
all servers stay up (idle ones use no CPU). Ratios are computed per round and level -- so drift of
the machine's load hits both sides of a ratio alike -- and reported as the median [min-max] over
rounds. Requests per CPU second (server + wrk) are printed too: on a shared machine they move much
less than requests per second.

Benchmarks are not tests: nothing here asserts a speed. The goals of issue 13 are printed next to
the measured ratios: (a) >= 1.5x (k) at every level, (a) >= 2x (d), (a) >= 0.8 of the batch ceiling
at the highest level; and issue 3's (a) >= 2x (c).
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
    connections: int = 0
    round: int = 0
    note: str = ""

    @property
    def per_cpu_s(self) -> float:
        """Requests per CPU second of the server and wrk: what the goals would be on an idle machine."""
        cpu = self.server_cores + self.loadgen_cores
        return self.rps / cpu if cpu > 0 else float("nan")


@dataclass
class TargetResult:
    key: str
    label: str
    rounds: list[Measurement] = field(default_factory=list)
    note: str = ""
    server_stats: dict = field(default_factory=dict)

    def level(self, connections: int) -> list[Measurement]:
        return [m for m in self.rounds if m.connections == connections]

    def at(self, connections: int, rnd: int) -> Optional[Measurement]:
        return next((m for m in self.rounds if m.connections == connections and m.round == rnd), None)


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
        yield Target("c", LABELS["c"], url, lambda: [proc.pid])
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

    before = set(_descendants(os.getpid()))
    with TritonModelServer(input_datatype=datatype, max_batch_size=max_batch,
                           max_queue_delay_us=int(delay_ms * 1000), intra_op_threads=threads, instances=instances,
                           startup_timeout_s=120) as srv:
        # tritonserver and its python-backend stub are the children this start spawned (not the other
        # targets', nor wrk); the model itself runs in this process.
        own = sorted(set(_descendants(os.getpid())) - before)
        yield Target("d", LABELS["d"], srv.url, lambda: [os.getpid(), *own], lambda: _triton_stats(srv.metrics_url))


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


# ----------------------------------------------------------------------------- KServe (k, w)

KSERVE_VENV = REPO / "bench" / ".venvs" / "kserve"
KSERVE_MODEL = REPO / "bench" / "kserve_model.py"
KSERVE_PACKAGES = ("kserve", "onnxruntime", "numpy")
# Request logging off (access log, KServe's per-request latency and timing lines), as in our service.
KSERVE_LOG_CONFIG = {
    "version": 1, "disable_existing_loggers": False,
    "handlers": {"err": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}},
    "loggers": {name: {"level": "WARNING", "handlers": ["err"], "propagate": False}
                for name in ("kserve", "kserve.trace", "uvicorn", "uvicorn.error", "uvicorn.access")},
}


def kserve_python(venv: Path = KSERVE_VENV) -> Path:
    """The interpreter of KServe's own environment, created on first use (never a dependency of ours).

    ``python -m venv`` + ``pip install kserve onnxruntime numpy`` from the configured package index;
    an existing environment is reused as it is (delete the folder to upgrade).
    """
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import kserve, onnxruntime, numpy"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    (venv.parent / ".gitignore").write_text("*\n")  # environments are not part of the checkout
    print(f"creating KServe's environment in {venv} (pip install {' '.join(KSERVE_PACKAGES)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", *KSERVE_PACKAGES], capture_output=True, text=True)
    if pip.returncode != 0 or subprocess.run(probe, capture_output=True).returncode != 0:
        tail = (pip.stderr or pip.stdout).strip().splitlines()[-1:] or ["import failed"]
        raise RuntimeError(f"could not install {' '.join(KSERVE_PACKAGES)} into {venv}: {tail[0]}")
    return python


@contextlib.contextmanager
def kserve_target(key: str, manifest: Path, workers: int, work: Path) -> Iterator[Target]:
    """KServe's ModelServer (``workers`` uvicorn processes) running ``bench/kserve_model.py``."""
    from cloud_service.launch import free_port

    from edge_model.manifest import Manifest

    python = kserve_python()
    m = Manifest.load(manifest)
    log_config = work / "kserve-logging.json"
    log_config.write_text(json.dumps(KSERVE_LOG_CONFIG))
    port = free_port()
    log_file = open(work / f"kserve-{key}.log", "wb")
    cmd = [str(python), str(KSERVE_MODEL), "--onnx", str(manifest.parent / m.file), "--mean", str(m.input.mean),
           "--std", str(m.input.std), "--temperature", str(m.temperature), "--model_name", MODEL,
           "--http_port", str(port), "--workers", str(workers), "--log_config_file", str(log_config)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc, timeout=120)
        yield Target(key, LABELS[key], url, lambda: [proc.pid, *_descendants(proc.pid)])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the spawned workers too
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.close()


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


def _process_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system, all threads) of each live process in ``pids``."""
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


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
    cpu1 = _process_cpu(pids)
    m.server_cores = round(sum(cpu1[p] - cpu0[p] for p in cpu0 if p in cpu1) / dur, 3)
    if set(target.pids()) != set(pids):  # e.g. KServe replaced a worker its supervisor found unresponsive
        m.note = "server processes changed during the measurement"
    return m


def raw_ceiling(threads: int, instances: int, batch_sizes: tuple[int, ...],
                seconds: float) -> tuple[dict[int, float], dict[int, float]]:
    """Images/s of ``session.run`` alone -- same model, same ``threads`` per call, ``instances``
    concurrent callers on one shared session (as the service runs it) -- per batch size; and
    images per CPU second (this process's CPU time: on a shared machine, the cost that holds)."""
    import threading

    from router_tools.datasets import load_test
    from edge_model.runtime import OnnxClassifier, SessionOptions

    clf = OnnxClassifier(MANIFEST, SessionOptions(intra_op_threads=threads, warmup_runs=5))
    run, outs, name = clf.session.run, [clf.manifest.output_name], clf.input_name
    images = clf.preprocess_batch(list(load_test().images[:max(batch_sizes)]))
    result, per_cpu = {}, {}
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
        cpu0 = time.process_time()
        for w in workers:
            w.start()
        time.sleep(seconds)
        stop.set()
        for w in workers:
            w.join()
        result[b] = round(sum(counts) * b / (time.perf_counter() - t0), 1)
        cpu = time.process_time() - cpu0
        per_cpu[b] = round(sum(counts) * b / cpu, 1) if cpu > 0 else float("nan")
    return result, per_cpu


# ----------------------------------------------------------------------------- report

LABELS = {
    "a": "(a) our service, batching on",
    "b": "(b) our service, batching off",
    "o": "(o) our service, no solo session",
    "c": "(c) naive FastAPI + session.run",
    "d": "(d) Triton (nvidia-pytriton)",
    "k": "(k) KServe ModelServer, 1 worker",
    "w": "(w) KServe ModelServer, 2 workers",
}
# (peer, goal of (a) / peer): issue 13 (KServe, pytriton) and issue 3 (naive FastAPI)
GOALS = {"k": 1.5, "w": None, "d": 2.0, "c": 2.0, "b": None, "o": None}
CEILING_GOAL = 0.8


def _spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    med = statistics.median(values)
    return f"{med:.2f} [{min(values):.2f}-{max(values):.2f}]" if len(values) > 1 else f"{med:.2f}"


def ratios_by_round(results: dict[str, TargetResult], levels: list[int], ceilings: list[dict[int, float]],
                    ceilings_cpu: Optional[list[dict[int, float]]] = None) -> dict:
    """(a) / peer within each round and level (measured minutes apart at most), and (a) / ceiling per
    round: in requests per second, and in requests per CPU second of server + wrk against images per
    CPU second of the ceiling (what the wall-clock ratio would be if each had the whole machine)."""
    out: dict = {}
    rounds = len(ceilings)
    a = results.get("a")
    for peer in GOALS:
        r = results.get(peer)
        if a is None or r is None:
            continue
        for c in levels:
            pairs = [(a.at(c, i), r.at(c, i)) for i in range(rounds)]
            vals = [x.rps / y.rps for x, y in pairs if x is not None and y is not None and y.rps > 0]
            if vals:
                out[f"a_over_{peer}@{c}"] = vals
    if a is not None:
        for c in levels:
            vals = [a.at(c, i).rps / max(ceilings[i].values()) for i in range(rounds) if a.at(c, i) is not None]
            if vals:
                out[f"a_over_ceiling@{c}"] = vals
            if ceilings_cpu:
                vals = [a.at(c, i).per_cpu_s / max(ceilings_cpu[i].values()) for i in range(rounds)
                        if a.at(c, i) is not None]
                if vals:
                    out[f"a_over_ceiling_per_cpu@{c}"] = vals
    return out


def print_report(results: dict[str, TargetResult], levels: list[int], ceilings: list[dict[int, float]],
                 ceilings_cpu: list[dict[int, float]], args) -> dict:
    ordered = [results[k] for k in LABELS if k in results]
    print()
    for r in ordered:
        if not r.rounds and r.note:
            print(f"{r.label}: skipped -- {r.note}")
    print(f"\nthroughput (req/s) and p99 (ms) by connections; medians of {args.rounds} interleaved round(s)")
    head = f"{'target':36}" + "".join(f" {f'{c} conn':>17}" for c in levels) + f" {'server cores':>13} {'wrk cores':>10}"
    print(head)
    for r in ordered:
        if not r.rounds:
            continue
        cells = []
        for c in levels:
            ms = r.level(c)
            cells.append(f"{statistics.median(m.rps for m in ms):8.0f} {statistics.median(m.p99_ms for m in ms):7.1f}ms"
                         if ms else f"{'-':>17}")
        top = r.level(levels[-1])
        errs = sum(sum(m.errors.values()) for m in r.rounds)
        print(f"{r.label:36}" + "".join(f" {cell:>17}" for cell in cells)
              + f" {statistics.median(m.server_cores for m in top):13.2f} {statistics.median(m.loadgen_cores for m in top):10.2f}"
              + (f"  errors {errs}" if errs else "")
              + (f"  avg batch {r.server_stats['avg_batch']}" if r.server_stats.get("avg_batch") else ""))
    print(f"(server cores and wrk cores: CPU seconds per wall second at {levels[-1]} connections; the machine has "
          f"{os.cpu_count()} -- wrk competes with the server for them)")
    print("\nrequests per CPU second of server + wrk (cost per request; on a shared machine this moves less than req/s)")
    print(f"{'target':36}" + "".join(f" {f'{c} conn':>17}" for c in levels))
    for r in ordered:
        if r.rounds:
            print(f"{r.label:36}" + "".join(
                f" {statistics.median(m.per_cpu_s for m in r.level(c)):17.0f}" if r.level(c) else f" {'-':>17}"
                for c in levels))
    print(f"\nONNX batch ceiling (session.run alone, {args.threads} intra-op thread(s) x {args.instances} concurrent "
          f"caller(s), as in (a)), median of {len(ceilings)} measurement(s) taken between the rounds: "
          + ", ".join(f"batch {b}: {statistics.median(c[b] for c in ceilings):.0f} images/s" for b in ceilings[0]))
    print("  per CPU second: " + ", ".join(f"batch {b}: {statistics.median(c[b] for c in ceilings_cpu):.0f} images"
                                          for b in ceilings_cpu[0]))
    ratios = ratios_by_round(results, levels, ceilings, ceilings_cpu)
    print("\nratios (a) / peer: median of the per-round ratios [min-max]")
    print(f"{'':28}" + "".join(f" {f'{c} conn':>17}" for c in levels) + "  goal")
    for peer, goal in GOALS.items():
        if not any(f"a_over_{peer}@{c}" in ratios for c in levels):
            continue
        cells = [_spread(ratios.get(f"a_over_{peer}@{c}", [])) for c in levels]
        verdict = ""
        if goal is not None:
            met = [statistics.median(ratios[f"a_over_{peer}@{c}"]) >= goal for c in levels if f"a_over_{peer}@{c}" in ratios]
            verdict = f">= {goal:g}: " + ("met" if all(met) else f"NOT met at {sum(not m for m in met)} level(s)")
        print(f"{'(a) / ' + LABELS[peer][4:26]:28}" + "".join(f" {cell:>17}" for cell in cells) + f"  {verdict}")
    if any(f"a_over_ceiling@{c}" in ratios for c in levels):
        cells = [_spread(ratios.get(f"a_over_ceiling@{c}", [])) for c in levels]
        top = ratios.get(f"a_over_ceiling@{levels[-1]}")
        verdict = (f">= {CEILING_GOAL:g} at {levels[-1]}: " + ("met" if top and statistics.median(top) >= CEILING_GOAL else "NOT met")
                   if top else "")
        print(f"{'(a) / ONNX batch ceiling':28}" + "".join(f" {cell:>17}" for cell in cells) + f"  {verdict}")
        cells = [_spread(ratios.get(f"a_over_ceiling_per_cpu@{c}", [])) for c in levels]
        print(f"{'  same, per CPU second':28}" + "".join(f" {cell:>17}" for cell in cells)
              + "  (server + wrk CPU vs the ceiling's: robust to a shared machine)")
    print(f"\nload generator: wrk (1 thread, keep-alive, Lua POST body); {args.duration:.0f} s per measurement after "
          f"{args.warmup:.0f} s warm-up; {args.rounds} round(s), each visiting the levels and, per level, the targets in a "
          "fresh random order")
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v} for k, v in ratios.items()}


# ----------------------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", default="1,4,16,64",
                        help="comma-separated concurrency levels (wrk connections), e.g. 1,4,16,64 or 32")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians and per-round ratios reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime intra-op threads of every target (default: runtime.intra_op_threads of --config)")
    parser.add_argument("--instances", type=int, default=None,
                        help="concurrent executions of (a), (b), (d) and the ceiling (default: runtime.instances of --config)")
    parser.add_argument("--datatype", choices=("UINT8", "FP32"), default="UINT8")
    parser.add_argument("--config", type=Path, default=REPO / "config" / "cloud.yaml", help="settings of (a) and (b)")
    parser.add_argument("--targets", default="adkw",
                        help="subset of a (service), b (batching off), c (naive FastAPI), d (pytriton), "
                             "k (KServe 1 worker), w (KServe 2 workers)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s measurements, 1 s warm-up, 1 round")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--serve-naive", type=int, default=None, metavar="FD", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, default=MANIFEST, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_naive is not None:
        return serve_naive(args.serve_naive, args.manifest)
    try:
        levels = [int(c) for c in str(args.connections).split(",") if c.strip()]
    except ValueError:
        parser.error("--connections takes comma-separated integers, e.g. 1,4,16,64")
    if not levels or min(levels) < 1:
        parser.error("--connections takes comma-separated integers >= 1, e.g. 1,4,16,64")
    unknown = set(args.targets) - set(LABELS)
    if unknown:
        parser.error(f"--targets: unknown {''.join(sorted(unknown))!r}; choose among {''.join(LABELS)}")
    if args.quick:
        args.duration, args.warmup, args.rounds = 2.0, 1.0, 1
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
          f"batching max {max_batch} rows / {delay_ms} ms (dispatch when idle: {settings.batching.dispatch_when_idle}); "
          f"ONNX Runtime {args.threads} thread(s) x {instances} instance(s); connections {levels}")
    if subprocess.run(["pgrep", "-f", "router_tools.train"], capture_output=True).returncode == 0:
        print("WARNING: model training is running on this machine; numbers will be depressed and noisy")
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"WARNING: load average {load_before[0]:.2f} before the run: the machine is not idle; "
              "the per-round ratios are the figures to trust")

    ceiling_sizes = (1, max_batch)
    ceilings, ceilings_cpu = [], []

    def measure_ceiling() -> None:
        wall, cpu = raw_ceiling(args.threads, instances, ceiling_sizes, seconds=min(3.0, args.duration))
        ceilings.append(wall)
        ceilings_cpu.append(cpu)

    measure_ceiling()
    work = Path(tempfile.mkdtemp(prefix="cloud-bench-"))
    body_bytes, reference = request_body(args.datatype)
    body = work / "body.json"
    body.write_bytes(body_bytes)
    lua = work / "post.lua"
    lua.write_text(LUA)

    results: dict[str, TargetResult] = {}
    loads: list[float] = []
    with contextlib.ExitStack() as stack:
        targets: list[Target] = []
        factories = {
            "a": lambda: service_target("a", LABELS["a"], args.config, threads_override),
            "b": lambda: service_target("b", LABELS["b"], args.config, {**threads_override, "batching.enabled": False}),
            "o": lambda: service_target("o", LABELS["o"], args.config, {**threads_override, "runtime.solo_threads": 0}),
            "c": lambda: naive_target(MANIFEST, args.threads),
            "d": lambda: triton_target(args.datatype, max_batch, delay_ms, args.threads, instances),
            "k": lambda: kserve_target("k", MANIFEST, 1, work),
            "w": lambda: kserve_target("w", MANIFEST, 2, work),
        }
        for key in LABELS:
            if key not in args.targets:
                continue
            results[key] = TargetResult(key, LABELS[key])
            try:
                target = stack.enter_context(factories[key]())
            except Exception as exc:  # (d), (k), (w) depend on other packages and binaries: report, go on
                note = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                print(f"{LABELS[key]}: {note}", flush=True)
                results[key].note = note
                continue
            wrong = check_answer(target, body_bytes, reference)
            if wrong:
                results[key].note = f"WRONG ANSWER, not measured: {wrong}"
                print(f"{LABELS[key]}: {results[key].note}", flush=True)
                continue
            targets.append(target)
        for rnd in range(args.rounds):
            if rnd:
                measure_ceiling()
            for conns in levels:
                order = targets[:]
                random.shuffle(order)
                for target in order:
                    m = measure(target, lua, body, conns, args.duration, args.warmup)
                    m.connections, m.round = conns, rnd
                    results[target.key].rounds.append(m)
                    print(f"round {rnd + 1}/{args.rounds}, {conns:>3} conn: {target.label:36} {m.rps:8.0f} req/s  "
                          f"p99 {m.p99_ms:7.1f} ms  server {m.server_cores:.2f} / wrk {m.loadgen_cores:.2f} cores"
                          + (f"  ({m.note})" if m.note else ""), flush=True)
            loads.append(os.getloadavg()[0])
        for target in targets:
            results[target.key].server_stats = target.stats()
    shutil.rmtree(work, ignore_errors=True)

    ratios = print_report(results, levels, ceilings, ceilings_cpu, args)
    print(f"load average (1 min): {load_before[0]:.2f} before; after each round {', '.join(f'{v:.2f}' for v in loads)} "
          "(includes this run's own load: about 2 while a target is measured)")
    if args.json:
        args.json.write_text(json.dumps({
            "settings": {"connections": levels, "duration_s": args.duration, "rounds": args.rounds,
                         "threads": args.threads, "instances": instances, "datatype": args.datatype, "max_batch_size": max_batch,
                         "max_queue_delay_ms": delay_ms, "load_generator": "wrk -t1"},
            "targets": {r.key: {"label": r.label, "note": r.note, "server_stats": r.server_stats,
                                "rounds": [asdict(m) for m in r.rounds]} for r in results.values()},
            "ceiling_images_per_s": ceilings,
            "ceiling_images_per_cpu_s": ceilings_cpu,
            "ratios": ratios,
            "load_average": {"before": load_before[0], "after_rounds": loads},
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
