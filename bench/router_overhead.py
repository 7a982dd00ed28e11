"""What the router costs on its hot path: confident ``predict()`` vs the raw edge ``session.run``.

Both sides get the same preprocessed array (normalised float32 ``[1, 28, 28]``) of test images
the edge model is confident about, so the router answers locally (reason ``confident``) and no
network is involved. Rounds of the variants are interleaved in a random order so that machine
noise hits them alike; the result is printed as ratios of medians. Goal: predict / raw <= 1.5.

    .venv/bin/python bench/router_overhead.py [--rounds 30] [--per-round 200] [--json out.json]

Variants:
  raw       edge.session.run(["logits"], {"input": x[None]})       the floor: ONNX Runtime alone
  proba     edge.predict_proba(x[None])                             + temperature softmax
  predict   router.predict(x, normalised=True)                      the whole confident path
  apredict  await router.apredict(x, normalised=True) in one loop   the async front-end (one thread hop)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--per-round", type=int, default=200, help="calls per variant per round")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)

    from router_tools.datasets import load_test
    from edge_model.preprocess import preprocess
    from router import Router
    from router.policy import parse_policy

    router = Router(parse_policy({"confidence_threshold": 0.5, "decision_log": False,
                                  "cloud": {"endpoints": [{"url": "http://127.0.0.1:9"}]}}))
    edge = router.edge_model
    test = load_test()
    xs = np.stack([preprocess(img, edge.preprocess_config) for img in test.images[:2000]])
    conf = edge.predict_proba(xs[:, None] if xs.ndim == 3 else xs).max(axis=1)
    confident = xs[conf >= 0.5][:64]  # [k, 1, 28, 28]
    if len(confident) == 0:
        print("no confident images for this edge model", file=sys.stderr)
        return 1
    session, name, out = edge.session, edge.input_name, [edge.manifest.output_name]
    batches = [c[None] for c in confident]  # [1, 1, 28, 28] views for the raw call

    def run_raw(n):
        for i in range(n):
            session.run(out, {name: batches[i % len(batches)]})

    def run_proba(n):
        for i in range(n):
            edge.predict_proba(batches[i % len(batches)])

    def run_predict(n):
        for i in range(n):
            p = router.predict(confident[i % len(confident)], normalised=True)
        assert p.source == "edge" and p.reason.value == "confident"

    loop = asyncio.new_event_loop()

    def run_apredict(n):
        async def go():
            for i in range(n):
                await router.apredict(confident[i % len(confident)], normalised=True)

        loop.run_until_complete(go())

    variants = {"raw": run_raw, "proba": run_proba, "predict": run_predict, "apredict": run_apredict}
    for fn in variants.values():  # warm-up
        fn(50)
    per_call: dict[str, list[float]] = {k: [] for k in variants}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(variants)
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            variants[k](args.per_round)
            per_call[k].append((time.perf_counter() - t0) / args.per_round * 1e6)
    loop.close()
    router.close()

    med = {k: statistics.median(v) for k, v in per_call.items()}
    # Per-round ratios (same round, same machine state) are more robust than a ratio of medians.
    ratio = {k: statistics.median([a / b for a, b in zip(per_call[k], per_call["raw"])]) for k in variants}
    result = {"median_us": med, "ratio_to_raw": ratio, "rounds": args.rounds, "per_round": args.per_round,
              "edge_model": f"{edge.name} {edge.version} ({edge.manifest.precision})"}
    print(f"edge model: {result['edge_model']}; {args.rounds} interleaved rounds x {args.per_round} calls; batch 1; 1 thread")
    print(f"{'variant':10s} {'median us/call':>15s} {'x raw (median of per-round ratios)':>36s}")
    for k in variants:
        print(f"{k:10s} {med[k]:15.1f} {ratio[k]:36.2f}")
    goal = ratio["predict"] <= 1.5
    print(f"goal predict/raw <= 1.5: {'met' if goal else 'NOT met'} ({ratio['predict']:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
