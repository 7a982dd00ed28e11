"""``hybrid-router predict IMAGE... [--config] [--privacy] [--deadline-ms N] [--mode M] [--json]``"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (default: the shipped sample images)")
    p.add_argument("--config", help="routing policy YAML (default: config/policy.yaml)")
    p.add_argument("--privacy", action="store_true", help="answer on this device only; nothing leaves it")
    p.add_argument("--deadline-ms", type=float, help="latency budget per image")
    p.add_argument("--mode", choices=["prefer_edge", "edge_only", "prefer_cloud", "cloud_only"])
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from router_tools.datasets import SAMPLES_DIR
    from router import Router, RouterError

    paths = [Path(p) for p in args.images] or sorted(SAMPLES_DIR.glob("*.png")) + sorted(SAMPLES_DIR.glob("*.jpg"))
    if not paths:
        print(f"no images given and no samples in {SAMPLES_DIR}", file=sys.stderr)
        return 2
    status = 0
    with Router.from_config(args.config) as router:
        for path in paths:
            try:
                p = router.predict(path, deadline_ms=args.deadline_ms, privacy=args.privacy or None, mode=args.mode)
            except RouterError as exc:
                status = 1
                category = getattr(getattr(exc, "cloud_error", None), "category", None)
                if args.json:
                    print(json.dumps({"image": str(path), "error": type(exc).__name__, "message": str(exc),
                                      "cloud_failure": category}))
                else:
                    print(f"{path.name:32s}  ERROR {type(exc).__name__}" + (f" (cloud {category})" if category else "")
                          + f": {exc}")
                continue
            if args.json:
                print(json.dumps({"image": str(path), **p.model_dump(mode="json")}))
            else:
                flag = " (fallback)" if p.fallback else ""
                print(f"{path.name:32s}  {p.label:12s} {p.confidence:6.1%}  {p.source:5s} {p.reason.value}{flag}"
                      f"  edge {p.timings.edge_ms:.2f} ms  cloud {p.timings.cloud_ms:.1f} ms  total {p.timings.total_ms:.1f} ms")
                if p.cloud_failure is not None:  # why the escalation failed, in the operator's words
                    print(f"{'':32s}  cloud failed ({p.cloud_failure.category}): {p.cloud_failure.message}")
    return status
