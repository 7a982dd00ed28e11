"""Edge model updates: how long a swap takes, what answers it costs, and what the field sees.

    .venv/bin/python bench/update_swap.py                # 10 updates under 4 threads, the full test split
    .venv/bin/python bench/update_swap.py --quick        # 4 updates, 2000 images (seconds)
    .venv/bin/python bench/update_swap.py --release router_tools/data/releases/edge-1.1.0/edge-int8.json

Part 1 -- **swaps under load.** A real signed channel (``router_tools.release``: keys, TUF metadata)
in a temporary folder, served by a loopback static HTTP server; one router (``edge_only``: the
swap is measured, not the network) with the updater on; ``--threads`` threads call ``predict``
flat out while the bench publishes ``--updates`` releases one after the other (the bundled edge
model and the release, alternating, each under a new version number, each with its 64-answer
golden set) and wakes the updater after each. Printed: update time from the moment the check saw
the new version to the swap (median, min-max, and its download / load+validate parts), from
publish to the first answer of the new version, answers lost (exceptions) and late (over the
deadline) in total, and latency percentiles of answers that started within +-0.2 s of a swap
next to those of all other answers of the same run (a ratio measured side by side).

Part 2 -- **the field simulation.** The real cloud service on loopback; the test split streamed
through a router per edge version (1.0.1 bundled, the release) with ``audit_rate`` of its
confident answers also sent to the cloud; printed per version: shadow-sampled agreement with the
cloud (Wilson 95 % interval), the same agreement computed on every confident answer offline
(what the sample estimates), realised escalation and router accuracy at the version's own
threshold for 25 % escalation on validation; then the direct top-1 agreement of the two edge
versions on the whole test split.

Benchmarks are not tests: nothing asserts. Say the machine's load (``uptime``) next to figures.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
os.environ.setdefault("OMP_NUM_THREADS", "1")

from edge_model.runtime import ARTIFACTS_DIR, OnnxClassifier  # noqa: E402
from router import Router  # noqa: E402
from router.ab import wilson  # noqa: E402
from router.policy import parse_policy  # noqa: E402
from router_tools import release as rel  # noqa: E402
from router_tools.commands.demo import release_calibration, release_manifest  # noqa: E402
from router_tools.datasets import load_test  # noqa: E402

BUNDLED = ARTIFACTS_DIR / "edge-int8.json"
CLOUD = REPO / "cloud_service" / "artifacts" / "cloud-fp32.json"
WINDOW_S = 0.2  # answers starting this close to a swap count as "during the swap"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _wait(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not seen within {timeout} s")
        time.sleep(0.002)


def _versioned(manifest: Path, folder: Path, version: str) -> Path:
    """``manifest``'s model under another version number (same bytes: only the manifest differs)."""
    m = json.loads(manifest.read_text())
    folder = folder / m["sha256"][:12]  # one folder per model: both ship a file named edge-int8.onnx
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / m["file"]).exists():
        shutil.copy(manifest.parent / m["file"], folder / m["file"])
    m["version"] = version
    path = folder / f"{version}.json"
    path.write_text(json.dumps(m))
    return path


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


# ---------------------------------------------------------------------- part 1


