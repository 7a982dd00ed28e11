"""``hybrid-router advise``: measure both sides on this machine, walk the device-vs-server checklist,
recommend edge-only, cloud-only or hybrid, and write the policy patch.

::

    hybrid-router advise                                   # starts the real service on loopback
    hybrid-router advise --cloud-url http://10.0.0.5:8000 --requests-per-day 200000 --price-per-1k-calls 0.4
    hybrid-router advise --offline --updates-per-month 1 --write config/policy.yaml

Measured here: the edge model's file size, load time (verify + session + warm-up), batch-1 latency
(``predict_proba`` on one preprocessed image) and the process RSS growth of loading it; the cloud
endpoint's batch-1 round trip (one v2 request per image, through the router's own client) and its
throughput (64 images per request on one connection); with labeled data each side's accuracy and
the router's accuracy/escalation curve (:mod:`router_tools.thresholds`). What cannot be measured
(offline, privacy, update cadence, volume, price, stage) comes from flags.

The checklist is the product brief's: every answer leans device, server or neither; privacy is a
hard constraint (edge-only); when most answers point one way that is the answer, when split the
hybrid. A device-leaning answer still escalates when the edge alone is further than
``--max-accuracy-drop`` below the cloud (the cascade keeps accuracy and works offline); a
server-leaning one keeps the edge as fallback (``prefer_cloud``) when offline use is required.
Loopback round trips understate a real network: ``--assume-network-ms`` adds the expected one
(the brief's figures: regional cloud 30-100 ms, central 50-200 ms).
"""

from __future__ import annotations

import argparse

MODEL_SIZE_LIMIT_MB = 20.0  # the brief: "is the model over 20 MB?" -> server
FREQUENT_UPDATES_PER_MONTH = 4.0  # weekly or more often counts as frequent
MODEST_REQUESTS_PER_DAY = 100_000  # below this the server's per-call cost stays small


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("what is measured")
    m.add_argument("--cloud-url", help="the cloud endpoint to measure (default: start the real service on loopback)")
    m.add_argument("--cloud-model", default="fashion-mnist", help="model name on the service (default fashion-mnist)")
    m.add_argument("--api-key-env", help="environment variable holding the service's API key")
    m.add_argument("--edge-manifest", help="edge model manifest (default: the policy's edge.manifest or the shipped INT8)")
    m.add_argument("--data", default="validation", metavar="SPLIT|DIR|CSV",
                   help="labeled data for accuracies and the curve: validation (default), test, a folder or CSV, or none")
    m.add_argument("--limit", type=int, help="use only the first N labeled images")
    m.add_argument("--rounds", type=int, default=200, help="batch-1 calls timed on each side (default 200)")

    q = p.add_argument_group("the checklist (what cannot be measured)")
    q.add_argument("--latency-slo-ms", type=float, default=100.0, help="latency the product needs (default 100 ms)")
    q.add_argument("--offline", action="store_true", help="the product must work offline")
    q.add_argument("--privacy-hard", action="store_true", help="privacy is a hard requirement (nothing leaves the device)")
    q.add_argument("--updates-per-month", type=float, default=0.0, help="expected model updates per month")
    q.add_argument("--requests-per-day", type=float, help="expected request volume")
    q.add_argument("--price-per-1k-calls", type=float, default=0.0, help="cloud price per 1,000 calls (any currency)")
    q.add_argument("--early-development", action="store_true", help="the product is in early development")
    q.add_argument("--assume-network-ms", type=float, default=0.0,
                   help="add this round trip to the measured cloud latency (loopback measures none)")
    q.add_argument("--max-accuracy-drop", type=float, default=0.5, metavar="PT",
                   help="accuracy the product may give up vs cloud-only, percentage points (default 0.5)")

    o = p.add_argument_group("output")
    o.add_argument("--config", metavar="POLICY", help="policy to patch (default: the --write file, else config/policy.yaml)")
    o.add_argument("--write", metavar="POLICY", help="apply the recommended patch to this policy file")
    o.add_argument("--json", metavar="PATH", help="write measurements and recommendation as JSON")


