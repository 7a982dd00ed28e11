"""CPython's full garbage collections against predict latency, in one process.

A confident ``predict`` loop (``mode="edge_only"``) for ``--seconds``; ``gc.callbacks`` time every
full (generation 2) collection. Variants: the router's own allocations only (nothing kept), an
application that keeps every answer (``--keep``: a results list), and either after ``gc.freeze()``
once the router is built (``--freeze``: what pre-fork servers do; the router's ~57k objects of
modules and models leave the collector's work).

    .venv/bin/python bench/gc_pauses.py [--keep] [--freeze] [--seconds 15]

Prints the number of predicts, the worst predict and the durations of the full collections.
A full collection stops every thread (it holds the GIL): whatever the deadline, an answer due
during it is late by its length.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep every answer (an application's results list)")
    ap.add_argument("--freeze", action="store_true", help="gc.freeze() after the router is built")
    ap.add_argument("--seconds", type=float, default=15.0)
    args = ap.parse_args()

    from router import Router

    router = Router.from_config()
    x = np.zeros((28, 28), np.uint8)
    router.predict(x, mode="edge_only")
    t = time.perf_counter()
    gc.collect()
    first_full_ms = (time.perf_counter() - t) * 1e3
    if args.freeze:
        gc.freeze()
    pauses: list[float] = []
    started = [0.0]

    def timer(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif info["generation"] == 2:
            pauses.append((time.perf_counter() - started[0]) * 1e3)

    gc.callbacks.append(timer)
    kept = []
    worst, n = 0.0, 0
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        p = router.predict(x, mode="edge_only")
        worst = max(worst, (time.perf_counter() - t) * 1e3)
        n += 1
        if args.keep:
            kept.append(p)
    gc.callbacks.remove(timer)
    shown = ", ".join(f"{v:.1f}" for v in pauses[:10]) + (" ..." if len(pauses) > 10 else "")
    print(f"keep={args.keep} freeze={args.freeze}: {n} predicts, worst predict {worst:.2f} ms; "
          f"a full collection right after construction {first_full_ms:.1f} ms; "
          f"full collections during the loop: {len(pauses)}" + (f" ({shown} ms)" if pauses else ""))


if __name__ == "__main__":
    main()
