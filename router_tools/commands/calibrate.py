"""``hybrid-router calibrate``: choose the confidence threshold from labeled data.

::

    hybrid-router calibrate --target-escalation 0.25 --write config/policy.yaml --plot curve.png
    hybrid-router calibrate --data my_images/ --target-accuracy 0.94 --print-patch
    hybrid-router calibrate --data labels.csv --cloud-url http://127.0.0.1:8000 --max-accuracy-drop 0.2
    hybrid-router calibrate --guarantee-accuracy 0.97 --delta 0.05 --write config/policy.yaml

Edge predictions come from the policy's edge model (default: the shipped INT8 model); cloud
predictions from the cloud model file, or from a running v2 service with ``--cloud-url``.
The threshold is chosen on the calibrated confidences the router will compare with it
(:mod:`router_tools.thresholds`), or with a finite-sample promise on the edge-answered accuracy
and/or the escalation share (:mod:`router_tools.guarantee`); ``--write`` changes only ``confidence_threshold`` in the policy
file, keeping its comments (:mod:`router_tools.policy_edit`).
"""

from __future__ import annotations

import argparse

from router_tools.commands._common import add_data_arguments, shipped_cloud_manifest



def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p, default_split="validation")

    models = p.add_argument_group("models")
    models.add_argument("--config", metavar="POLICY", help="policy to read the edge model from and to patch "
                        "(default: the --write file, else config/policy.yaml)")
    models.add_argument("--edge-manifest", help="edge model manifest (default: the policy's edge.manifest or the shipped INT8)")
    models.add_argument("--cloud-manifest", help="cloud model manifest (default: the one shipped with the server distribution)")
    models.add_argument("--cloud-url", help="score the cloud side through a running v2 service instead of the model file")
    models.add_argument("--cloud-model", default=None, help="model name on the service (default: the policy endpoint's, fashion-mnist)")
    models.add_argument("--api-key-env", help="environment variable holding the service's API key")
    models.add_argument("--batch-size", type=int, default=64, help="images per v2 request with --cloud-url (default 64)")
    models.add_argument("--refit-temperature", action="store_true",
                        help="refit the edge model's temperature on this data before choosing (see --edge-out)")
    models.add_argument("--edge-out", metavar="DIR",
                        help="with --refit-temperature and --write: write the edge model with the new temperature "
                             "here and point the policy's edge.manifest at it")

    group = p.add_argument_group("target (exactly one, or one or both --guarantee-* with --delta)")
    target = group.add_mutually_exclusive_group()
    target.add_argument("--target-escalation", type=float, metavar="SHARE",
                        help="share of requests to escalate, e.g. 0.25")
    target.add_argument("--target-accuracy", type=float, metavar="ACC",
                        help="lowest escalation reaching this router accuracy, e.g. 0.94")
    target.add_argument("--max-accuracy-drop", type=float, metavar="PT",
                        help="lowest escalation within PT percentage points of cloud-only accuracy, e.g. 0.2")
    group.add_argument("--guarantee-accuracy", type=float, metavar="A",
                       help="lowest threshold such that, with probability >= 1-DELTA over this sample, the accuracy "
                            "of edge-answered requests is >= A, e.g. 0.97")
    group.add_argument("--guarantee-escalation", type=float, metavar="E",
                       help="with probability >= 1-DELTA over this sample, the escalation share is <= E, e.g. 0.25")
    group.add_argument("--delta", type=float, default=0.05,
                       help="failure probability of the --guarantee-* promise(s) (default 0.05)")

    out = p.add_argument_group("output")
    out.add_argument("--write", metavar="POLICY", help="write the chosen threshold into this policy YAML")
    out.add_argument("--print-patch", action="store_true", help="print the policy change as a unified diff")
    out.add_argument("--plot", metavar="PNG", help="draw the accuracy-vs-escalation curve here")
    out.add_argument("--json", metavar="PATH", help="write the result as JSON")


