"""``hybrid-router demo``: the whole product in one command, on this machine, in under a minute.

Starts the real cloud service on a free loopback port and a loopback network proxy in front of
it (the router is given the proxy's URL and knows nothing else), streams shipped test images
through :class:`router.Router` with a live table, then walks through the scenarios that matter:

1. **stream** -- a few hundred images on the local network: confident ones answered on the
   device, unsure ones escalated;
2. **simulated WAN** -- the proxy switches to the ``wan40`` profile (40 ms RTT): escalations pay
   the round trip, confident answers do not;
3. **cloud outage** -- the service process is killed (SIGKILL) mid-stream: answers keep coming,
   from the edge, marked as fallbacks, each within its deadline; the circuit breaker opens;
4. **privacy mode** -- ``privacy=True``: zero cloud calls and zero connections (router stats and
   the proxy's connection counter), while the service restarts in the background;
5. **recovery** -- the service is back: the breaker half-opens, a trial succeeds, it closes,
   escalations resume.

On a terminal the table updates in place (rich); in a pipe or CI log every answer is one plain
line. Everything started is stopped at the end and checked (process gone, ports closed).
"""

from __future__ import annotations

import argparse
import contextlib


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=240, help="images in the first stream (default 240)")
    p.add_argument("--scenario-limit", type=int, default=40, help="images per scenario after it (default 40)")
    p.add_argument("--config", metavar="POLICY", help="routing policy (default: config/policy.yaml); the demo points "
                   "its endpoint at the local service and shortens the breaker's open duration")
    p.add_argument("--deadline-ms", type=float, help="per-request deadline (default: the policy's)")
    p.add_argument("--pace-ms", type=float, default=None,
                   help="pause between images so the table can be read (default: 12 on a terminal, 0 otherwise)")
    p.add_argument("--no-scenarios", action="store_true", help="only the first stream")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated network")


