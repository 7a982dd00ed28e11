"""Edge model benchmark: batch-1 latency INT8 vs FP32 twin vs the raw ``session.run`` floor,
plus file sizes, accuracies measured on the shipped test split, calibration and FLOPs.

    .venv/bin/python bench/edge_latency.py                # full run (~20 s on an idle core)
    .venv/bin/python bench/edge_latency.py --quick        # smoke run (seconds)
    .venv/bin/python bench/edge_latency.py --json out.json
    .venv/bin/python bench/edge_latency.py --edge router_tools/data/releases/edge-1.1.0/edge-int8.json \
        --compare edge_model/artifacts/edge-int8.json    # a release vs the bundled model, one run

Latency variants, all single-threaded sessions, all fed the same preprocessed test images
(float32 [1, 1, 28, 28], cycled):

* ``int8``       -- ``EdgeModel.predict_proba(x)`` (the product path: checks, ONNX, calibrated softmax)
* ``fp32``       -- the same wrapper over the FP32 twin
* ``int8-floor`` -- ``session.run`` on the very same INT8 session, no wrapper: the floor
* ``fp32-floor`` -- ``session.run`` on the FP32 twin's session
* ``cmp-int8``, ``cmp-fp32`` -- with ``--compare M``: the product path of another INT8 model and
  its twin, timed in the same rounds (two models' INT8/FP32 ratios under the same load)

Rounds interleave the variants in a fresh random order each round, so drift (other
processes, frequency scaling) hits all of them alike; ratios are also computed per round
(same-round medians) and their median reported. Benchmarks are not tests: nothing here
asserts; the issue's targets are printed next to the measured values for the reader.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

os.environ.setdefault("OMP_NUM_THREADS", "1")

from edge_model.calibration import expected_calibration_error, softmax  # noqa: E402
from router_tools.datasets import load_test  # noqa: E402
from edge_model.manifest import Manifest  # noqa: E402
from edge_model.preprocess import preprocess_batch  # noqa: E402
from edge_model.runtime import DEFAULT_EDGE_MANIFEST, OnnxClassifier, SessionOptions  # noqa: E402

CLOUD_MANIFEST = REPO / "cloud_service" / "artifacts" / "cloud-fp32.json"
SINGLE = SessionOptions(intra_op_threads=1, inter_op_threads=1, warmup_runs=20)


def _variants(int8: OnnxClassifier, fp32: OnnxClassifier):
    def floor(model: OnnxClassifier):
        run, outs, name = model.session.run, [model.manifest.output_name], model.input_name
        return lambda x: run(outs, {name: x})

    return {
        "int8": int8.predict_proba,
        "fp32": fp32.predict_proba,
        "int8-floor": floor(int8),
        "fp32-floor": floor(fp32),
    }


def measure_latency(variants: dict, inputs: list[np.ndarray], rounds: int, per_round: int, seed: int = 0) -> dict:
    """Per-call latencies (ns) for each variant, interleaved round by round in random order."""
    rng = np.random.default_rng(seed)
    names = list(variants)
    samples = {n: np.empty(rounds * per_round, dtype=np.int64) for n in names}
    round_medians = {n: np.empty(rounds) for n in names}
    clock = time.perf_counter_ns
    k = 0
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for n in rng.permutation(names):
                fn, buf = variants[n], samples[n]
                for j in range(per_round):
                    x = inputs[(k + j) % len(inputs)]
                    t0 = clock()
                    fn(x)
                    buf[r * per_round + j] = clock() - t0
                round_medians[n][r] = np.median(buf[r * per_round : (r + 1) * per_round])
            k += per_round
    finally:
        gc.enable()
    return {"samples": samples, "round_medians": round_medians}


def _us(ns) -> float:
    return float(ns) / 1e3


def accuracy_and_ece(model: OnnxClassifier, x: np.ndarray, labels: np.ndarray) -> dict:
    logits = np.concatenate([model.logits(x[i : i + 500]) for i in range(0, len(x), 500)])
    probs = softmax(logits, model.temperature)
    return {
        "accuracy": float((logits.argmax(1) == labels).mean()),
        "ece_uncalibrated": expected_calibration_error(softmax(logits), labels),
        "ece": expected_calibration_error(probs, labels),
        "images": int(len(labels)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edge", type=Path, default=DEFAULT_EDGE_MANIFEST, help="INT8 edge manifest (its twin is the FP32)")
    p.add_argument("--compare", type=Path, help="another INT8 manifest (and its twin) timed in the same rounds")
    p.add_argument("--cloud", type=Path, default=CLOUD_MANIFEST, help="cloud FP32 manifest (FLOPs, accuracy)")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--per-round", type=int, default=50, help="consecutive calls per variant per round")
    p.add_argument("--images", type=int, default=256, help="distinct test images cycled through")
    p.add_argument("--accuracy-limit", type=int, default=None, help="score only the first N test images")
    p.add_argument("--no-cloud-accuracy", action="store_true", help="skip scoring the (slower) cloud model")
    p.add_argument("--quick", action="store_true", help="smoke run: 10 rounds x 20 calls, 1000 test images")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.per_round, a.accuracy_limit = 10, 20, a.accuracy_limit or 1000

    t_start = time.perf_counter()
    int8 = OnnxClassifier(a.edge, SINGLE)
    if not int8.manifest.twin:
        raise SystemExit(f"{a.edge}: manifest names no FP32 twin")
    fp32 = OnnxClassifier(a.edge.parent / Path(int8.manifest.twin).with_suffix(".json"), SINGLE)
    cloud_manifest = Manifest.load(a.cloud)

    test = load_test().head(a.accuracy_limit)
    x_all = preprocess_batch(test.images)
    inputs = [np.ascontiguousarray(x_all[i : i + 1]) for i in range(min(a.images, len(x_all)))]

    # ---- latency
    variants = _variants(int8, fp32)
    if a.compare:
        cmp8 = OnnxClassifier(a.compare, SINGLE)
        if not cmp8.manifest.twin:
            raise SystemExit(f"{a.compare}: manifest names no FP32 twin")
        cmp32 = OnnxClassifier(a.compare.parent / Path(cmp8.manifest.twin).with_suffix(".json"), SINGLE)
        variants.update({"cmp-int8": cmp8.predict_proba, "cmp-fp32": cmp32.predict_proba})
    for fn in variants.values():  # warm every path (allocator, caches) before timing
        for x in inputs[:50]:
            fn(x)
    lat = measure_latency(variants, inputs, a.rounds, a.per_round)
    stats = {}
    for n, s in lat["samples"].items():
        stats[n] = {
            "median_us": _us(np.median(s)),
            "p99_us": _us(np.percentile(s, 99)),
            "mean_us": _us(s.mean()),
            "calls": int(len(s)),
        }

    def ratio(num: str, den: str) -> dict:
        rm = lat["round_medians"]
        return {
            "of_medians": stats[num]["median_us"] / stats[den]["median_us"],
            "of_p99": stats[num]["p99_us"] / stats[den]["p99_us"],
            "per_round_median": float(np.median(rm[num] / rm[den])),
        }

    ratios = {
        "int8 / fp32": ratio("int8", "fp32"),
        "int8 / int8-floor": ratio("int8", "int8-floor"),
        "fp32 / fp32-floor": ratio("fp32", "fp32-floor"),
        "int8-floor / fp32-floor": ratio("int8-floor", "fp32-floor"),
    }
    if a.compare:
        ratios["cmp-int8 / cmp-fp32"] = ratio("cmp-int8", "cmp-fp32")
        ratios["int8 / cmp-int8"] = ratio("int8", "cmp-int8")

    # ---- sizes, FLOPs, accuracy (measured on the shipped test split)
    sizes = {
        "int8_bytes": int8.model_path.stat().st_size,
        "fp32_bytes": fp32.model_path.stat().st_size,
        "cloud_bytes": (a.cloud.parent / cloud_manifest.file).stat().st_size,
    }
    flops = {"edge": int8.manifest.flops, "cloud": cloud_manifest.flops}
    acc = {"int8": accuracy_and_ece(int8, x_all, test.labels), "fp32": accuracy_and_ece(fp32, x_all, test.labels)}
    if a.compare:
        acc["cmp-int8"] = accuracy_and_ece(cmp8, x_all, test.labels)
        top1 = [np.concatenate([m.logits(x_all[i : i + 500]).argmax(1) for i in range(0, len(x_all), 500)])
                for m in (int8, cmp8)]
        acc["agreement int8 / cmp-int8"] = float((top1[0] == top1[1]).mean())
    if not a.no_cloud_accuracy:
        cloud = OnnxClassifier(a.cloud, SessionOptions(warmup_runs=1))
        acc["cloud"] = accuracy_and_ece(cloud, x_all, test.labels)

    results = {
        "command": "python bench/edge_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "models": {"edge": f"{int8.name} {int8.version}",
                   **({"compare": f"{cmp8.name} {cmp8.version}"} if a.compare else {}), "cloud": f"{cloud_manifest.name} {cloud_manifest.version}"},
        "environment": {
            "python": platform.python_version(),
            "onnxruntime": __import__("onnxruntime").__version__,
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "loadavg_1m_at_start": os.getloadavg()[0],
            "loadavg_1m_at_end": None,
        },
        "latency": stats,
        "ratios": ratios,
        "sizes": sizes,
        "flops": flops,
        "accuracy": acc,
        "rounds": a.rounds,
        "per_round": a.per_round,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    results["environment"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    _print(results)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _print(r: dict) -> None:
    env = r["environment"]
    print(f"# edge latency benchmark  ({r['command'].strip()})")
    cmp = f" | compared with {r['models']['compare']}" if "compare" in r["models"] else ""
    print(f"edge {r['models']['edge']}{cmp} | cloud {r['models']['cloud']}")
    print(f"{env['cpu']}, {env['cores']} cores, onnxruntime {env['onnxruntime']}, python {env['python']}, "
          f"load avg {env['loadavg_1m_at_start']:.2f} at start, {env['loadavg_1m_at_end']:.2f} at end; "
          "single-threaded sessions")
    print(f"{r['rounds']} interleaved rounds x {r['per_round']} calls per variant, batch 1\n")

    print("| variant    | median us | p99 us | mean us |")
    print("|------------|----------:|-------:|--------:|")
    for n, s in r["latency"].items():
        print(f"| {n:<10} | {s['median_us']:9.1f} | {s['p99_us']:6.1f} | {s['mean_us']:7.1f} |")
    print("\n| ratio                   | of medians | of p99 | per-round median |")
    print("|-------------------------|-----------:|-------:|-----------------:|")
    for n, q in r["ratios"].items():
        print(f"| {n:<23} | {q['of_medians']:10.3f} | {q['of_p99']:6.3f} | {q['per_round_median']:16.3f} |")

    s, f, acc = r["sizes"], r["flops"], r["accuracy"]
    print("\n| measure                          | value     | issue target |")
    print("|----------------------------------|-----------|--------------|")
    print(f"| INT8 file / FP32 twin file       | {s['int8_bytes']:,} / {s['fp32_bytes']:,} B = {s['int8_bytes'] / s['fp32_bytes']:.3f} | <= 0.333 |")
    print(f"| FLOPs edge / cloud (manifests)   | {f['edge']:,} / {f['cloud']:,} = {f['edge'] / f['cloud']:.5f} (1/{f['cloud'] / f['edge']:.2f}) | <= 0.05 (1/20) |")
    print(f"| edge INT8 accuracy               | {acc['int8']['accuracy']:.4f} | >= 0.905 |")
    print(f"| edge FP32 twin accuracy          | {acc['fp32']['accuracy']:.4f} |  |")
    print(f"| INT8 - FP32 accuracy (points)    | {100 * (acc['int8']['accuracy'] - acc['fp32']['accuracy']):+.2f} | >= -0.5 |")
    if "cmp-int8" in acc:
        print(f"| compared INT8 accuracy           | {acc['cmp-int8']['accuracy']:.4f} |  |")
        print(f"| top-1 agreement INT8 / compared  | {acc['agreement int8 / cmp-int8']:.4f} |  |")
    if "cloud" in acc:
        print(f"| cloud FP32 accuracy              | {acc['cloud']['accuracy']:.4f} | >= 0.945 |")
    print(f"| edge INT8 ECE before / after T   | {acc['int8']['ece_uncalibrated']:.4f} / {acc['int8']['ece']:.4f} | lower after |")
    print(f"\naccuracies measured on {acc['int8']['images']} images of the shipped test split; "
          f"cloud file {s['cloud_bytes']:,} B; total {r['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