def run(args: argparse.Namespace) -> int:
    # typed errors (ConfigError, PlotError, ...) are reported in one line, exit 2, by router_tools.cli
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from edge_model.runtime import DEFAULT_EDGE_MANIFEST, EdgeModel, OnnxClassifier
    from router_tools import thresholds as cal
    from router.errors import ConfigError
    from router_tools.labeled import load_labeled
    from router.policy import DEFAULT_POLICY_PATH, load_policy
    from router_tools.policy_edit import edit_policy, unified_diff, write_atomic
    from router_tools.scoring import V2BatchClient, model_logits, model_probs

    if args.plot:  # before anything is computed or written: a missing extra must not leave half the outputs
        from router_tools.plotting import require_matplotlib

        require_matplotlib()
    console = Console(stderr=False, highlight=False)
    policy_path = Path(args.config or args.write or DEFAULT_POLICY_PATH)
    policy = load_policy(policy_path)
    if args.refit_temperature and args.write and not args.edge_out:
        raise ConfigError(
            "--refit-temperature with --write needs --edge-out DIR: the router reads the temperature from the edge "
            "model's manifest, so the threshold only holds with an edge model that carries the new temperature"
        )
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1; got {args.limit}")
    guaranteed = args.guarantee_accuracy is not None or args.guarantee_escalation is not None
    plain = [a for a in (args.target_escalation, args.target_accuracy, args.max_accuracy_drop) if a is not None]
    if guaranteed == bool(plain):
        raise ConfigError("give one of --target-escalation, --target-accuracy, --max-accuracy-drop, or "
                          "--guarantee-accuracy and/or --guarantee-escalation (with --delta)")

    edge_manifest = Path(args.edge_manifest or policy.edge.manifest or DEFAULT_EDGE_MANIFEST)
    edge = EdgeModel(edge_manifest)
    data = load_labeled(args.data, split=args.split, labels=edge.labels, config=edge.preprocess_config, limit=args.limit)
    console.print(f"data: {data.name}, {len(data)} images")

    logits = model_logits(edge, data.pixels)
    t0 = edge.temperature
    probs0 = cal.apply_temperature(logits, t0)
    ece0 = cal.ece(probs0, data.labels)
    t1 = cal.refit_temperature(logits, data.labels) if args.refit_temperature else t0
    edge_probs = cal.apply_temperature(logits, t1) if args.refit_temperature else probs0
    ece1 = cal.ece(edge_probs, data.labels)

    if args.cloud_url:
        model_name = args.cloud_model or (policy.cloud.endpoints[0].model if policy.cloud.endpoints else "fashion-mnist")
        with V2BatchClient(args.cloud_url, model_name, api_key_env=args.api_key_env, batch_size=args.batch_size,
                           classes=len(edge.labels)) as client:
            cloud_probs, remote = client.predict_proba(data.pixels, edge.preprocess_config)
        cloud_desc = f"{remote.model} {remote.version} via {remote.url} ({remote.datatype})"
    else:
        cloud_manifest = Path(args.cloud_manifest) if args.cloud_manifest else shipped_cloud_manifest()
        cloud = OnnxClassifier(cloud_manifest)
        if tuple(cloud.labels) != tuple(edge.labels):
            raise ConfigError(f"{cloud_manifest}: labels differ from the edge model's ({edge_manifest})")
        cloud_probs = model_probs(cloud, data.pixels)
        cloud_desc = f"{cloud.name} {cloud.version} ({cloud_manifest.name})"

    s = cal.sweep(edge_probs, cloud_probs, data.labels)
    promise = None
    if guaranteed:
        from router_tools.guarantee import certify

        promise = certify(edge_probs.max(axis=1), edge_probs.argmax(axis=1) == data.labels,
                          accuracy=args.guarantee_accuracy, escalation=args.guarantee_escalation, delta=args.delta)
        choice = cal.guaranteed_choice(s, promise)
    else:
        choice = cal.choose(s, target_escalation=args.target_escalation, target_accuracy=args.target_accuracy,
                            max_accuracy_drop=args.max_accuracy_drop)
    current = s.at(policy.confidence_threshold)

    # ---------------------------------------------------------------- summary
    console.print(f"edge:  {edge.name} {edge.version} ({edge_manifest.name}), temperature {t0:.4g}"
                  + (f" -> refit {t1:.4g}" if args.refit_temperature else ""))
    console.print(f"cloud: {cloud_desc}")
    table = Table(title=f"Calibration on {data.name} (n={s.n})", show_lines=False)
    table.add_column("")
    table.add_column("threshold", justify="right")
    table.add_column("escalated", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("vs cloud-only", justify="right")
    table.add_row("edge only", "0", "0.0%", f"{s.edge_accuracy:.2%}", f"{(s.edge_accuracy - s.cloud_accuracy) * 100:+.2f} pt")
    table.add_row("cloud only", "-", "100.0%", f"{s.cloud_accuracy:.2%}", "+0.00 pt")
    table.add_row(f"current policy ({policy_path.name})", f"{policy.confidence_threshold:g}", f"{current.escalation:.1%}",
                  f"{current.accuracy:.2%}", f"{(current.accuracy - s.cloud_accuracy) * 100:+.2f} pt")
    p = choice.point
    table.add_row(f"[bold]chosen: {choice.rule}[/bold]", f"[bold]{choice.threshold:g}[/bold]", f"[bold]{p.escalation:.1%}[/bold]",
                  f"[bold]{p.accuracy:.2%}[/bold]", f"{(p.accuracy - s.cloud_accuracy) * 100:+.2f} pt")
    console.print(table)
    points = Table(title="The trade-off at other escalation rates (same data)")
    for col in ("escalated", "threshold", "accuracy", "vs cloud-only"):
        points.add_column(col, justify="right")
    for share in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5):
        c = cal.by_escalation(s, share)
        points.add_row(f"{c.point.escalation:.1%}", f"{c.threshold:g}", f"{c.point.accuracy:.2%}",
                       f"{(c.point.accuracy - s.cloud_accuracy) * 100:+.2f} pt")
    console.print(points)
    if promise is not None:
        console.print(f"[bold]guarantee:[/bold] {promise.statement()}; router accuracy on this sample "
                      f"{p.accuracy:.2%} ({(p.accuracy - s.cloud_accuracy) * 100:+.2f} pt vs cloud-only)")
        console.print(f"method: {promise.method}; {promise.tested} hypotheses tested without a per-threshold "
                      "correction" + ("; delta split in two for the two promises" if
                                         promise.accuracy is not None and promise.escalation is not None else ""))
    console.print(f"ECE of the edge model: {ece0:.4f}" + (f" -> {ece1:.4f} after refit" if args.refit_temperature else ""))
    if policy.class_thresholds:
        console.print(f"[yellow]note: {policy_path} has class_thresholds {dict(policy.class_thresholds)}; "
                      "they override the global threshold for those classes, so the realised escalation differs[/yellow]")

    # ---------------------------------------------------------------- outputs
    changes: dict[tuple[str, ...], object] = {("confidence_threshold",): choice.threshold}
    written_manifest = None
    if args.refit_temperature and args.edge_out:
        written_manifest = _write_edge_model(edge, edge_manifest, Path(args.edge_out), t1, data.name, ece1)
        changes[("edge", "manifest")] = str(written_manifest.resolve())
        console.print(f"edge model with temperature {t1:.4g} written to {written_manifest}")
    if args.write or args.print_patch:
        old = policy_path.read_text()
        on = "" if args.data else f" on the {data.name}"  # a --data path is in the command already
        note = (f"Chosen by `{command_line(args)}`{on} (n={s.n}, edge model {edge.version}): "
                f"{p.escalation:.1%} escalated, accuracy {p.accuracy:.2%}.")
        if promise is not None:
            note += f" Guarantee: {promise.statement()}."
        new = edit_policy(old, changes, source=str(policy_path), notes={("confidence_threshold",): note})
        if args.print_patch:
            patch = unified_diff(old, new, str(policy_path))
            print(patch, end="") if patch else print(f"# {policy_path}: already up to date")
        if args.write:
            if new != old:
                write_atomic(policy_path, new)
            console.print(f"wrote confidence_threshold: {choice.threshold!r} to {policy_path}")
    if args.plot:
        from router_tools.plotting import plot_curve

        plot_curve(s, args.plot, title=f"Calibration on {data.name}",
                   chosen=(p.escalation, p.accuracy, f"chosen t={choice.threshold:g}"))
        console.print(f"curve: {args.plot}")
    if args.json:
        result = {
            "data": {"name": data.name, "n": s.n},
            "edge": {"name": edge.name, "version": edge.version, "manifest": str(edge_manifest),
                     "temperature": t0, "temperature_refit": t1 if args.refit_temperature else None,
                     "ece": ece0, "ece_refit": ece1 if args.refit_temperature else None,
                     "accuracy": s.edge_accuracy, "written_manifest": str(written_manifest) if written_manifest else None},
            "cloud": {"model": cloud_desc, "accuracy": s.cloud_accuracy},
            "rule": choice.rule,
            "guarantee": None if promise is None else {
                "statement": promise.statement(), "delta": promise.delta, "accuracy": promise.accuracy,
                "escalation": promise.escalation, "answered": promise.answered, "errors": promise.errors,
                "error_bound": promise.error_bound, "escalation_bound": promise.escalation_bound,
                "method": promise.method},
            "threshold": choice.threshold,
            "interval": list(choice.interval),
            "escalation": p.escalation,
            "accuracy": p.accuracy,
            "current_policy": {"path": str(policy_path), "threshold": policy.confidence_threshold,
                               "escalation": current.escalation, "accuracy": current.accuracy},
            "curve": {"escalation": s.escalation.round(6).tolist(), "accuracy": s.accuracy.round(6).tolist()},
        }
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The calibrate command that chose the threshold (what decides it; not where outputs went)."""
    import shlex

    parts = ["hybrid-router", "calibrate"]
    for flag in ("target_escalation", "target_accuracy", "max_accuracy_drop", "guarantee_accuracy",
                 "guarantee_escalation", "data", "limit", "edge_manifest", "cloud_manifest", "cloud_url"):
        value = getattr(args, flag, None)
        if value is not None:
            parts += ["--" + flag.replace("_", "-"), shlex.quote(str(value))]
    if getattr(args, "guarantee_accuracy", None) is not None or getattr(args, "guarantee_escalation", None) is not None:
        parts += ["--delta", f"{args.delta:g}"]
    if args.data is None and args.split != "validation":
        parts += ["--split", args.split]
    if args.refit_temperature:
        parts.append("--refit-temperature")
    return " ".join(parts)


def _write_edge_model(edge, manifest_path, out_dir, temperature: float, data_name: str, ece: float):
    import shutil
    from pathlib import Path

    from router.errors import ConfigError

    out_dir = Path(out_dir)
    src_dir = Path(manifest_path).resolve().parent
    if out_dir.resolve() == src_dir:
        raise ConfigError(f"--edge-out {out_dir}: that is the edge model's own folder; choose another (the shipped "
                          "manifest is not overwritten)")
    out_dir.mkdir(parents=True, exist_ok=True)
    m = edge.manifest
    shutil.copyfile(edge.model_path, out_dir / m.file)
    for extra in (m.twin, m.labels_file):  # the FP32 twin and labels file the manifest names come along
        if extra and (src_dir / extra).is_file():
            shutil.copyfile(src_dir / extra, out_dir / extra)
    metrics = dict(m.metrics)
    metrics["recalibrated"] = {"data": data_name, "temperature_before": m.temperature, "ece": round(ece, 5)}
    new = m.model_copy(update={"temperature": float(temperature), "metrics": metrics})
    dest = out_dir / Path(manifest_path).name
    new.save(dest)
    return dest