def run(args: argparse.Namespace) -> int:
    import sys

    from cloud_service.launch import ServiceStartError
    from edge_model.errors import EdgeModelError
    from router.errors import RouterError
    from router_tools.netsim import NetsimError

    try:
        return _Demo(args).run()
    except (RouterError, EdgeModelError, NetsimError, ServiceStartError) as exc:
        print(f"demo: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


DEMO_BREAKER_OPEN_S = 1.0


class _Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        from rich.console import Console

        self.args = args
        self.console = Console(highlight=False)
        self.live = self.console.is_terminal
        if not self.live:  # pipes and CI logs: plain lines, wide enough for the tables
            self.console = Console(highlight=False, width=max(self.console.width, 120))
        pace = args.pace_ms if args.pace_ms is not None else (12.0 if self.live else 0.0)
        self.pace_s = max(0.0, pace) / 1000.0
        self.next_image = 0
        self.results: list[tuple[str, dict]] = []

    # ------------------------------------------------------------------ main flow
    def run(self) -> int:
        import threading

        from cloud_service.launch import LocalService
        from router_tools.datasets import load_test
        from router import Router
        from router_tools.evaluation import policy_for
        from router_tools.netsim import NetworkProxy
        from router.policy import load_policy, parse_policy

        args, c = self.args, self.console
        if args.limit < 1 or args.scenario_limit < 1:
            from router.errors import ConfigError

            raise ConfigError("--limit and --scenario-limit must be >= 1")
        base = load_policy(args.config)
        test = load_test()
        self.images, self.labels = test.images, test.labels
        c.rule("[bold]hybrid-router demo[/bold]")
        c.print("A small INT8 model answers on this device when it is confident; unsure requests go to a "
                "full-precision model behind an Open Inference Protocol v2 service.")
        svc = LocalService()
        proxy = None
        restart: threading.Thread | None = None
        with contextlib.ExitStack() as stack:
            stack.callback(self._stop_service, svc)
            c.print("starting the cloud service on a free loopback port ...")
            svc.start()
            self.service_pid, self.service_port = svc.pid, svc.port
            c.print(f"cloud service: {svc.url} (pid {svc.pid})")
            proxy = stack.enter_context(NetworkProxy(svc.url, "loopback", seed=args.seed))
            self.proxy_port = proxy.port
            c.print(f"network proxy: {proxy.url_for()} -> {svc.url} ({proxy.profile.describe()})")
            data = policy_for(base, proxy.url_for()).model_dump(mode="json")
            data["cloud"]["breaker"]["open_duration_s"] = DEMO_BREAKER_OPEN_S
            policy = parse_policy(data, "demo policy")
            router = stack.enter_context(Router(policy))
            self.deadline_ms = float(args.deadline_ms or policy.default_deadline_ms)
            edge = router.edge_model
            connected = router.connect()
            c.print(f"router: edge model {edge.name if edge else '-'} {edge.version if edge else ''}, threshold "
                    f"{policy.confidence_threshold:g}, deadline {self.deadline_ms:g} ms, breaker opens for "
                    f"{DEMO_BREAKER_OPEN_S:g} s in the demo ({base.cloud.breaker.open_duration_s:g} s in the policy); "
                    f"endpoint {', '.join(f'{k}: {v}' for k, v in connected.items())}")

            self.scenario(router, proxy, "1. Streaming shipped test images", args.limit,
                          "Confident answers come from the device; unsure ones escalate to the cloud.", short="stream (loopback)")
            if not args.no_scenarios:
                k = args.scenario_limit
                proxy.set_profile("wan40")
                self.scenario(router, proxy, "2. Simulated WAN (wan40: 40 ms round trip)", k,
                              f"The proxy now delays every packet ({proxy.profile.describe()}); the router was not told.",
                              short="WAN (40 ms RTT)", until=lambda rows: any(r["source"] == "cloud" for r in rows))
                kill_at = max(1, k // 4)

                def kill(j: int) -> None:
                    if j == kill_at:
                        svc.kill()
                        self.note(f"[red]>>> cloud service killed (SIGKILL, pid {self.service_pid}) "
                                  f"before image {j + 1} of {k}[/red]")

                self.scenario(router, proxy, "3. Cloud outage mid-stream", k,
                              "The service process dies part-way; every request must still be answered in time.",
                              before=kill, short="cloud outage",
                              until=lambda rows: sum(r["fallback"] for r in rows) >= 2
                              and "open" in self.breaker_states(router))
                c.print(f"breaker: {self.breaker(router)}")
                restart = threading.Thread(target=self._restart, args=(svc,), name="demo-restart", daemon=True)
                restart.start()
                self.scenario(router, proxy, "4. Privacy mode (privacy=True)", k,
                              "Nothing may leave the device: no cloud call, no connection (the service restarts "
                              "meanwhile in the background).", privacy=True, short="privacy mode")
                restart.join(svc.ready_timeout + 5)
                if not svc.running:
                    raise _start_error(svc)
                self.note(f"[green]>>> cloud service back (pid {svc.pid}) on the same port[/green]")
                self.service_pid = svc.pid
                self.scenario(router, proxy, "5. Recovery", k,
                              "The breaker half-opens, a trial call succeeds, it closes, escalations resume.",
                              short="recovery", until=lambda rows: any(r["source"] == "cloud" for r in rows)
                              and self.breaker_states(router) == {"closed"})
            self.final_summary(router)
        self.check_clean()
        return 0

    # ------------------------------------------------------------------ helpers
    def _restart(self, svc) -> None:
        import time

        time.sleep(0.2)  # the outage lasts a moment longer
        try:
            svc.start()
        except Exception as exc:  # noqa: BLE001 -- reported by the main thread (svc.running is False)
            self.restart_error = exc

    @staticmethod
    def _stop_service(svc) -> None:
        svc.stop()

    def note(self, text: str) -> None:
        self._pending_note = text
        if not self.live:
            self.console.print(text)

    @staticmethod
    def breaker_states(router) -> set[str]:
        return {e["breaker"] for e in router.stats()["endpoints"].values()}

    @staticmethod
    def breaker(router) -> str:
        return ", ".join(f"{name} {e['breaker']}" for name, e in router.stats()["endpoints"].items())

    # ------------------------------------------------------------------ one scenario
    def scenario(self, router, proxy, title: str, count: int, blurb: str, *, privacy: bool = False,
                 before=None, until=None, short: str | None = None) -> None:
        """Stream ``count`` images; with ``until(rows)``, go on (up to 3x) until it holds, so a short
        run still shows what the scenario is about (an escalation, a fallback, a recovery)."""
        import time

        from rich.live import Live

        c = self.console
        c.print()
        c.rule(f"[bold]{title}[/bold]")
        c.print(blurb)
        stats0, proxy0 = router.stats(), proxy.stats()
        rows: list[dict] = []
        self._pending_note = None
        def want_more() -> bool:
            if len(rows) < count:
                return True
            return until is not None and len(rows) < 3 * count and not until(rows)

        live_ctx = Live(self.table(title, rows), console=c, auto_refresh=False, transient=False) if self.live \
            else contextlib.nullcontext()
        if not self.live:
            c.print(f"{'#':>4} {'image':>6}  {'true label':<12} {'answer':<12} {'source':<6} {'reason':<22} {'ms':>7}")
        with live_ctx as live:
            j = 0
            while want_more():
                if before is not None:
                    before(j)
                idx = self.next_image % len(self.labels)
                self.next_image += 1
                t0 = time.perf_counter()
                p = router.predict(self.images[idx], deadline_ms=self.deadline_ms, privacy=privacy or None)
                ms = (time.perf_counter() - t0) * 1000.0
                row = {"n": j + 1, "image": idx, "label": int(self.labels[idx]), "pred": p.class_index, "answer": p.label,
                       "source": p.source, "reason": p.reason.value + (" (fallback)" if p.fallback else ""),
                       "fallback": p.fallback, "ms": ms, "ok": p.class_index == int(self.labels[idx])}
                rows.append(row)
                if self.live:
                    live.update(self.table(title, rows), refresh=True)
                else:
                    c.print(self.line(row), markup=False)
                j += 1
                if self.pace_s:
                    time.sleep(self.pace_s)
        stats1, proxy1 = router.stats(), proxy.stats()
        summary = self.summarize(rows)
        summary["cloud_calls"] = stats1["cloud_attempts"] - stats0["cloud_attempts"]
        summary["bytes_sent"] = stats1["bytes_sent"] - stats0["bytes_sent"]
        summary["connections"] = proxy1.connections_accepted - proxy0.connections_accepted
        summary["breaker"] = self.breaker(router)
        self.results.append((short or title, summary))
        if until is not None and not until(rows):
            c.print(f"[yellow]  (stopped after {len(rows)} images before the scenario's condition was seen)[/yellow]")
        self.print_summary(summary, privacy=privacy)

    def table(self, title: str, rows: list[dict]):
        from rich.table import Table

        t = Table(title=title, caption=self._caption(rows), min_width=90)
        for col, just in (("#", "right"), ("image", "right"), ("true label", "left"), ("answer", "left"),
                          ("source", "left"), ("reason", "left"), ("latency ms", "right"), ("", "center")):
            t.add_column(col, justify=just)
        for r in rows[-14:]:
            src = "[cyan]edge[/cyan]" if r["source"] == "edge" else "[magenta]cloud[/magenta]"
            reason = f"[yellow]{r['reason']}[/yellow]" if r["fallback"] else r["reason"]
            t.add_row(str(r["n"]), str(r["image"]), self.labels_name(r["label"]), r["answer"], src, reason,
                      f"{r['ms']:.1f}", "[green]✓[/green]" if r["ok"] else "[red]✗[/red]")
        return t

    def _caption(self, rows: list[dict]) -> str:
        s = self.summarize(rows)
        note = f"\n{self._pending_note}" if getattr(self, "_pending_note", None) else ""
        if not rows:
            return "waiting for the first answer ..." + note
        return (f"{s['n']} answered, accuracy {s['accuracy']:.1%}, escalated {s['escalated']}, "
                f"fallbacks {s['fallbacks']}, max latency {s['max_ms']:.1f} ms" + note)

    @staticmethod
    def labels_name(i: int) -> str:
        from router_tools.datasets import LABELS

        return LABELS[i]

    def line(self, r: dict) -> str:
        return (f"{r['n']:>4} {r['image']:>6}  {self.labels_name(r['label']):<12} {r['answer']:<12} {r['source']:<6} "
                f"{r['reason']:<22} {r['ms']:>7.1f}  {'✓' if r['ok'] else '✗'}")

    def summarize(self, rows: list[dict]) -> dict:
        import numpy as np

        ms = np.array([r["ms"] for r in rows]) if rows else np.zeros(0)
        edge_ms = [r["ms"] for r in rows if r["source"] == "edge" and not r["fallback"]]
        fallback_ms = [r["ms"] for r in rows if r["fallback"]]
        cloud_ms = [r["ms"] for r in rows if r["source"] == "cloud"]
        reasons: dict[str, int] = {}
        for r in rows:
            reasons[f"{r['source']}/{r['reason']}"] = reasons.get(f"{r['source']}/{r['reason']}", 0) + 1
        return {
            "n": len(rows),
            "accuracy": float(np.mean([r["ok"] for r in rows])) if rows else 0.0,
            "escalated": sum(r["source"] == "cloud" for r in rows),
            "fallbacks": sum(r["fallback"] for r in rows),
            "mean_ms": float(ms.mean()) if rows else 0.0,
            "p95_ms": float(np.percentile(ms, 95)) if rows else 0.0,
            "max_ms": float(ms.max()) if rows else 0.0,
            "edge_mean_ms": float(np.mean(edge_ms)) if edge_ms else None,
            "cloud_mean_ms": float(np.mean(cloud_ms)) if cloud_ms else None,
            "fallback_max_ms": float(np.max(fallback_ms)) if fallback_ms else None,
            "within_deadline": int((ms <= self.deadline_ms).sum()),
            "reasons": reasons,
        }

    def print_summary(self, s: dict, *, privacy: bool) -> None:
        c = self.console
        lat = f"latency mean {s['mean_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms, max {s['max_ms']:.1f} ms"
        if s["edge_mean_ms"] is not None:
            lat += f"; answered on the edge {s['edge_mean_ms']:.2f} ms mean"
        if s["cloud_mean_ms"] is not None:
            lat += f", escalated {s['cloud_mean_ms']:.1f} ms mean"
        if s["fallback_max_ms"] is not None:
            lat += f", fallbacks {s['fallback_max_ms']:.1f} ms max"
        c.print(f"[bold]summary:[/bold] {s['n']} answered, accuracy {s['accuracy']:.1%}, escalated {s['escalated']} "
                f"({s['escalated'] / max(1, s['n']):.0%}), fallbacks {s['fallbacks']}")
        c.print(f"  {lat}")
        c.print(f"  within the {self.deadline_ms:g} ms deadline: {s['within_deadline']}/{s['n']}; "
                f"cloud calls {s['cloud_calls']}, bytes sent {s['bytes_sent']:,}, new connections {s['connections']}; "
                f"breaker {s['breaker']}")
        c.print("  answers: " + ", ".join(f"{k} {v}" for k, v in sorted(s["reasons"].items())))
        if privacy:
            ok = s["cloud_calls"] == 0 and s["connections"] == 0 and s["escalated"] == 0
            c.print(f"  [{'green' if ok else 'red'}]privacy: {s['cloud_calls']} cloud calls, {s['connections']} "
                    f"connections through the network -- {'nothing left the device' if ok else 'VIOLATED'}[/]")

    def final_summary(self, router) -> None:
        from rich.table import Table

        c = self.console
        c.print()
        c.rule("[bold]Summary[/bold]")
        from rich import box

        t = Table(box=box.SIMPLE_HEAD)
        for col in ("scenario", "images", "accuracy", "escalated", "fallbacks", "cloud calls", "mean ms", "max ms",
                    "in deadline"):
            t.add_column(col, justify="left" if col == "scenario" else "right")
        for title, s in self.results:
            t.add_row(title, str(s["n"]), f"{s['accuracy']:.1%}", str(s["escalated"]), str(s["fallbacks"]),
                      str(s["cloud_calls"]), f"{s['mean_ms']:.1f}", f"{s['max_ms']:.1f}", f"{s['within_deadline']}/{s['n']}")
        c.print(t)
        st = router.stats()
        c.print(f"router totals: {st['requests']} requests, escalation rate {st['escalation_rate']:.1%}, "
                f"{st['fallbacks']} fallbacks, {st['cloud_attempts']} cloud calls, {st['bytes_sent']:,} bytes sent")

    def check_clean(self) -> None:
        """After everything stopped: the service process is gone and both ports refuse connections."""
        import os
        import socket

        c = self.console
        leftovers = []
        for pid in {self.service_pid}:
            try:
                os.kill(pid, 0)
                leftovers.append(f"process {pid}")
            except ProcessLookupError:
                pass
            except PermissionError:
                leftovers.append(f"process {pid}")
        for port in (self.service_port, self.proxy_port):
            with socket.socket() as s:
                s.settimeout(1.0)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    leftovers.append(f"port {port}")
        if leftovers:
            c.print(f"[red]not clean: {', '.join(leftovers)} still there[/red]")
            from router.errors import RouterError

            raise RouterError(f"demo left {', '.join(leftovers)} behind")
        c.print(f"clean exit: cloud service (pid {self.service_pid}) stopped, ports {self.service_port} and "
                f"{self.proxy_port} closed")


def _start_error(svc):
    from cloud_service.launch import ServiceStartError

    return ServiceStartError(f"the cloud service did not come back:\n{svc.log_text()[-1500:]}")
