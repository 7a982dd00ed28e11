"""``hybrid-router release``: the operator's signed edge-model release channel (release extra).

::

    hybrid-router release keys --repo rel/                       # once: four ed25519 keys, first metadata
    hybrid-router release publish --repo rel/ --manifest m.json --rollout 0.05
    hybrid-router release publish --repo rel/ --manifest m.json --rollout 0.25   # widen the same release
    hybrid-router release refresh --repo rel/                    # re-sign timestamp/snapshot before expiry
    hybrid-router release rotate-key timestamp --repo rel/
    hybrid-router release status --repo rel/
    python -m http.server -d rel/public 8080                     # any static file server publishes it

Private keys stay in ``rel/keys`` (or ``--keys DIR``, e.g. removable media); only ``rel/public``
is served. Devices trust ``rel/public/metadata/1.root.json``, shipped with the app.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--repo", required=True, metavar="DIR", help="release repository folder (public/ is served)")
        q.add_argument("--keys", metavar="DIR", help="folder of the private keys (default: DIR/keys)")

    q = sub.add_parser("keys", help="generate root/targets/snapshot/timestamp keys and the first metadata")
    common(q)
    q = sub.add_parser("publish", help="sign a new release (manifest + ONNX + golden set) or change its rollout share")
    common(q)
    q.add_argument("--manifest", required=True, help="edge model manifest; its ONNX file sits next to it")
    q.add_argument("--rollout", type=float, default=1.0, help="share of devices that take it, 0..1 (default 1)")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--golden", metavar="NPZ", help="golden set: arrays x (float32 N,1,H,W) and labels (int N)")
    g.add_argument("--golden-samples", type=int, default=64,
                   help="build the golden set from the first N test images and this model's answers (default 64)")
    g.add_argument("--no-golden", action="store_true", help="ship no golden set")
    q.add_argument("--golden-min-agreement", type=float, default=0.95,
                   help="share of the golden set a device must reproduce (default 0.95: INT8 kernels differ by CPU)")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--target-escalation", type=float, metavar="SHARE",
                   help="calibrate on the validation split: the threshold escalating this share travels with the "
                        "release (manifest calibration; devices use it unless updates.calibration: policy)")
    g.add_argument("--threshold", type=float, help="ship this threshold, with the escalation it gives on validation")
    q.add_argument("--delta-from", action="append", default=[], metavar="VERSION",
                   help="also ship a zstd patch from this earlier release (repeatable)")
    q.add_argument("--timestamp-days", type=float, help="timestamp lifetime (default 7)")
    q = sub.add_parser("refresh", help="re-sign snapshot and timestamp with a fresh expiry")
    common(q)
    q.add_argument("--timestamp-days", type=float, help="timestamp lifetime (default 7)")
    q = sub.add_parser("rotate-key", help="replace a role's key (root signs the new root)")
    q.add_argument("role", choices=["root", "targets", "snapshot", "timestamp"])
    common(q)
    q = sub.add_parser("status", help="the releases in the channel and the timestamp's expiry")
    common(q)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from router_tools import release as rel

    repo = rel.Repo.at(args.repo, args.keys)
    if args.action == "keys":
        ids = rel.create_keys(repo)
        for role, keyid in ids.items():
            print(f"{role:9} {keyid}")
        print(f"private keys: {repo.keys_dir} (0600; keep them offline)")
        print(f"serve: {repo.public}   ship with the app: {repo.trust_anchor}")
    elif args.action == "publish":
        golden = None
        if args.golden:
            golden = Path(args.golden).read_bytes()
        elif not args.no_golden and args.golden_samples > 0:
            golden = rel.golden_bytes(*rel.golden_from_test_split(Path(args.manifest), args.golden_samples))
        calibration = None
        if args.target_escalation is not None or args.threshold is not None:
            calibration = rel.calibrate_on_validation(Path(args.manifest), target_escalation=args.target_escalation,
                                                      threshold=args.threshold)
            print(f"calibration on validation: threshold {calibration['threshold']:g}, escalation "
                  f"{calibration['expected_escalation']:.1%}")
        entry = rel.publish(repo, args.manifest, rollout=args.rollout, golden=golden,
                            golden_min_agreement=args.golden_min_agreement, timestamp_days=args.timestamp_days,
                            delta_from=tuple(args.delta_from), calibration=calibration)
        print(f"published {entry['version']} to {entry['rollout']:.0%} of devices "
              f"(targets v{entry['targets_version']}, golden set: {'yes' if entry['golden'] else 'no'}, "
              f"deltas from: {', '.join(entry.get('deltas', {})) or 'none'})")
    elif args.action == "refresh":
        print(f"timestamp v{rel.refresh(repo, timestamp_days=args.timestamp_days)}")
    elif args.action == "rotate-key":
        out = rel.rotate_key(repo, args.role)
        print(f"{out['role']} key is now {out['keyid']} (root v{out['root_version']}); old key in {repo.keys_dir / 'retired'}")
    else:
        print(json.dumps(rel.status(repo), indent=2))
    return 0
