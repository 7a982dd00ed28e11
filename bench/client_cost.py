"""What the router client costs next to the raw libraries it wraps, side by side in one run.

Every comparison is a ratio measured in interleaved rounds (a random order of the variants in
each round, so machine noise hits them alike); the figure is the median of the per-round ratios
and its spread (min..max over rounds). Goals from issue #13 in brackets.

  (a) escalated  ``Router.predict`` (threshold 1.0: every image goes to the real service on
      loopback) vs a pooled synchronous ``httpx.Client`` POST of the same v2 body to the same
      service (reading the body; ``+parse``: and decoding the JSON)                 [<= 1.15x]
      ``predict(mode="cloud_only")`` (the same without the edge inference that an escalation
      runs first) and ``apredict`` escalated (one event loop, awaited serially) are shown too.
  (b) confident ``Router.predict(x, normalised=True)`` vs raw ``session.run`` on the same
      preprocessed input                                                             [<= 1.5x]
  (c) ``predict_batch`` (confident, float inputs declared normalised) per image at batch
      1/8/64/256 vs raw ``session.run`` at the same batch                            [<= 1.15x at 64]
      (b) and (c) show the calling thread's CPU time beside the wall clock: both variants run
      wholly in that thread, and CPU time leaves out what the scheduler gave other processes.
  (d) cold start, a whole fresh process: import + construct + first predict, vs a raw
      onnxruntime process (import numpy + onnxruntime, load the same .onnx, normalise, run);
      router variants: the shipped default policy (one cloud endpoint: the network stack is
      preloaded at construction), the same with httpx's CLI dependencies hidden (rich, pygments,
      click: installed here by the tools/server/tests, not by the client) and
      ``Router(privacy=True)``                                                     [<= 1.5x]

    .venv/bin/python bench/client_cost.py [--only a,b,c,d] [--rounds 15] [--cold 10] [--json out.json]

The service runs with its shipped settings (an idle instance dispatches at once: no batching wait).
``python -X importtime -c "import router"`` shows where (d)'s import time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402


def _interleave(variants: dict, rounds: int, n: int, seed: int = 0,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Per-call microseconds of each variant, one entry per round. ``cpu``: filled with the
    calling thread's CPU microseconds per call too (time the scheduler gave other processes is
    not in it: on a shared machine the steadier figure for work done wholly in this thread)."""
    for fn in variants.values():  # warm-up
        fn(max(5, n // 4))
    out: dict[str, list[float]] = {k: [] for k in variants}
    if cpu is not None:
        cpu.update({k: [] for k in variants})
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        for k in order:
            c0 = time.thread_time()
            t0 = time.perf_counter()
            variants[k](n)
            out[k].append((time.perf_counter() - t0) / n * 1e6)
            if cpu is not None:
                cpu[k].append((time.thread_time() - c0) / n * 1e6)
    return out


def _ratio(per: dict[str, list[float]], k: str, base: str) -> dict:
    r = [a / b for a, b in zip(per[k], per[base])]
    return {"median": round(statistics.median(r), 3), "min": round(min(r), 3), "max": round(max(r), 3),
            "us": round(statistics.median(per[k]), 1), "base_us": round(statistics.median(per[base]), 1)}


def _show(title: str, rows: dict[str, dict], goal: float | None = None, key: str | None = None) -> None:
    print(title)
    for name, r in rows.items():
        print(f"  {name:28s} {r['us']:10.1f} us vs {r['base_us']:9.1f} us   x{r['median']:.2f} "
              f"(rounds {r['min']:.2f}..{r['max']:.2f})")
    if goal is not None and key is not None:
        v = rows[key]["median"]
        print(f"  goal {key} <= {goal}: {'met' if v <= goal else 'NOT met'} ({v:.2f})")


def _confident_inputs(edge, k: int = 256):
    from edge_model.preprocess import preprocess
    from router_tools.datasets import load_test

    test = load_test()
    xs = np.stack([preprocess(img, edge.preprocess_config) for img in test.images[:3000]])
    conf = edge.predict_proba(xs).max(axis=1)
    good = xs[conf >= 0.5]
    return np.ascontiguousarray(np.resize(good, (k, *good.shape[1:]))), test


def bench_escalation(rounds: int, n: int) -> dict:
    import httpx

    from cloud_service.launch import LocalService
    from oip.protocol import model_path
    from router import Router
    from router.cloud import build_infer_body
    from router.policy import parse_policy

    with LocalService() as svc:
        router = Router(parse_policy({
            "confidence_threshold": 1.0, "decision_log": False, "default_deadline_ms": 2000,
            "cloud": {"endpoints": [{"url": svc.url, "model": "fashion-mnist"}], "health_probe_interval_s": 0},
        }))
        from router_tools.datasets import load_test

        images = [np.asarray(im, dtype=np.uint8) for im in load_test().images[:64]]
        p = router.predict(images[0])
        assert p.source == "cloud", p
        state = router._snap.states[0]
        ep, info = state.endpoint, state.meta
        pixels = [im[None] for im in images]
        from router.effects import LocalWork

        xs = [router._local(LocalWork([im], run_edge=False)).x for im in images]
        url = ep.url + model_path(ep.model, ep.version) + "/infer"
        bodies = [build_infer_body(info, ep, x, px, 2.0, f"raw-{i}") for i, (x, px) in enumerate(zip(xs, pixels))]
        client = httpx.Client(trust_env=False, timeout=5.0)
        headers = {"content-type": "application/json", "accept-encoding": "identity"}

        def raw(k):
            for i in range(k):
                r = client.post(url, content=bodies[i % 64], headers=headers)
                r.read()
            assert r.status_code == 200

        def raw_parse(k):
            for i in range(k):
                r = client.post(url, content=bodies[i % 64], headers=headers)
                json.loads(r.content)

        def predict(k):
            for i in range(k):
                p = router.predict(images[i % 64])
            assert p.source == "cloud", p

        def predict_cloud_only(k):  # no edge inference first: the client's cost alone
            for i in range(k):
                p = router.predict(images[i % 64], mode="cloud_only")
            assert p.source == "cloud", p

        loop = asyncio.new_event_loop()

        def apredict(k):
            async def go():
                for i in range(k):
                    p = await router.apredict(images[i % 64])
                assert p.source == "cloud", p

            loop.run_until_complete(go())

        per = _interleave({"raw httpx POST": raw, "raw httpx POST +parse": raw_parse, "predict escalated": predict,
                           "predict cloud_only": predict_cloud_only, "apredict escalated": apredict}, rounds, n)
        loop.run_until_complete(router.aclose())
        loop.close()
        client.close()
    rows = {k: _ratio(per, k, "raw httpx POST") for k in per if k != "raw httpx POST"}
    _show(f"(a) escalation, batch 1, real service on loopback ({rounds} rounds x {n}; ratio to a raw pooled "
          f"httpx.Client POST of the same body)", rows, 1.15, "predict escalated")
    return rows


def bench_edge(rounds: int, n: int) -> dict:
    from router import Router
    from router.policy import parse_policy

    # Threshold 0: every answer is the edge's, reason "confident" (no endpoint: nothing may leave).
    router = Router(parse_policy({"confidence_threshold": 0.0, "decision_log": False, "cloud": {"endpoints": []}}))
    edge = router.edge_model
    xs, _ = _confident_inputs(edge)
    session, name, outs = edge.session, edge.input_name, [edge.manifest.output_name]
    results: dict = {}

    def raw1(k):
        for i in range(k):
            session.run(outs, {name: xs[i % 256][None]})

    def predict(k):
        for i in range(k):
            p = router.predict(xs[i % 256], normalised=True)
        assert p.source == "edge" and p.reason.value == "confident", p

    cpu: dict = {}
    per = _interleave({"raw session.run": raw1, "predict confident": predict}, rounds, n, cpu=cpu)
    results["b"] = {"predict confident": _ratio(per, "predict confident", "raw session.run"),
                    "predict confident, thread CPU": _ratio(cpu, "predict confident", "raw session.run")}
    _show(f"(b) confident predict, batch 1 ({rounds} rounds x {n}; ratio to raw session.run; wall clock, and "
          "the thread's CPU time)", results["b"], 1.5, "predict confident")

    rows = {}
    for b in (1, 8, 64, 256):
        batch = xs[:b]
        rows_list = list(batch)
        calls = max(2, n // b)

        def raw(k, batch=batch):
            for _ in range(k):
                session.run(outs, {name: batch})

        def pb(k, rows_list=rows_list):
            for _ in range(k):
                router.predict_batch(rows_list, normalised=True)

        cpu = {}
        per = _interleave({"raw": raw, "predict_batch": pb}, rounds, calls, cpu=cpu)
        for row_name, r in ((f"predict_batch @ {b}", _ratio(per, "predict_batch", "raw")),
                        (f"predict_batch @ {b}, CPU", _ratio(cpu, "predict_batch", "raw"))):
            r["us"], r["base_us"] = round(r["us"] / b, 2), round(r["base_us"] / b, 2)  # per image
            rows[row_name] = r
    results["c"] = rows
    _show(f"(c) predict_batch per image vs raw session.run at the same batch ({rounds} rounds; wall clock, and "
          "the thread's CPU time)", rows, 1.15, "predict_batch @ 64")
    router.close()
    return results


_COLD = {
    "raw onnxruntime": """
import time; t0 = time.perf_counter()
import numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession({onnx!r}, so, providers=["CPUExecutionProvider"])
img = np.zeros((28, 28), np.uint8)
x = ((img.astype(np.float32) / 255.0 - 0.5) / 0.5)[None, None]
s.run(None, {{s.get_inputs()[0].name: x}})
print(time.perf_counter() - t0)
""",
    "router default policy": """
import time; t0 = time.perf_counter()
import numpy as np
from router import Router
r = Router.from_config()
r.predict(np.zeros((28, 28), np.uint8), mode="edge_only")
print(time.perf_counter() - t0)
""",
    # As a client-only install has it: httpx imports its CLI (rich, pygments, click) when those
    # are installed -- here by the tools, server and test dependencies, not by the client's.
    "router default policy, client-only deps": """
import sys
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("rich", "click", "pygments"):
            raise ImportError(name)
sys.meta_path.insert(0, _Hide())
import time; t0 = time.perf_counter()
import numpy as np
from router import Router
r = Router.from_config()
r.predict(np.zeros((28, 28), np.uint8), mode="edge_only")
print(time.perf_counter() - t0)
""",
    "router privacy": """
import time; t0 = time.perf_counter()
import numpy as np
from router import Router
r = Router(privacy=True)
r.predict(np.zeros((28, 28), np.uint8))
print(time.perf_counter() - t0)
""",
}


def bench_cold(repeats: int) -> dict:
    from edge_model.runtime import DEFAULT_EDGE_MANIFEST

    onnx = str(DEFAULT_EDGE_MANIFEST.with_suffix(".onnx"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYBRID_ROUTER_POLICY", None)
    wall: dict[str, list[float]] = {k: [] for k in _COLD}
    inner: dict[str, list[float]] = {k: [] for k in _COLD}
    rng = random.Random(1)
    for _ in range(repeats):
        order = list(_COLD)
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _COLD[k].format(onnx=onnx)], capture_output=True, text=True,
                                 cwd=ROOT, env=env, timeout=120)
            wall[k].append((time.perf_counter() - t0) * 1e6)
            if out.returncode != 0:
                raise RuntimeError(f"{k} failed:\n{out.stderr}")
            inner[k].append(float(out.stdout.split()[-1]) * 1e6)
    rows = {}
    for k in _COLD:
        if k == "raw onnxruntime":
            continue
        r = _ratio(wall, k, "raw onnxruntime")
        rows[f"{k} (whole process)"] = r
        rows[f"{k} (in-process)"] = _ratio(inner, k, "raw onnxruntime")
    for r in rows.values():
        r["us"], r["base_us"] = round(r["us"] / 1000, 1), round(r["base_us"] / 1000, 1)
    print(f"(d) cold start, fresh processes interleaved ({repeats} each; figures in ms; whole process = interpreter "
          "start included; in-process = from the script's first line to the first answer)")
    for name, r in rows.items():
        print(f"  {name:56s} {r['us']:8.1f} ms vs {r['base_us']:7.1f} ms   x{r['median']:.2f} "
              f"(runs {r['min']:.2f}..{r['max']:.2f})")
    v = rows["router default policy (whole process)"]["median"]
    print(f"  goal default-policy whole process <= 1.5: {'met' if v <= 1.5 else 'NOT met'} ({v:.2f})")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="a,b,c,d", help="comma-separated parts to run")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=100, help="calls per variant per round (batch 1)")
    ap.add_argument("--cold", type=int, default=10, help="fresh processes per cold-start variant")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus; python {sys.version.split()[0]}")
    result: dict = {"load_start": os.getloadavg()[0]}
    if "a" in parts:
        result["a"] = bench_escalation(args.rounds, args.per_round)
    if parts & {"b", "c"}:
        result.update(bench_edge(args.rounds, args.per_round * 4))
    if "d" in parts:
        result["d"] = bench_cold(args.cold)
    result["load_end"] = os.getloadavg()[0]
    print(f"load average at the end {result['load_end']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