def run(args: argparse.Namespace) -> int:
    from router.errors import ConfigError

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1; got {args.limit}")
    if args.rounds < 5:
        raise ConfigError(f"--rounds must be >= 5; got {args.rounds}")
    if args.price_per_1k_calls < 0 or args.updates_per_month < 0 or args.assume_network_ms < 0:
        raise ConfigError("--price-per-1k-calls, --updates-per-month and --assume-network-ms must be >= 0")
    measured = measure(args)
    rec = recommend(measured, args)
    _report(measured, rec, args)
    return 0


# ----------------------------------------------------------------------------- measuring


def _rss_bytes():
    """Resident set size of this process (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            import os

            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _pct(values, q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def measure(args: argparse.Namespace) -> dict:
    import contextlib
    import gc
    import time
    from pathlib import Path

    import numpy as np
    import onnxruntime  # noqa: F401  (imported before the RSS baseline: the delta is the model's)

    from edge_model.runtime import DEFAULT_EDGE_MANIFEST, EdgeModel
    from router.policy import DEFAULT_POLICY_PATH, load_policy
    from router_tools import thresholds as cal
    from router_tools.datasets import load_validation
    from router_tools.labeled import SHIPPED_SPLITS, load_labeled
    from router_tools.scoring import V2BatchClient, model_input, model_probs

    policy = load_policy(Path(args.config or args.write or DEFAULT_POLICY_PATH))
    manifest = Path(args.edge_manifest or policy.edge.manifest or DEFAULT_EDGE_MANIFEST)
    out: dict = {"edge": {}, "cloud": {}, "data": None}

    # ---- edge: load (first load carries the RSS growth), size, batch-1 latency
    gc.collect()
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    edge = EdgeModel(manifest)
    load_s = time.perf_counter() - t0
    rss1 = _rss_bytes()
    loads = [load_s]
    for _ in range(2):  # two more loads: the median is less at the mercy of a cold file cache
        t0 = time.perf_counter()
        EdgeModel(manifest)
        loads.append(time.perf_counter() - t0)
    e = out["edge"]
    e.update(name=edge.name, version=edge.version, manifest=str(manifest),
             size_mb=edge.model_path.stat().st_size / 1e6, load_ms=float(np.median(loads)) * 1000,
             rss_mb=(rss1 - rss0) / 1e6 if rss0 is not None and rss1 is not None else None)

    data = None
    if args.data != "none":
        split = args.data if args.data in SHIPPED_SPLITS else None
        data = load_labeled(None if split else args.data, split=split or "validation", labels=edge.labels,
                            config=edge.preprocess_config, limit=args.limit)
    pixels = data.pixels if data is not None else load_validation().images[:256]
    x = model_input(pixels[: args.rounds], edge.preprocess_config)
    for i in range(min(10, len(x))):
        edge.predict_proba(x[i:i + 1])
    times = []
    for i in range(args.rounds):
        xi = x[i % len(x)][None]
        t0 = time.perf_counter()
        edge.predict_proba(xi)
        times.append((time.perf_counter() - t0) * 1000)
    e.update(p50_ms=_pct(times, 50), p95_ms=_pct(times, 95), calls=args.rounds)

    # ---- cloud: batch-1 round trip and batched throughput, through the router's client
    with contextlib.ExitStack() as stack:
        url = args.cloud_url
        if url is None:
            from cloud_service.launch import LocalService

            url = stack.enter_context(LocalService()).url
        c = out["cloud"]
        c.update(url=url, local=args.cloud_url is None, network_ms=args.assume_network_ms, size_mb=None)
        if args.cloud_url is None:  # the service started here serves the shipped cloud model: its size is known
            from edge_model.manifest import Manifest

            from cloud_service.settings import DEFAULT_MANIFEST as cm  # the service itself started from it
            if cm.is_file():
                c["size_mb"] = (cm.parent / Manifest.load(cm).file).stat().st_size / 1e6
        single = stack.enter_context(V2BatchClient(url, args.cloud_model, api_key_env=args.api_key_env, batch_size=1,
                                                   classes=len(edge.labels)))
        stamps = []
        warm = pixels[:5]
        single.predict_proba(warm, edge.preprocess_config)  # connection, metadata, server warm-up
        timed = pixels[np.arange(args.rounds) % len(pixels)]
        t_start = time.perf_counter()
        _, remote = single.predict_proba(timed, edge.preprocess_config,
                                         progress=lambda done, total: stamps.append(time.perf_counter()))
        rtt = np.diff(np.concatenate(([t_start], stamps))) * 1000
        c.update(model=f"{remote.model} {remote.version}", p50_ms=_pct(rtt, 50), p95_ms=_pct(rtt, 95), calls=len(rtt))
        batched = stack.enter_context(V2BatchClient(url, args.cloud_model, api_key_env=args.api_key_env, batch_size=64,
                                                    classes=len(edge.labels)))
        scored = pixels if data is not None else pixels[:256]
        batched.predict_proba(scored[:64], edge.preprocess_config)  # warm
        t0 = time.perf_counter()
        cloud_probs, _ = batched.predict_proba(scored, edge.preprocess_config)
        c.update(throughput_ips=len(scored) / (time.perf_counter() - t0), throughput_batch=64)

    if data is not None:
        edge_probs = model_probs(edge, data.pixels)
        s = cal.sweep(edge_probs, cloud_probs, data.labels)
        curve = []
        for share in (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 1.0):
            ch = cal.by_escalation(s, share)
            curve.append({"escalation": ch.point.escalation, "threshold": ch.threshold, "accuracy": ch.point.accuracy})
        try:
            pick = cal.by_accuracy_drop(s, args.max_accuracy_drop)
            hybrid = {"threshold": pick.threshold, "escalation": pick.point.escalation, "accuracy": pick.point.accuracy}
        except cal.CalibrationError:
            hybrid = None
        out["data"] = {"name": data.name, "n": s.n, "edge_accuracy": s.edge_accuracy,
                       "cloud_accuracy": s.cloud_accuracy, "curve": curve, "hybrid": hybrid}
    return out


# ----------------------------------------------------------------------------- the checklist


def recommend(m: dict, args: argparse.Namespace) -> dict:
    """The checklist answered from measurements ``m`` and flags, and the recommendation (pure)."""
    e, c, d = m["edge"], m["cloud"], m["data"]
    slo = args.latency_slo_ms
    cloud_p95 = c["p95_ms"] + args.assume_network_ms
    net = f" + {args.assume_network_ms:g} ms assumed network" if args.assume_network_ms else " (loopback: no network)"
    answers = []  # (question, lean: "device" | "server" | None, evidence)

    edge_ok, cloud_ok = e["p95_ms"] <= slo, cloud_p95 <= slo
    lean = "device" if edge_ok and not cloud_ok else ("server" if cloud_ok and not edge_ok else None)
    answers.append((f"latency under {slo:g} ms?", lean,
                    f"edge p95 {e['p95_ms']:.2f} ms, cloud p95 {c['p95_ms']:.2f} ms{net} = {cloud_p95:.2f} ms"
                    + ("" if lean else (" -- both meet it" if edge_ok else " -- neither meets it"))))
    answers.append(("must it work offline?", "device" if args.offline else None,
                    "--offline given" if args.offline else "not required (no --offline)"))
    answers.append(("is privacy a hard requirement?", "device" if args.privacy_hard else None,
                    "--privacy-hard given" if args.privacy_hard else "not hard (no --privacy-hard)"))
    over = e["size_mb"] > MODEL_SIZE_LIMIT_MB
    answers.append((f"is the model over {MODEL_SIZE_LIMIT_MB:g} MB?", "server" if over else "device",
                    f"edge model file {e['size_mb']:.2f} MB, load {e['load_ms']:.0f} ms"
                    + (f" (cloud model {c['size_mb']:.2f} MB)" if c.get("size_mb") else "")
                    + (f", RSS +{e['rss_mb']:.1f} MB" if e.get("rss_mb") is not None else "")))
    frequent = args.updates_per_month >= FREQUENT_UPDATES_PER_MONTH
    answers.append(("are frequent model updates needed?", "server" if frequent else None,
                    f"{args.updates_per_month:g} updates/month (frequent: >= {FREQUENT_UPDATES_PER_MONTH:g})"))
    if args.requests_per_day is None:
        answers.append(("is request volume modest?", None, "volume not given (--requests-per-day)"))
    else:
        modest = args.requests_per_day < MODEST_REQUESTS_PER_DAY
        per_day = args.requests_per_day / 1000 * args.price_per_1k_calls
        answers.append(("is request volume modest?", "server" if modest else "device",
                        f"{args.requests_per_day:,.0f} requests/day (modest: < {MODEST_REQUESTS_PER_DAY:,}); cloud-only "
                        f"{per_day:,.2f}/day at {args.price_per_1k_calls:g} per 1k calls"))
    answers.append(("is the product in early development?", "server" if args.early_development else None,
                    "--early-development given" if args.early_development else "no (no --early-development)"))
    device = sum(1 for _, lean, _ in answers if lean == "device")
    server = sum(1 for _, lean, _ in answers if lean == "server")

    # ---- the verdict
    gap = (d["cloud_accuracy"] - d["edge_accuracy"]) * 100 if d else None
    acc_note = (f"edge {d['edge_accuracy']:.2%} vs cloud {d['cloud_accuracy']:.2%} on {d['name']} (n={d['n']})"
                if d else "no labeled data (--data none): accuracy not measured")
    why = []
    if args.privacy_hard:
        verdict, mode = "edge-only", "edge_only"
        why.append("privacy is a hard requirement: nothing may leave the device (privacy_mode: true)")
    elif device >= server + 2:
        if gap is not None and gap > args.max_accuracy_drop and d.get("hybrid"):
            verdict, mode = "hybrid", "prefer_edge"
            why.append(f"{device} answers lean device, {server} server, but the edge alone is {gap:.2f} pt below the cloud "
                       f"(> {args.max_accuracy_drop:g} pt allowed; {acc_note}): the cascade keeps the accuracy")
        else:
            verdict, mode = "edge-only", "edge_only"
            why.append(f"{device} answers lean device, {server} server; {acc_note}"
                       + (f" ({gap:.2f} pt gap <= {args.max_accuracy_drop:g} pt allowed)" if gap is not None else ""))
    elif server >= device + 2:
        verdict, mode = "cloud-only", "prefer_cloud" if args.offline else "cloud_only"
        why.append(f"{server} answers lean server, {device} device; {acc_note}"
                   + ("; offline use keeps the edge as fallback (prefer_cloud)" if args.offline else ""))
    else:
        verdict, mode = "hybrid", "prefer_edge"
        why.append(f"the answers are split ({device} device, {server} server): the cascade; {acc_note}")

    hybrid = d.get("hybrid") if d else None
    if mode == "prefer_edge" and hybrid:
        threshold, escalation = hybrid["threshold"], hybrid["escalation"]
        why.append(f"threshold {threshold:g}: lowest escalation within {args.max_accuracy_drop:g} pt of cloud-only on "
                   f"{d['name']}: {escalation:.1%} escalated, router accuracy {hybrid['accuracy']:.2%} "
                   f"(cloud-only {d['cloud_accuracy']:.2%})")
    elif mode == "prefer_edge":
        threshold, escalation = None, None
        why.append("threshold: not chosen (no labeled data or no threshold within the allowed drop); run calibrate")
    else:
        threshold = None
        escalation = 0.0 if mode == "edge_only" else 1.0

    # deadline: room for one cloud attempt and a retry at the measured p95, plus the local fallback
    edge_p95, reserve = e["p95_ms"], 3.0
    deadline = None
    if mode != "edge_only":
        need = edge_p95 + 2 * cloud_p95 + reserve
        deadline = float(max(10, -(-need // 10) * 10))  # rounded up to 10 ms
        capped = mode == "prefer_edge" and deadline > slo
        if capped:
            deadline = slo
        why.append(f"deadline {deadline:g} ms: edge p95 {edge_p95:.2f} + 2 x cloud p95 {cloud_p95:.2f} + {reserve:g} ms "
                   f"reserve = {need:.1f} ms" + (f", capped at the {slo:g} ms target (late escalations answer "
                                                 "locally)" if capped else ", rounded up"))

    # expected cost and latency per 1k requests
    share = escalation if escalation is not None else 0.0
    cost_1k = share * args.price_per_1k_calls
    mean_ms = (e["p50_ms"] if mode != "cloud_only" else 0.0) + share * (c["p50_ms"] + args.assume_network_ms)
    edge_part = f"edge p50 {e['p50_ms']:.2f} ms" if mode != "cloud_only" else ""
    cloud_part = f"{share:.1%} x cloud p50 {c['p50_ms'] + args.assume_network_ms:.2f} ms" if share else ""
    why.append(f"per 1k requests: {share * 1000:.0f} cloud calls x {args.price_per_1k_calls:g} per 1k = cost "
               f"{cost_1k:.3g}; latency {mean_ms:.2f} ms per request on average "
               f"({' + '.join(p for p in (edge_part, cloud_part) if p)}) = {mean_ms:.2f} s of waiting per 1k requests")

    changes: dict[tuple[str, ...], object] = {("mode",): mode}
    if args.privacy_hard:
        changes[("privacy_mode",)] = True
    if threshold is not None:
        changes[("confidence_threshold",)] = float(threshold)
    if deadline is not None:
        changes[("default_deadline_ms",)] = deadline
    return {"answers": answers, "device": device, "server": server, "verdict": verdict, "mode": mode,
            "threshold": threshold, "escalation": escalation, "deadline_ms": deadline, "cost_per_1k": cost_1k,
            "mean_latency_ms": mean_ms, "why": why, "changes": changes}


# ----------------------------------------------------------------------------- output


def patch_yaml(changes: dict) -> str:
    from router_tools.policy_edit import yaml_scalar

    return "".join(f"{'.'.join(path)}: {yaml_scalar(v)}\n" for path, v in changes.items())


def _report(m: dict, rec: dict, args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from router.policy import DEFAULT_POLICY_PATH
    from router_tools.policy_edit import edit_policy, unified_diff, write_atomic

    e, c, d = m["edge"], m["cloud"], m["data"]
    print("measured on this machine")
    rss = f", RSS +{e['rss_mb']:.1f} MB" if e.get("rss_mb") is not None else ", RSS not measured (no /proc)"
    print(f"  edge  {e['name']} {e['version']}: file {e['size_mb']:.2f} MB, load {e['load_ms']:.0f} ms{rss}, "
          f"batch-1 p50 {e['p50_ms']:.3f} ms / p95 {e['p95_ms']:.3f} ms ({e['calls']} calls)")
    where = "local service on loopback" if c["local"] else c["url"]
    print(f"  cloud {c['model']} ({where}): batch-1 round trip p50 {c['p50_ms']:.2f} ms / p95 {c['p95_ms']:.2f} ms "
          f"({c['calls']} calls), throughput {c['throughput_ips']:.0f} images/s ({c['throughput_batch']} per request, "
          "one connection)")
    if c["local"] and not args.assume_network_ms:
        print("  note: loopback has no network; a regional cloud adds 30-100 ms (pass --assume-network-ms)")
    if d:
        print(f"  accuracy on {d['name']} (n={d['n']}): edge {d['edge_accuracy']:.2%}, cloud {d['cloud_accuracy']:.2%}")
        print("  router curve: " + ", ".join(f"{p['escalation']:.0%} -> {p['accuracy']:.2%}" for p in d["curve"]))
    print("checklist")
    for question, lean, evidence in rec["answers"]:
        print(f"  {question:<40} {(lean or '-'):<7} {evidence}")
    print(f"recommendation: {rec['verdict']} (mode {rec['mode']})")
    for line in rec["why"]:
        print(f"  - {line}")
    print("policy patch:")
    for line in patch_yaml(rec["changes"]).splitlines():
        print(f"  {line}")
    if args.write:
        path = Path(args.write)
        old = path.read_text() if path.exists() else Path(DEFAULT_POLICY_PATH).read_text()
        note = (f"Chosen by `hybrid-router advise`: {rec['verdict']}; edge p95 {e['p95_ms']:.2f} ms, cloud p95 "
                f"{c['p95_ms']:.2f} ms" + (f", edge {d['edge_accuracy']:.2%} / cloud {d['cloud_accuracy']:.2%} on "
                                          f"{d['name']}" if d else "") + ".")
        new = edit_policy(old, rec["changes"], source=str(path), notes={("mode",): note})
        if new != old:
            write_atomic(path, new)
        patch = unified_diff(old, new, str(path))
        print(patch, end="")
        print(f"wrote {len(rec['changes'])} settings to {path}")
    if args.json:
        out = {"measured": m, "recommendation": {k: v for k, v in rec.items() if k != "changes"},
               "patch": {".".join(k): v for k, v in rec["changes"].items()}}
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
