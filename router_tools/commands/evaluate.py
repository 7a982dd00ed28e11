"""``hybrid-router eval``: edge-only / cloud-only / router on a labeled set, through the real
router against the real cloud service (started on a free loopback port unless ``--cloud-url``).

::

    hybrid-router eval                                   # the shipped 10k test split
    hybrid-router eval --network wan40 --report eval.md  # over a simulated 40 ms WAN, Markdown + curve
    hybrid-router eval --limit 2000 --outage --json out.json
    hybrid-router eval --models-only                     # accuracy/ECE of the shipped models, no server

With ``--network``/``--rtt-ms``/``--jitter-ms``/``--loss`` (or ``--outage``) the router reaches the
service through a :class:`router_tools.netsim.NetworkProxy` on loopback that applies the profile on
real sockets; the router only sees the proxy's URL. See :mod:`router_tools.evaluation` for what is
measured and how.
"""

from __future__ import annotations

import argparse
import contextlib

from router_tools.commands._common import add_data_arguments, shipped_cloud_manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    from router_tools.netsim.profiles import add_network_arguments

    add_data_arguments(p, default_split="test")

    run = p.add_argument_group("router and service")
    run.add_argument("--config", metavar="POLICY", help="routing policy (default: $HYBRID_ROUTER_POLICY, else the policy packaged with the client); its "
                     "endpoint URL is replaced by the service under test")
    run.add_argument("--cloud-url", help="evaluate against this running v2 service instead of starting one")
    run.add_argument("--edge-manifest", metavar="PATH", help="edge model manifest (default: the policy's, else the shipped INT8)")
    run.add_argument("--cloud-manifest", metavar="PATH", help="cloud model manifest the local service serves "
                     "(default: the shipped cloud model; not with --cloud-url)")
    run.add_argument("--threshold", type=float, help="override the policy's confidence threshold")
    run.add_argument("--deadline-ms", type=float, help="per-request deadline (default: the policy's)")
    run.add_argument("--concurrency", type=int, default=2,
                     help="requests in flight (default 2: unsure requests stay in flight longest, so with N workers "
                          "up to N escalations hit the service at once; on 2 cores the cloud model serves ~100 images/s)")
    run.add_argument("--baseline-limit", type=int, default=1000,
                     help="requests in the cloud-only latency baseline, evenly spaced over the set (default 1000; 0: skip)")
    run.add_argument("--outage", action="store_true",
                     help="refuse connections on the proxied path for the middle third of the requests")
    run.add_argument("--seed", type=int, default=0, help="seed of the simulated network's random draws")
    run.add_argument("--models-only", action="store_true",
                     help="only the accuracy and ECE of the shipped edge FP32, edge INT8 and cloud models (no server)")
    add_network_arguments(p)

    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write the full report (with per-request records) as JSON")
    out.add_argument("--report", metavar="PATH.md", help="write a Markdown report and the curve PNG next to it")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    # typed errors (ConfigError, PlotError, NetsimError, ...) are reported in one line, exit 2, by router_tools.cli
    if args.models_only:
        return _models_only(args)
    return _run(args)


def _console():
    from rich.console import Console

    return Console(highlight=False)


# ----------------------------------------------------------------------------- --models-only