def swaps(release: Path, updates: int, threads: int, deadline_ms: float, images) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-update-") as tmp:
        tmp = Path(tmp)
        repo = rel.Repo.at(tmp / "repo")
        rel.create_keys(repo)
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(repo.public)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        models = [BUNDLED, release]
        goldens = {m: rel.golden_bytes(*rel.golden_from_test_split(m, 64)) for m in models}
        pol = parse_policy({"mode": "edge_only", "decision_log": False, "default_deadline_ms": deadline_ms,
                            "updates": {"enabled": True, "url": url, "root": str(repo.trust_anchor),
                                        "dir": str(tmp / "device"), "check_interval_s": 3600}})
        rows: list[tuple[float, float, str]] = []  # (start, ms, version)
        errors: list[str] = []
        stop = threading.Event()
        lock = threading.Lock()
        router = Router(pol)
        up = router.updater
        _wait(lambda: up.checks >= 1 and not up._cycle_lock.locked(), 30, "the first check")

        def work(k: int) -> None:
            i = k * 1009
            while not stop.is_set():
                img = images[i % len(images)]
                i += 1
                t0 = time.perf_counter()
                try:
                    p = router.predict(img)
                except Exception as exc:  # noqa: BLE001 -- a lost answer is what this counts
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    rows.append((t0, (time.perf_counter() - t0) * 1000.0, p.model_version))

        pool = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(threads)]
        for t in pool:
            t.start()
        timings, publish_ms, swapped_at = [], [], []
        try:
            time.sleep(0.5)  # a baseline of answers before the first swap
            for n in range(updates):
                version = f"2.0.{n + 1}"
                manifest = _versioned(models[(n + 1) % 2], tmp / "cand", version)  # the release first
                rel.publish(repo, manifest, golden=goldens[models[(n + 1) % 2]])
                t_pub = time.perf_counter()
                up.wake()
                _wait(lambda: router.stats()["edge"]["version"] == version, 60, f"the swap to {version}")
                t_first = None
                _wait(lambda: any(v == version for _, _, v in rows[-threads * 4:]), 30, "an answer of it")
                with lock:
                    t_first = min(s + ms / 1000.0 for s, ms, v in rows if v == version)
                publish_ms.append((t_first - t_pub) * 1000.0)
                t = up.updates[-1]
                timings.append({k: (t[k] - t["seen"]) * 1000.0 for k in ("downloaded", "validated", "swapped")})
                swapped_at.append(time.perf_counter() - (time.monotonic() - t["swapped"]))
                time.sleep(1.0)  # answers after it, before the next (and outside its window)
        finally:
            stop.set()
            for t in pool:
                t.join(10)
            router.close()
            httpd.shutdown()
            httpd.server_close()
        near = [ms for s, ms, _ in rows if any(abs(s - w) <= WINDOW_S for w in swapped_at)]
        far = [ms for s, ms, _ in rows if all(abs(s - w) > WINDOW_S for w in swapped_at)]
        return {"timings": timings, "publish_ms": publish_ms, "answers": len(rows), "errors": errors,
                "late": sum(ms > deadline_ms for _, ms, _ in rows), "near": near, "far": far}


# ---------------------------------------------------------------------- part 2


def field(release: Path, n: int, audit_rate: float) -> dict:
    from cloud_service.launch import LocalService

    test = load_test()
    images, labels = list(test.images[:n]), test.labels[:n]
    cloud = OnnxClassifier(CLOUD)
    cloud_top = cloud.predict_proba(cloud.preprocess_batch(images)).argmax(axis=1)
    out = {"n": n, "versions": {}}
    tops = {}
    with LocalService() as svc:
        for manifest in (BUNDLED, release):
            model = OnnxClassifier(manifest)
            x = model.preprocess_batch(images)
            probs = model.predict_proba(x)
            tops[model.version] = probs.argmax(axis=1)
            cal = release_calibration(manifest)  # its manifest's, else 25 % on validation
            pol = parse_policy({"decision_log": False, "default_deadline_ms": 5000,
                                "confidence_threshold": cal["threshold"], "audit_rate": audit_rate,
                                "audit_queue": 10_000, "cloud": {"endpoints": [{"url": svc.url, "name": "svc"}],
                                                                 "per_try_timeout_ms": 5000}})
            import random

            t0 = time.perf_counter()
            with Router(pol, edge_model=model, rng=random.Random(1)) as r:
                preds = [r.predict(img) for img in images]
                _wait(lambda: r.stats()["field"]["audits_pending"] == 0, 120, "the audits")
                v = r.stats()["field"]["versions"][model.version]
            confident = probs.max(axis=1) >= cal["threshold"]
            full = float((tops[model.version][confident] == cloud_top[confident]).mean())
            a = v["audits"]
            audited = a["sent"] - a["failed"]
            out["versions"][model.version] = {
                "threshold": cal["threshold"], "audited": audited, "agreed": a["agreed"],
                "agreement": v["agreement"], "ci": wilson(a["agreed"], audited, 0.95) if audited else None,
                "agreement_all_confident": full, "confident": int(confident.sum()),
                "escalation": v["escalation_rate"],
                "accuracy": float(np.mean([p.class_index == y for p, y in zip(preds, labels)])),
                "edge_accuracy": float((tops[model.version] == labels).mean()),
                "seconds": time.perf_counter() - t0}
    a, b = list(tops)
    out["direct"] = {"pair": (a, b), "agreement": float((tops[a] == tops[b]).mean())}
    out["cloud_accuracy"] = float((cloud_top == labels).mean())
    return out


