"""``hybrid-router predict IMAGE... [--config] [--privacy] [--deadline-ms N] [--mode M] [--progressive] [--json]``

``--progressive``: the edge's answer is printed at once, then the cloud's refinement (or why the
first answer stands) with its latency -- :meth:`router.Router.predict_progressive`."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (default: the shipped sample images)")
    p.add_argument("--config", help="routing policy YAML (default: $HYBRID_ROUTER_POLICY, else the policy packaged with the client)")
    p.add_argument("--privacy", action="store_true", help="answer on this device only; nothing leaves it")
    p.add_argument("--deadline-ms", type=_positive_ms, help="latency budget per image")
    p.add_argument("--mode", choices=["prefer_edge", "edge_only", "prefer_cloud", "cloud_only"])
    p.add_argument("--progressive", action="store_true",
                   help="print the edge's answer at once, then the cloud's refinement when it lands")
    p.add_argument("--json", action="store_true", help="one JSON object per line (with --progressive: one per "
                   "answer, 'stage' first or final)")


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
                if args.progressive:
                    _progressive(router, path, args)
                    continue
                p = router.predict(path, deadline_ms=args.deadline_ms, privacy=args.privacy or None, mode=args.mode)
            except RouterError as exc:
                status = 1
                category = getattr(getattr(exc, "cloud_error", None), "category", None)
                if args.json:
                    print(json.dumps({"image": str(path), "error": type(exc).__name__, "message": str(exc),
                                      "cloud_failure": category}))
                else:
                    # per-image failures go to stderr (the answers stay on stdout); exit status 1
                    print(f"hybrid-router predict: {path}: {type(exc).__name__}" + (f" (cloud {category})" if category else "")
                          + f": {exc}", file=sys.stderr)
                continue
            if args.json:
                print(json.dumps({"image": str(path), **p.model_dump(mode="json")}))
            else:
                _line(path.name, p)
    return status


def _line(name: str, p) -> None:
    flag = " (fallback)" if p.fallback else ""
    print(f"{name:32s}  {p.label:12s} {p.confidence:6.1%}  {p.source:5s} {p.reason.value}{flag}"
          f"  edge {p.timings.edge_ms:.2f} ms  cloud {p.timings.cloud_ms:.1f} ms  total {p.timings.total_ms:.1f} ms")
    if p.cloud_failure is not None:  # why the escalation failed, in the operator's words
        print(f"{'':32s}  cloud failed ({p.cloud_failure.category}): {p.cloud_failure.message}")


def _progressive(router, path, args) -> None:
    """The first answer now (flushed, so a pipe sees it before the refinement), then the final one."""
    import json
    import sys

    h = router.predict_progressive(path, deadline_ms=args.deadline_ms, privacy=args.privacy or None, mode=args.mode)
    if not h.refining:  # nothing to refine (confident, privacy, ...): one answer, its reason says why
        if args.json:
            print(json.dumps({"image": str(path), "stage": "final", "refining": False,
                              **h.first.model_dump(mode="json")}), flush=True)
        else:
            _line(path.name, h.first)
        return
    first = h.first
    if args.json:
        print(json.dumps({"image": str(path), "stage": "first", "refining": True, **first.model_dump(mode="json")}),
              flush=True)
    else:
        _line(path.name, first)  # reason "provisional": the refinement is on its way
        sys.stdout.flush()
    p = h.final()
    after_ms = p.timings.total_ms - first.timings.total_ms
    if args.json:
        print(json.dumps({"image": str(path), "stage": "final", "refining": True, "after_first_ms": round(after_ms, 3),
                          **p.model_dump(mode="json")}), flush=True)
    elif p.source == "cloud":
        changed = "changed" if p.class_index != first.class_index else "same"
        print(f"{'':32s}  -> {p.label:12s} {p.confidence:6.1%}  cloud {p.reason.value} ({changed})  "
              f"refined in {p.timings.total_ms:.1f} ms (+{after_ms:.1f} ms after the first)", flush=True)
    else:
        why = f" ({p.cloud_failure.category}): {p.cloud_failure.message}" if p.cloud_failure is not None else ""
        print(f"{'':32s}  -> first answer stands: {p.reason.value} after {p.timings.total_ms:.1f} ms{why}",
              flush=True)


def _positive_ms(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 ms, got {text}")
    return value
