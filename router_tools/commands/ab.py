"""``hybrid-router ab``: compare the arms of a routing A/B test.

::

    hybrid-router ab --stats stats.json                 # json.dump(router.stats(), f) on the device
    hybrid-router ab --stats experiments.json --confidence 0.99

The file is a router's ``stats()`` dumped to JSON, or just its ``stats()["experiments"]``. Per arm:
requests, escalations (Wilson interval), latency percentiles and -- with labels reported through
``Router.record_outcome`` -- accuracy (Wilson interval). Each arm is compared with the first on
accuracy and escalation share with Newcombe's hybrid score interval for a difference of two
proportions (method 10); while that interval contains 0 the difference is reported as not yet
significant. Intervals are recomputed from the counts, so any ``--confidence`` works.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stats", metavar="FILE.json", required=True,
                   help="a router's stats() (or its stats()['experiments']) dumped to JSON")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON instead of text")


def load_experiment(path: str) -> dict:
    from router.errors import ConfigError

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; dump a router's stats() to JSON first") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})") from None
    experiment = data.get("experiments", data) if isinstance(data, dict) else None
    if not isinstance(experiment, dict) or not isinstance(experiment.get("arms"), dict):
        raise ConfigError(f"{path}: no experiment in this file (expected stats()['experiments'] with 'arms'); "
                          "is `experiments:` set in the router's policy?")
    if len(experiment["arms"]) < 2:
        raise ConfigError(f"{path}: the experiment has fewer than two arms; nothing to compare")
    for name, arm in experiment["arms"].items():
        missing = [k for k in ("requests", "escalated") if not isinstance(arm.get(k), int)]
        if missing:
            raise ConfigError(f"{path}: arm {name!r} lacks the counts {missing}")
    return experiment


def run(args: argparse.Namespace) -> int:
    from router.ab import compare, table
    from router.errors import ConfigError

    if not 0 < args.confidence < 1:
        raise ConfigError(f"--confidence must be between 0 and 1, got {args.confidence}")
    experiment = load_experiment(args.stats)
    lines = compare(experiment, args.confidence)
    if args.json:
        print(json.dumps({"experiment": experiment.get("name"), "confidence": args.confidence,
                          "comparison": lines}, indent=2))
        return 0
    print(f"experiment {experiment.get('name', '?')} (assignment by {experiment.get('key', '?')}; "
          f"{args.confidence:.0%} intervals)")
    for line in table(experiment, args.confidence):
        print("  " + line)
    print()
    for line in lines:
        print(line)
    return 0