# ---------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", type=Path, help="release manifest (default: edge 1.1.0 shipped under "
                                                 "router_tools/data/releases, else the bundled model re-versioned)")
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--deadline-ms", type=float, default=150.0)
    ap.add_argument("--images", type=int, default=10_000, help="test images streamed per version in part 2")
    ap.add_argument("--audit-rate", type=float, default=0.1)
    ap.add_argument("--quick", action="store_true", help="4 updates, 2000 images")
    ap.add_argument("--skip-field", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.updates, args.images = min(args.updates, 4), min(args.images, 2000)
    with tempfile.TemporaryDirectory() as tmp:
        release, stand_in = (args.release, False) if args.release else release_manifest(tmp)
        release = Path(release)
        rv = json.loads(release.read_text())["version"]
        print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min) on "
              f"{os.cpu_count()} cores; release {rv}: {release}{' (STAND-IN: bundled re-versioned)' if stand_in else ''}")
        images = list(load_test().images[:2000])
        s = swaps(release, args.updates, args.threads, args.deadline_ms, images)
        sw = [t["swapped"] for t in s["timings"]]
        dl = [t["downloaded"] for t in s["timings"]]
        lv = [t["validated"] - t["downloaded"] for t in s["timings"]]
        print(f"\n1. {args.updates} updates under {args.threads} predicting threads (edge_only, deadline "
              f"{args.deadline_ms:g} ms)")
        print(f"   check saw it -> swapped: median {statistics.median(sw):.0f} ms (min {min(sw):.0f}, max {max(sw):.0f}); "
              f"download median {statistics.median(dl):.0f} ms, load+validate median {statistics.median(lv):.0f} ms")
        print(f"   publish -> first answer of the new version: median {statistics.median(s['publish_ms']):.0f} ms "
              f"(min {min(s['publish_ms']):.0f}, max {max(s['publish_ms']):.0f})")
        print(f"   answers {s['answers']}: lost {len(s['errors'])}, late {s['late']}")
        near, far = s["near"], s["far"]
        print(f"   latency ms, answers starting within {WINDOW_S} s of a swap ({len(near)}) vs the others ({len(far)}): "
              f"p50 {pct(near, 50):.2f} vs {pct(far, 50):.2f}, p99 {pct(near, 99):.2f} vs {pct(far, 99):.2f} "
              f"(x{pct(near, 99) / pct(far, 99):.2f}), max {max(near, default=0):.1f} vs {max(far, default=0):.1f}")
        result = {"swaps": {k: v for k, v in s.items() if k not in ("near", "far")}}
        if not args.skip_field:
            f = field(release, args.images, args.audit_rate)
            print(f"\n2. field simulation: {f['n']} test images per version, audit_rate {args.audit_rate:g}, real service "
                  f"(cloud accuracy {f['cloud_accuracy']:.2%})")
            for v, d in f["versions"].items():
                lo, hi = d["ci"] or (float("nan"), float("nan"))
                print(f"   edge {v}: shadow agreement {d['agreed']}/{d['audited']} = {d['agreement']:.2%} "
                      f"[{lo:.2%}, {hi:.2%}]; all {d['confident']} confident answers: {d['agreement_all_confident']:.2%}")
                print(f"      threshold {d['threshold']:.4g}: escalation {d['escalation']:.2%}, router accuracy "
                      f"{d['accuracy']:.2%} (edge alone {d['edge_accuracy']:.2%})")
            a, b = f["direct"]["pair"]
            print(f"   direct top-1 agreement {a} vs {b} on the test split: {f['direct']['agreement']:.2%}")
            result["field"] = f
        print(f"load after: {os.getloadavg()[0]:.2f}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