def _models_only(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rich.table import Table

    from edge_model.runtime import ARTIFACTS_DIR, DEFAULT_EDGE_MANIFEST, OnnxClassifier
    from router_tools.thresholds import ece
    from router_tools.labeled import load_labeled
    from router_tools.scoring import model_probs

    manifests = [("edge FP32", ARTIFACTS_DIR / "edge-fp32.json"), ("edge INT8", DEFAULT_EDGE_MANIFEST),
                 ("cloud FP32", shipped_cloud_manifest())]
    console = _console()
    rows, data = [], None
    for title, manifest in manifests:
        model = OnnxClassifier(manifest)
        if data is None:
            data = load_labeled(args.data, split=args.split, labels=model.labels, config=model.preprocess_config,
                                limit=args.limit)
        probs = model_probs(model, data.pixels)
        acc = float((probs.argmax(axis=1) == data.labels).mean())
        rows.append({"model": title, "name": model.name, "version": model.version, "manifest": str(manifest),
                     "accuracy": acc, "ece": ece(probs, data.labels), "temperature": model.temperature,
                     "flops": model.manifest.flops, "params": model.manifest.params,
                     "file_bytes": model.model_path.stat().st_size})
    table = Table(title=f"Shipped models on {data.name} (n={len(data)})")
    for col in ("model", "version", "accuracy", "ECE", "FLOPs/image", "params", "file"):
        table.add_column(col, justify="left" if col in ("model", "version") else "right")
    for r in rows:
        table.add_row(r["model"], r["version"], f"{r['accuracy']:.2%}", f"{r['ece']:.4f}", f"{r['flops'] / 1e6:.1f} M",
                      f"{r['params']:,}", f"{r['file_bytes'] / 1024:.0f} KiB")
    console.print(table)
    result = {"data": {"name": data.name, "n": len(data)}, "models": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.report:
        lines = [f"# Shipped models on {data.name} (n={len(data)})", "", "| model | version | accuracy | ECE | FLOPs/image | params |",
                 "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['version']} | {r['accuracy']:.2%} | {r['ece']:.4f} | {r['flops'] / 1e6:.1f} M | {r['params']:,} |"
                  for r in rows]
        Path(args.report).write_text("\n".join(lines) + "\n")
    return 0


# ----------------------------------------------------------------------------- the full eval


def _run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from router.errors import ConfigError
    from router_tools.evaluation import EvalSettings, evaluate
    from router_tools.labeled import load_labeled
    from router_tools.netsim import profile_from_namespace
    from router_tools.proxy_process import ProxyProcess
    from router.policy import load_policy

    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1; got {args.concurrency}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1; got {args.limit}")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise ConfigError(f"--threshold must be within [0, 1]; got {args.threshold}")
    if args.deadline_ms is not None and not args.deadline_ms > 0:
        raise ConfigError(f"--deadline-ms must be > 0; got {args.deadline_ms}")
    if args.cloud_manifest and args.cloud_url:
        raise ConfigError("--cloud-manifest sets the model of the local service; with --cloud-url the service at "
                          "that URL decides")
    for flag, path in (("--edge-manifest", args.edge_manifest), ("--cloud-manifest", args.cloud_manifest)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{path}: {flag}: manifest file not found")
    if args.report:  # before the service starts or anything is written: a missing extra must not leave half
        from router_tools.plotting import require_matplotlib

        require_matplotlib()
    console = _console()
    policy = load_policy(args.config)
    if args.edge_manifest:
        from router.policy import parse_policy

        data = policy.model_dump(mode="json")
        data["edge"]["manifest"] = str(Path(args.edge_manifest).resolve())
        policy = parse_policy(data, "--edge-manifest")
    profile = profile_from_namespace(args)
    from edge_model.manifest import Manifest
    from edge_model.preprocess import PreprocessConfig
    from edge_model.runtime import DEFAULT_EDGE_MANIFEST

    manifest = Manifest.load(policy.edge.manifest or DEFAULT_EDGE_MANIFEST)
    data = load_labeled(args.data, split=args.split, labels=manifest.labels,
                        config=PreprocessConfig.from_input_spec(manifest.input), limit=args.limit)

    with contextlib.ExitStack() as stack:
        if args.cloud_url:
            cloud_url = args.cloud_url.rstrip("/")
        else:
            from cloud_service.launch import LocalService

            console.print("starting the cloud service on a free loopback port ...")
            overrides = {"model.manifest": str(Path(args.cloud_manifest).resolve())} if args.cloud_manifest else {}
            if policy.cloud.endpoints:  # served under the name the policy's endpoint asks for
                overrides["model.name"] = policy.cloud.endpoints[0].model
            svc = stack.enter_context(LocalService(overrides=overrides or None))
            cloud_url = svc.url
            console.print(f"cloud service ready at {cloud_url} (pid {svc.pid})")
        proxy = None
        if profile is not None or args.outage:
            # in its own process: the simulated network must not share the measured router's GIL
            proxy = stack.enter_context(ProxyProcess(cloud_url, profile or "loopback", seed=args.seed))
            console.print(f"network: {proxy.profile.describe()} via proxy {proxy.url_for()} (pid {proxy.pid})")
        settings = EvalSettings(policy=policy, cloud_url=cloud_url, route_url=proxy.url_for() if proxy else cloud_url,
                                deadline_ms=args.deadline_ms, threshold=args.threshold, concurrency=args.concurrency,
                                baseline_limit=args.baseline_limit, outage=args.outage)
        with _progress(console, disabled=args.no_progress) as progress:
            report = evaluate(data, settings, proxy=proxy, progress=progress)
    report["command"] = command_line(args)
    sweep = report.pop("_sweep")
    render_table(console, report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        console.print(f"JSON: {args.json}")
    if args.report:
        md = Path(args.report)
        png = md.with_name(md.stem + "-curve.png")
        from router_tools.plotting import plot_curve

        plot_curve(sweep, png, title=f"Router on {report['data']['name']}",
                   chosen=(report["escalation_predicted"], report["accuracy"]["router_predicted"],
                           f"threshold {report['policy']['threshold']:g} (from the models)"),
                   points=[(report["escalation_rate"], report["accuracy"]["router"], "router, measured")])
        md.write_text(render_markdown(report, png.name))
        console.print(f"report: {md} (curve {png})")
    return 0


@contextlib.contextmanager
def _progress(console, disabled: bool):
    """A rich progress bar fed by ``evaluate``'s (phase, done, total) callbacks (off on a non-terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if disabled or not console.is_terminal:
        last: dict[str, int] = {}

        def plain(phase: str, done: int, total: int) -> None:
            # a line per phase start/end on a non-terminal (CI logs), nothing per request
            if done == 0 or done == total:
                if last.get(phase) != done:
                    last[phase] = done
                    console.print(f"{phase}: {done}/{total}")

        yield None if disabled else plain
        return
    with Progress(TextColumn("{task.description:>22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update


# ----------------------------------------------------------------------------- rendering


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (options that differ from their defaults)."""
    import shlex

    parts = ["hybrid-router", "eval"]
    for flag in ("data", "split", "limit", "config", "cloud_url", "edge_manifest", "cloud_manifest", "threshold", "deadline_ms", "concurrency",
                 "baseline_limit", "network", "rtt_ms", "jitter_ms", "loss", "seed"):
        value = getattr(args, flag, None)
        if value is None or (flag, value) in (("split", "test"), ("concurrency", 2), ("baseline_limit", 1000), ("seed", 0)):
            continue
        parts += ["--" + flag.replace("_", "-"), shlex.quote(str(value))]
    if getattr(args, "outage", False):
        parts.append("--outage")
    return " ".join(parts)


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def render_table(console, r: dict) -> None:
    from rich.table import Table

    acc, lat, dl, cloud = r["accuracy"], r["latency_ms"], r["deadline"], r["cloud"]
    n = r["data"]["n"]
    t = Table(title=f"hybrid-router eval: {r['data']['name']} (n={n}), network {r['network']['profile']}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("edge-only accuracy", f"{acc['edge_only']:.2%}")
    t.add_row("cloud-only accuracy", f"{acc['cloud_only']:.2%}")
    t.add_row("router accuracy", f"{acc['router']:.2%}  ({(acc['router'] - acc['cloud_only']) * 100:+.2f} pt vs cloud)")
    t.add_row("escalation rate", f"{r['escalation_rate']:.1%}  (threshold {r['policy']['threshold']:g}; "
              f"models predict {r['escalation_predicted']:.1%})")
    t.add_row("fallbacks / errors", f"{r['fallback_rate']:.1%} / {r['errors']}" + (f" {r['error_types']}" if r["errors"] else ""))
    for name, key in (("router latency", "router"), ("  confident (edge)", "router_confident"),
                      ("  escalated (cloud)", "router_escalated"), ("cloud-only latency", "cloud_only")):
        s = lat[key]
        if s["n"]:
            t.add_row(f"{name} ms (n={s['n']})", f"mean {_ms(s['mean'])}  p50 {_ms(s['p50'])}  p95 {_ms(s['p95'])}  "
                      f"p99 {_ms(s['p99'])}  max {_ms(s['max'])}")
    if lat["cloud_only_errors"]:
        t.add_row("cloud-only failures", f"[yellow]{lat['cloud_only_errors']} of {r['run']['baseline_requests']}: "
                  f"{lat['cloud_only_error_types']}[/yellow]")
    if lat["cloud_only"]["n"]:
        t.add_row("cloud-only over the deadline", f"{lat['cloud_only_over_deadline']} of {r['run']['baseline_requests']} "
                  f"(it waits for its answers; the router's deadline is {r['policy']['deadline_ms']:g} ms)")
    if lat["ratio_mean"] is not None:
        t.add_row(f"router / cloud-only (same {lat['cloud_only']['n']} images)",
                  f"mean {lat['ratio_mean']:.3f}x  p50 {lat['ratio_p50']:.3f}x  p99 {lat['ratio_p99']:.3f}x")
    t.add_row("deadline", f"{r['policy']['deadline_ms']:g} ms: {dl['within_deadline']}/{dl['requests']} answered within "
              f"({dl['share_within_deadline']:.2%}); max overrun {dl['max_overrun_ms']:.1f} ms")
    if "outage" in r:
        o = r["outage"]
        t.add_row("during the outage", f"requests {o['range'][0]}..{o['range'][1] - 1} ({o['seconds']:.1f} s): "
                  f"{o['answered']}/{o['requests']} answered, {o['within_deadline']} within deadline")
        for name, ph in o["phases"].items():
            if ph["requests"]:
                t.add_row(f"  {name} the outage", f"{ph['requests']} requests: accuracy {ph['accuracy']:.2%}, escalated "
                          f"{ph['escalation_rate']:.1%}, fallbacks {ph['fallbacks']}, p99 {_ms(ph['latency_ms']['p99'])} ms")
        back = o["first_escalation_after_s"]
        t.add_row("  escalations resumed", "not within this run (breaker still open?)" if back is None
                  else f"{back:.2f} s after the path came back (breaker open_duration_s "
                       f"{r['policy']['breaker']['open_duration_s']:g})")
    t.add_row("cloud calls / bytes sent", f"{cloud['calls']} / {cloud['bytes_sent']:,} B "
              f"({cloud['bytes_sent'] / max(1, cloud['calls']):.0f} B per call)")
    t.add_row("breaker", f"{cloud['breaker']} (opened {cloud['breaker_opened']}x)")
    t.add_row("answers by source/reason", ", ".join(f"{k} {v}" for k, v in r["reasons"].items()))
    if r["network"]["proxy"]:
        p = r["network"]["proxy"]
        t.add_row("proxy", f"{p['connections_accepted']} connections, {p['losses_injected']} losses, "
                  f"{p['resets_injected']} resets, {p['bytes_to_upstream']:,} B up")
    t.add_row("run", f"{r['run']['seconds']:.1f} s, concurrency {r['run']['concurrency']}")
    console.print(t)


def render_markdown(r: dict, png_name: str) -> str:
    acc, lat, dl, cloud = r["accuracy"], r["latency_ms"], r["deadline"], r["cloud"]
    m = r["models"]
    lines = [
        f"# Router evaluation: {r['data']['name']} (n={r['data']['n']})",
        "",
        f"Command: `{r.get('command') or 'hybrid-router eval'}`  ",
        f"Edge model: {m['edge']['name']} {m['edge']['version']}; cloud model: {m['cloud']['model']} "
        f"{m['cloud']['version']} (input {m['cloud']['input_datatype']})  ",
        f"Policy: mode {r['policy']['mode']}, threshold {r['policy']['threshold']:g}, deadline {r['policy']['deadline_ms']:g} ms  ",
        f"Network: {r['network']['profile']}; concurrency {r['run']['concurrency']}; run time {r['run']['seconds']:.1f} s",
        "",
        "| | accuracy | escalated | mean ms | p50 ms | p95 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rl, cl = lat["router"], lat["cloud_only"]
    lines.append(f"| edge only | {acc['edge_only']:.2%} | 0 % | | | | |")
    lines.append(f"| cloud only | {acc['cloud_only']:.2%} | 100 % | {_ms(cl['mean'])} | {_ms(cl['p50'])} | {_ms(cl['p95'])} | {_ms(cl['p99'])} |")
    lines.append(f"| **router** | **{acc['router']:.2%}** | **{r['escalation_rate']:.1%}** | **{_ms(rl['mean'])}** | "
                 f"{_ms(rl['p50'])} | {_ms(rl['p95'])} | {_ms(rl['p99'])} |")
    lines += [
        "",
        f"- Router vs cloud-only accuracy: {(acc['router'] - acc['cloud_only']) * 100:+.2f} pt.",
    ]
    if lat["ratio_mean"] is not None:
        lines.append(f"- Router / cloud-only latency (same network path, same run, the same {cl['n']} images): "
                     f"mean {lat['ratio_mean']:.3f}x, p50 {lat['ratio_p50']:.3f}x, p99 {lat['ratio_p99']:.3f}x.")
    if lat["cloud_only"]["n"]:
        lines.append(f"- Cloud-only requests slower than the {r['policy']['deadline_ms']:g} ms deadline: "
                     f"{lat['cloud_only_over_deadline']} of {r['run']['baseline_requests']} (the baseline waits for its answers).")
    if lat["cloud_only_errors"]:
        lines.append(f"- Cloud-only requests that failed (excluded from its latency): {lat['cloud_only_errors']} "
                     f"{lat['cloud_only_error_types']}.")
    lines += [
        f"- Deadline {r['policy']['deadline_ms']:g} ms: {dl['within_deadline']}/{dl['requests']} answered within it "
        f"({dl['share_within_deadline']:.2%}), max overrun {dl['max_overrun_ms']:.1f} ms; errors: {r['errors']}.",
        f"- Cloud calls {cloud['calls']}, bytes sent {cloud['bytes_sent']:,}; breaker opened {cloud['breaker_opened']}x.",
        f"- Answers by source/reason: " + ", ".join(f"{k} {v}" for k, v in r["reasons"].items()) + ".",
    ]
    if "outage" in r:
        o = r["outage"]
        lines.append(f"- Outage (connections refused) for requests {o['range'][0]}..{o['range'][1] - 1} "
                     f"({o['seconds']:.1f} s): {o['answered']} answered, {o['within_deadline']} within the deadline.")
        back = o["first_escalation_after_s"]
        lines.append("- Escalations resumed " + ("not within this run" if back is None else
                     f"{back:.2f} s after the path came back") +
                     f" (breaker open_duration_s {r['policy']['breaker']['open_duration_s']:g}).")
        lines += ["", "| phase | requests | accuracy | escalated | fallbacks | within deadline | p99 ms |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, ph in o["phases"].items():
            if ph["requests"]:
                lines.append(f"| {name} the outage | {ph['requests']} | {ph['accuracy']:.2%} | {ph['escalation_rate']:.1%} | "
                             f"{ph['fallbacks']} | {ph['within_deadline']} | {_ms(ph['latency_ms']['p99'])} |")
        lines.append("")
    lines += ["", f"![accuracy vs escalation]({png_name})", ""]
    return "\n".join(lines)
