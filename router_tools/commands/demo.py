"""``hybrid-router demo``: the whole product in one command, on this machine, in under a minute.

Starts the real cloud service on a free loopback port and a loopback network proxy in front of
it (the router is given the proxy's URL and knows nothing else), streams shipped test images
through :class:`router.Router`, then walks through the scenarios that matter:

1. **stream** -- on the local network: confident images answered on the device, unsure ones
   escalated;
2. **simulated WAN** -- the proxy switches to the ``wan40`` profile (40 ms RTT): escalations pay
   the round trip, confident answers do not;
3. **cloud outage** -- the service process is killed (SIGKILL) mid-stream: answers keep coming,
   from the edge, marked as fallbacks, each within its deadline; the circuit breaker opens;
4. **privacy mode** -- ``privacy=True``: zero cloud calls and zero connections (router stats and
   the proxy's connection counter), while the service restarts in the background;
5. **recovery** -- the service is back: once the breaker's open period has passed it half-opens,
   a trial escalation succeeds, it closes, escalations resume;
6. **progressive answers** -- ``predict_progressive``: the edge's answer at once, the cloud's
   refinement when it lands; then the proxy slows beyond the deadline and a late refinement
   leaves the first answer standing (``refinement_late``);
7. **model update** -- operator keys are generated, edge 1.1.0 is published into a signed TUF
   channel on a loopback static server and rolled out 5 % -> 25 % -> 100 % by re-publishing (a
   fleet of simulated device ids shows who takes it; the router under test sits in the 25 %
   cohort), the router swaps it in while threads keep predicting (no failed or late answer),
   then a deliberately bad release (outputs permuted, signed correctly) is installed and rolled
   back by its shadow-audit agreement (needs the ``updates``/``release`` extras).

Each stage runs until its condition has been seen (after a minimum number of images, so its
figures mean something) or its time bound passes, and says which: how fast this machine answers
does not decide what is shown. On a terminal a live table updates in place (rich); in a pipe or
CI log each stage prints a few lines (its first answer of each kind and every breaker change),
80 columns wide. Everything started is stopped at the end and checked (process gone, ports
closed).
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

DEMO_BREAKER_OPEN_S = 1.0
RECOVERY_PACE_S = 0.025  # a modest rate, so the breaker's open period passes while images still arrive
PIPE_WIDTH = 80
MAX_EVENTS = 8  # event lines per stage


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=200, help="images in the first stream (default 200)")
    p.add_argument("--scenario-limit", type=int, default=20,
                   help="minimum images per scenario after it; each goes on until its condition is seen (default 20)")
    p.add_argument("--stage-seconds", type=float, default=20.0,
                   help="time bound of each stage if its condition is not seen (default 20)")
    p.add_argument("--config", metavar="POLICY", help="routing policy (default: $HYBRID_ROUTER_POLICY, else the policy packaged with the client); the demo points "
                   "its endpoint at the local service and shortens the breaker's open duration")
    p.add_argument("--edge-manifest", metavar="PATH", help="edge model manifest (default: the policy's, else the shipped INT8)")
    p.add_argument("--cloud-manifest", metavar="PATH", help="cloud model manifest the local service serves "
                   "(default: the shipped cloud model)")
    p.add_argument("--data", metavar="DIR|CSV", help="labeled images to stream, DIR/<label>/*.png or a path,label CSV "
                   "(default: the shipped Fashion-MNIST test split; needed for your own models)")
    p.add_argument("--deadline-ms", type=float, help="per-request deadline (default: the policy's)")
    p.add_argument("--pace-ms", type=float, default=None,
                   help="pause between images so the table can be read (default: 12 on a terminal, 0 otherwise)")
    p.add_argument("--no-scenarios", action="store_true", help="only the first stream")
    p.add_argument("--no-update", action="store_true", help="skip the model-update stage")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated network")


def run(args: argparse.Namespace) -> int:
    # typed errors (ConfigError, ServiceStartError, ...) are reported in one line by router_tools.cli
    return _Demo(args).run()


@dataclass
class Stage:
    title: str
    short: str  # its row in the final table
    blurb: str
    condition: str  # what the stage waits to see, in words
    seen: Callable[[list[dict]], bool]
    min_images: int
    max_seconds: float
    privacy: bool = False
    pace_s: Optional[float] = None  # None: the demo's pace
    before: Optional[Callable[[int], None]] = None  # called with the image number before each request
    progressive: bool = False  # predict_progressive: first answer, then the refinement


class _Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        from rich.console import Console

        self.args = args
        self.console = Console(highlight=False)
        self.live = self.console.is_terminal
        if not self.live:  # pipes and CI logs: plain text, 80 columns
            self.console = Console(highlight=False, width=PIPE_WIDTH, no_color=True)
        pace = args.pace_ms if args.pace_ms is not None else (12.0 if self.live else 0.0)
        self.pace_s = max(0.0, pace) / 1000.0
        self.next_image = 0
        self.events = 0
        self.results: list[tuple[str, dict]] = []
        self.restart_error: Optional[BaseException] = None
        self.opened_at: Optional[float] = None  # monotonic time the breaker was last seen opening

    # ------------------------------------------------------------------ main flow
    def run(self) -> int:
        import threading
        from pathlib import Path

        from cloud_service.launch import LocalService
        from router import Router
        from router.errors import ConfigError
        from router.policy import load_policy, parse_policy
        from router_tools.datasets import load_test
        from router_tools.evaluation import policy_for
        from router_tools.netsim import NetworkProxy

        args, c = self.args, self.console
        if args.limit < 1 or args.scenario_limit < 1:
            raise ConfigError("--limit and --scenario-limit must be >= 1")
        if not args.stage_seconds > 0:
            raise ConfigError(f"--stage-seconds must be > 0; got {args.stage_seconds}")
        for flag, path in (("--edge-manifest", args.edge_manifest), ("--cloud-manifest", args.cloud_manifest)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{path}: {flag}: manifest file not found")
        base = load_policy(args.config)
        if args.data:  # the user's labeled images, read for the edge model they bring
            from edge_model.manifest import Manifest
            from edge_model.preprocess import PreprocessConfig
            from edge_model.runtime import DEFAULT_EDGE_MANIFEST
            from router_tools.labeled import load_labeled

            m = Manifest.load(args.edge_manifest or base.edge.manifest or DEFAULT_EDGE_MANIFEST)
            config = PreprocessConfig.from_input_spec(m.input)
            labeled = load_labeled(args.data, labels=m.labels, config=config)
            self.images, self.labels, self.label_names = labeled.app_images(config), labeled.labels, list(m.labels)
        else:
            test = load_test()
            self.images, self.labels = test.images, test.labels
        c.rule("[bold]hybrid-router demo[/bold]")
        c.print("A small INT8 model answers on this device when it is confident; unsure requests go "
                "to a full-precision model behind an Open Inference Protocol v2 service.")
        overrides = {"model.manifest": str(Path(args.cloud_manifest).resolve())} if args.cloud_manifest else {}
        if base.cloud.endpoints:  # served under the name the policy's endpoint asks for
            overrides["model.name"] = base.cloud.endpoints[0].model
        svc = LocalService(overrides=overrides or None)
        with contextlib.ExitStack() as stack:
            stack.callback(svc.stop)
            svc.start()
            self.service_pid, self.service_port = svc.pid, svc.port
            c.print(f"cloud service: {svc.url} (pid {svc.pid})")
            proxy = stack.enter_context(NetworkProxy(svc.url, "loopback", seed=args.seed))
            self.proxy_port = proxy.port
            c.print(f"network proxy: {proxy.url_for()} ({proxy.profile.describe()})")
            data = policy_for(base, proxy.url_for()).model_dump(mode="json")
            data["cloud"]["breaker"]["open_duration_s"] = DEMO_BREAKER_OPEN_S
            if args.edge_manifest:
                data["edge"]["manifest"] = str(Path(args.edge_manifest).resolve())
            policy = parse_policy(data, "demo policy")
            router = stack.enter_context(Router(policy))
            self.deadline_ms = float(args.deadline_ms or policy.default_deadline_ms)
            edge = router.edge_model
            connected = router.connect()
            c.print(f"router: edge model {edge.name if edge else '-'} {edge.version if edge else ''}, threshold "
                    f"{policy.confidence_threshold:g}, deadline {self.deadline_ms:g} ms")
            c.print(f"endpoint {', '.join(f'{k}: {v}' for k, v in connected.items())}; breaker opens for "
                    f"{DEMO_BREAKER_OPEN_S:g} s here ({base.cloud.breaker.open_duration_s:g} s in the policy)")

            bound, k = args.stage_seconds, args.scenario_limit
            self.stage(router, proxy, Stage(
                f"1. Streaming {'your' if args.data else 'shipped'} test images", "stream (loopback)",
                "Confident answers come from the device; unsure ones escalate to the cloud.",
                "edge answers and escalations",
                lambda rows: _any(rows, "edge", "confident") and _any(rows, "cloud"), args.limit, bound))
            if not args.no_scenarios:
                proxy.set_profile("wan40")
                self.stage(router, proxy, Stage(
                    "2. Simulated WAN (wan40: 40 ms round trip)", "WAN (40 ms RTT)",
                    f"Unknown to the router, the proxy delays every packet ({proxy.profile.describe()}).",
                    "an escalation over the slow link",
                    lambda rows: _any(rows, "cloud"), k, bound))
                kill_at = max(1, k // 4)

                def kill(j: int) -> None:
                    if j == kill_at:
                        svc.kill()
                        self.event(j, f">>> cloud service killed (SIGKILL, pid {self.service_pid})")

                self.stage(router, proxy, Stage(
                    "3. Cloud outage mid-stream", "cloud outage",
                    "The service dies part-way; every request must still be answered in time.",
                    "fallbacks and the breaker open",
                    lambda rows: sum(r["fallback"] for r in rows) >= 2 and rows[-1]["breaker_after"] == "open",
                    k, bound, before=kill))
                restart = threading.Thread(target=self._restart, args=(svc,), name="demo-restart", daemon=True)
                restart.start()
                self.stage(router, proxy, Stage(
                    "4. Privacy mode (privacy=True)", "privacy mode",
                    "Nothing may leave the device (the service restarts meanwhile).",
                    "no cloud call, no connection",
                    lambda rows: all(r["reason"] == "privacy" for r in rows) and self._no_traffic(router, proxy),
                    k, bound, privacy=True))
                restart.join(svc.ready_timeout + 5)
                if not svc.running:
                    raise _start_error(svc, self.restart_error)
                self.service_pid = svc.pid
                c.print(f">>> cloud service back (pid {svc.pid}) on the same port")
                self.stage(router, proxy, Stage(
                    "5. Recovery", "recovery",
                    f"After its {DEMO_BREAKER_OPEN_S:g} s open period the breaker half-opens; one trial "
                    "escalation decides.",
                    "half-open trial passed, escalations resumed",
                    _recovered, k, max(bound, DEMO_BREAKER_OPEN_S + bound),
                    pace_s=max(self.pace_s, RECOVERY_PACE_S)))
                self.progressive_stage(router, proxy, k, bound)
                if not args.no_update and (args.edge_manifest or args.data):
                    c.print("7. Model update: skipped with your own models (it publishes the shipped edge model)")
                elif not args.no_update:
                    proxy.set_profile("loopback")
                    UpdateStage(self, data, bound).run()
            self.final_summary(router)
        self.check_clean()
        return 0

    def progressive_stage(self, router, proxy, k: int, bound: float) -> None:
        """Stage 6: first answers at once, refinements from the cloud; once one has landed, the
        proxy adds more than the deadline to each round trip, so a refinement comes too late."""
        slow_ms = 2.0 * self.deadline_ms

        def slow_down(j: int) -> None:
            if proxy.mode.value != "slow" and any(r["source"] == "cloud" for r in self._stage_rows):
                proxy.set_mode("slow", slow_ms=slow_ms)
                self.event(j, f">>> proxy adds {slow_ms:g} ms per round trip (beyond the deadline)")

        try:
            self.stage(router, proxy, Stage(
                "6. Progressive answers (predict_progressive)", "progressive",
                "The edge answers at once; the cloud refines it within the deadline.",
                "cloud refinement, then a late one standing",
                lambda rows: _any(rows, "cloud") and _any(rows, "edge", "refinement_late"),
                k, bound, before=slow_down, progressive=True))
        finally:
            proxy.set_mode("normal")

    # ------------------------------------------------------------------ helpers
    def _restart(self, svc) -> None:
        try:
            svc.start()
        except BaseException as exc:  # noqa: BLE001 -- reported by the main thread (svc.running is False)
            self.restart_error = exc

    def _no_traffic(self, router, proxy) -> bool:
        st, px = router.stats(), proxy.stats()
        return (st["cloud_attempts"] == self._stats0["cloud_attempts"]
                and px.connections_accepted == self._proxy0.connections_accepted)

    def event(self, j: int, text: str) -> None:
        """A line above the live table, or in the log: what happened at image ``j + 1`` of the stage
        (at most MAX_EVENTS a stage: a breaker flapping on a loaded machine must not flood the log)."""
        self.events += 1
        if self.events <= MAX_EVENTS:
            self.console.print(f"  #{j + 1:<4} {text}", markup=False)

    @staticmethod
    def breaker(router) -> str:
        return ", ".join(f"{name} {e['breaker']}" for name, e in router.stats()["endpoints"].items())

    @staticmethod
    def breaker_state(router) -> str:
        """One word for all endpoints: ``open`` only when every breaker is open (the router then stays local)."""
        states = {e["breaker"] for e in router.stats()["endpoints"].values()}
        return states.pop() if len(states) == 1 else "mixed"

    # ------------------------------------------------------------------ one stage
    def stage(self, router, proxy, st: Stage) -> None:
        """Stream images until ``st.seen(rows)`` holds after ``st.min_images``, or ``st.max_seconds`` pass."""
        import time

        from rich.live import Live

        c = self.console
        c.rule(f"[bold]{st.title}[/bold]")
        c.print(st.blurb)
        self._stats0, self._proxy0 = router.stats(), proxy.stats()
        self.events = 0
        rows: list[dict] = []
        self._stage_rows = rows  # what a stage's ``before`` hook may look at
        kinds: set[str] = set()
        state = self.breaker_state(router)
        if state != "closed":
            since = f" (opened {time.monotonic() - self.opened_at:.1f} s ago)" if self.opened_at is not None else ""
            c.print(f"  breaker at the start: {self.breaker(router)}{since}")
        pace = self.pace_s if st.pace_s is None else st.pace_s
        live_ctx = Live(self.table(st.title, rows), console=c, auto_refresh=False) if self.live \
            else contextlib.nullcontext()
        t0 = time.monotonic()
        with live_ctx as live:
            j = 0
            while True:
                elapsed = time.monotonic() - t0
                if len(rows) >= st.min_images and st.seen(rows):
                    outcome = f"seen after {len(rows)} images ({elapsed:.1f} s): {st.condition}"
                    ok = True
                    break
                if elapsed >= st.max_seconds:
                    outcome = f"NOT seen: time bound {st.max_seconds:g} s passed ({len(rows)} images): {st.condition}"
                    ok = False
                    break
                if st.before is not None:
                    st.before(j)
                row = self.one(router, j, privacy=st.privacy, state_before=state, progressive=st.progressive)
                rows.append(row)
                self.describe(j, row, kinds)
                state = row["breaker_after"]
                if self.live:
                    live.update(self.table(st.title, rows), refresh=True)
                j += 1
                if pace:
                    time.sleep(pace)
        if self.events > MAX_EVENTS:
            c.print(f"  ... and {self.events - MAX_EVENTS} more events")
        c.print(f"  [{'green' if ok else 'yellow'}]{outcome}[/]")
        s = self.summarize(rows)
        stats1, proxy1 = router.stats(), proxy.stats()
        s["cloud_calls"] = stats1["cloud_attempts"] - self._stats0["cloud_attempts"]
        s["bytes_sent"] = stats1["bytes_sent"] - self._stats0["bytes_sent"]
        s["connections"] = proxy1.connections_accepted - self._proxy0.connections_accepted
        s["breaker"] = self.breaker(router)
        self.results.append((st.short, s))
        if st.progressive:
            self.print_progressive(s, rows)
        else:
            self.print_summary(s, privacy=st.privacy)

    def one(self, router, j: int, *, privacy: bool, state_before: str, progressive: bool = False) -> dict:
        import time

        idx = self.next_image % len(self.labels)
        self.next_image += 1
        t0 = time.perf_counter()
        first_ms = None
        if progressive:
            h = router.predict_progressive(self.images[idx], deadline_ms=self.deadline_ms, privacy=privacy or None)
            first_ms = (time.perf_counter() - t0) * 1000.0  # the caller has an answer from here on
            p = h.final()
            first = h.first if h.refining else None
        else:
            p = router.predict(self.images[idx], deadline_ms=self.deadline_ms, privacy=privacy or None)
        ms = (time.perf_counter() - t0) * 1000.0
        label = int(self.labels[idx])
        row = {"n": j + 1, "image": idx, "label": label, "pred": p.class_index, "answer": p.label,
               "source": p.source, "reason": p.reason.value, "fallback": p.fallback, "ms": ms,
               "failure": p.cloud_failure.category if p.cloud_failure else None,
               "ok": p.class_index == label, "breaker_before": state_before,
               "breaker_after": self.breaker_state(router)}
        if progressive:
            row["first_ms"] = first_ms
            row["refined"] = first is not None
            row["first_ok"] = (first or p).class_index == label
        return row

    def describe(self, j: int, r: dict, kinds: set[str]) -> None:
        """Log the first answer of each kind in the stage and every change of the breaker."""
        import time

        why = f": {r['failure']}" if r.get("failure") and not r.get("refined") else ""  # unreachable, timeout...
        kind = f"{r['source']}/{r['reason']}" + (f" (fallback{why})" if r["fallback"] else "")
        if kind not in kinds and r.get("refined", True):  # a progressive stage shows refined answers only
            kinds.add(kind)
            if r.get("refined"):  # a progressive answer: the first at once, then this one
                self.event(j, f"provisional {r['first_ms']:.1f} ms -> {r['source']}/{r['reason']} {r['ms']:.1f} ms: "
                              f"{r['answer']} {'✓' if r['ok'] else '✗'}")
            else:
                self.event(j, f"first {kind}: {r['answer']} {'✓' if r['ok'] else '✗'} in {r['ms']:.1f} ms")
        before, after = r["breaker_before"], r["breaker_after"]
        if before == after:
            return
        if _trial_passed(r):
            # open -> closed: the open period ended inside this request, which was the half-open trial
            self.event(j, f"half-open trial: cloud answered in {r['ms']:.1f} ms -> breaker closed")
        elif before == "half_open" and after == "open":
            self.event(j, "half-open trial failed -> breaker open again")
        elif after == "open":
            self.opened_at = time.monotonic()
            self.event(j, "breaker opened: unsure requests stay on the device at once")
        elif after == "half_open":
            self.event(j, "breaker half-open: open period over; next escalation is a trial")
        else:
            self.event(j, f"breaker {before} -> {after}")

    def table(self, title: str, rows: list[dict]):
        from rich.table import Table

        t = Table(title=title, caption=self._caption(rows), min_width=90)
        for col, just in (("#", "right"), ("image", "right"), ("true label", "left"), ("answer", "left"),
                          ("source", "left"), ("reason", "left"), ("latency ms", "right"), ("", "center")):
            t.add_column(col, justify=just)
        for r in rows[-14:]:
            src = "[cyan]edge[/cyan]" if r["source"] == "edge" else "[magenta]cloud[/magenta]"
            reason = r["reason"] + (" (fallback)" if r["fallback"] else "")
            reason = f"[yellow]{reason}[/yellow]" if r["fallback"] else reason
            t.add_row(str(r["n"]), str(r["image"]), self.labels_name(r["label"]), r["answer"], src, reason,
                      f"{r['ms']:.1f}", "[green]✓[/green]" if r["ok"] else "[red]✗[/red]")
        return t

    def _caption(self, rows: list[dict]) -> str:
        if not rows:
            return "waiting for the first answer ..."
        s = self.summarize(rows)
        return (f"{s['n']} answered, accuracy {s['accuracy']:.1%}, escalated {s['escalated']}, "
                f"fallbacks {s['fallbacks']}, max latency {s['max_ms']:.1f} ms, breaker {rows[-1]['breaker_after']}")

    label_names: Optional[list] = None  # the edge model's labels with --data; else Fashion-MNIST's

    def labels_name(self, i: int) -> str:
        from router_tools.datasets import LABELS

        return (self.label_names or LABELS)[i]

    def summarize(self, rows: list[dict]) -> dict:
        import numpy as np

        ms = np.array([r["ms"] for r in rows]) if rows else np.zeros(0)
        edge_ms = [r["ms"] for r in rows if r["source"] == "edge" and not r["fallback"]]
        fallback_ms = [r["ms"] for r in rows if r["fallback"]]
        cloud_ms = [r["ms"] for r in rows if r["source"] == "cloud"]
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
        }

    def print_summary(self, s: dict, *, privacy: bool) -> None:
        c = self.console
        c.print(f"  {s['n']} answered, accuracy {s['accuracy']:.1%}, escalated {s['escalated']}, "
                f"fallbacks {s['fallbacks']}, in {self.deadline_ms:g} ms: {s['within_deadline']}/{s['n']}")
        lat = [f"mean {s['mean_ms']:.1f}", f"max {s['max_ms']:.1f}"]
        if s["edge_mean_ms"] is not None:
            lat.append(f"edge mean {s['edge_mean_ms']:.2f}")
        if s["cloud_mean_ms"] is not None:
            lat.append(f"cloud mean {s['cloud_mean_ms']:.1f}")
        if s["fallback_max_ms"] is not None:
            lat.append(f"fallback max {s['fallback_max_ms']:.1f}")
        c.print(f"  ms: {', '.join(lat)}")
        c.print(f"  cloud calls {s['cloud_calls']}, {s['bytes_sent']:,} B sent, new connections {s['connections']}; "
                f"breaker {s['breaker']}")
        if privacy:
            ok = s["cloud_calls"] == 0 and s["connections"] == 0 and s["escalated"] == 0
            c.print(f"  [{'green' if ok else 'red'}]privacy: {s['cloud_calls']} cloud calls, {s['connections']} "
                    f"connections: {'nothing left the device' if ok else 'VIOLATED'}[/]")

    def print_progressive(self, s: dict, rows: list[dict]) -> None:
        """Two lines: when the caller had an answer, and what became of the refinements."""
        refined = [r for r in rows if r.get("refined")]
        first = [r["first_ms"] for r in refined]
        landed = sum(r["source"] == "cloud" for r in refined)
        late = sum(r["reason"] == "refinement_late" for r in refined)
        failed = sum(r["reason"] == "refinement_failed" for r in refined)
        mean_first = f"{sum(first) / len(first):.1f}" if first else "-"
        self.console.print(f"  {s['n']} answered, {len(refined)} refined: first answer mean {mean_first} ms; "
                           f"{landed} cloud, {late} late, {failed} failed")
        # (no call count here: a late refinement's attempt may still be ending when the stage does)
        self.console.print(f"  final answer in {self.deadline_ms:g} ms: {s['within_deadline']}/{s['n']}; "
                           f"breaker {s['breaker']}")

    def final_summary(self, router) -> None:
        from rich import box
        from rich.table import Table

        c = self.console
        c.rule("[bold]Summary[/bold]")
        # fits 80 columns: short headers, no outer padding
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 0))
        for col in ("stage", "images", "acc.", "escal.", "fallb.", "calls", "mean ms", "max ms", "in time"):
            t.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
        for title, s in self.results:
            t.add_row(title, str(s["n"]), f"{s['accuracy']:.1%}", str(s["escalated"]), str(s["fallbacks"]),
                      str(s["cloud_calls"]), f"{s['mean_ms']:.1f}", f"{s['max_ms']:.1f}", f"{s['within_deadline']}/{s['n']}")
        c.print(t)
        st = router.stats()
        c.print(f"router totals: {st['requests']} requests, {st['escalation_rate']:.1%} escalated, "
                f"{st['fallbacks']} fallbacks, {st['cloud_attempts']} cloud calls")

    def check_clean(self) -> None:
        """After everything stopped: the service process is gone and both ports refuse connections."""
        import os
        import socket

        from router.errors import RouterError

        leftovers = []
        try:
            os.kill(self.service_pid, 0)
            leftovers.append(f"process {self.service_pid}")
        except ProcessLookupError:
            pass
        except PermissionError:
            leftovers.append(f"process {self.service_pid}")
        for port in (self.service_port, self.proxy_port):
            with socket.socket() as s:
                s.settimeout(1.0)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    leftovers.append(f"port {port}")
        if leftovers:
            raise RouterError(f"demo left {', '.join(leftovers)} behind")
        self.console.print(f"clean exit: service (pid {self.service_pid}) stopped, ports {self.service_port} "
                           f"and {self.proxy_port} closed")


def _any(rows: list[dict], source: str, reason: Optional[str] = None) -> bool:
    return any(r["source"] == source and (reason is None or r["reason"] == reason) for r in rows)


def _trial_passed(r: dict) -> bool:
    """The request went to the cloud and closed a breaker that was not closed: only a successful
    half-open trial closes it (an open one half-opens lazily, when the request looks at it)."""
    return r["breaker_before"] in ("open", "half_open") and r["breaker_after"] == "closed" and r["source"] == "cloud"


def _recovered(rows: list[dict]) -> bool:
    """A half-open trial went to the cloud and closed the breaker, and another escalation followed it."""
    for i, r in enumerate(rows):
        if _trial_passed(r):
            return any(later["source"] == "cloud" for later in rows[i + 1:])
    return False


def _start_error(svc, exc: Optional[BaseException]):
    from cloud_service.launch import ServiceStartError

    why = f"{type(exc).__name__}: {exc}" if exc is not None else "it is not running"
    return ServiceStartError(f"the cloud service did not come back ({why}); log: {svc.log_path}")


# ---------------------------------------------------------------------- stage 7: model update

RELEASE_VERSION = "1.1.0"
BAD_VERSION = "1.1.1"
ROLLOUT_STEPS = (0.05, 0.25, 1.0)
FLEET = 1000  # simulated device ids the rollout lines count
UPDATE_THREADS = 3  # threads that keep predicting through the swaps
UPDATE_PACE_S = 0.004  # each thread's pause between requests: an app's traffic, not a CPU saturation test
UPDATE_AUDIT_RATE = 0.25  # the field uses a few %: here the bad release must show in seconds
UPDATE_FLOOR = 0.8


def release_manifest(tmp) -> tuple["Path", bool]:
    """Edge 1.1.0 as shipped under router_tools/data/releases/edge-1.1.0/ (INT8 preferred), else a
    stand-in: the bundled model under version 1.1.0 (True: it is the stand-in)."""
    import json
    import shutil
    from pathlib import Path

    from edge_model.runtime import ARTIFACTS_DIR

    folder = Path(__file__).resolve().parent.parent / "data" / "releases" / f"edge-{RELEASE_VERSION}"
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            m = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(m, dict) and m.get("version") == RELEASE_VERSION and "file" in m:
            found.append((m.get("precision") != "int8", path))
    if found:
        return min(found)[1], False
    out = Path(tmp) / "stand-in"
    out.mkdir(parents=True, exist_ok=True)
    m = json.loads((ARTIFACTS_DIR / "edge-int8.json").read_text())
    shutil.copy(ARTIFACTS_DIR / m["file"], out / m["file"])
    m["version"] = RELEASE_VERSION
    (out / "manifest.json").write_text(json.dumps(m))
    return out / "manifest.json", True


def release_calibration(manifest_path) -> dict:
    """The release's own calibration when its manifest carries one, else measured now on the
    validation split for 25 % escalation (what ``release publish --target-escalation 0.25`` ships)."""
    from edge_model.manifest import Manifest
    from router_tools import release as rel

    cal = Manifest.load(manifest_path).calibration
    if cal is not None and cal.threshold is not None and cal.expected_escalation is not None:
        return cal.model_dump()
    return rel.calibrate_on_validation(manifest_path, target_escalation=0.25)


def permuted_release(manifest_path, folder, version: str):
    """A deliberately bad release: ``manifest_path``'s graph with its output classes rotated by one.
    Same labels, input and calibration, valid probabilities, its own golden set: it validates and
    verifies; only the field (shadow audits against the cloud) can tell it is wrong."""
    import json
    from pathlib import Path

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from edge_model.manifest import sha256_file

    manifest_path = Path(manifest_path)
    m = json.loads(manifest_path.read_text())
    model = onnx.load(manifest_path.parent / m["file"])
    out = m.get("output_name", "logits")
    for node in model.graph.node:
        node.output[:] = [f"{out}_raw" if o == out else o for o in node.output]
    n = len(m["labels"])
    model.graph.initializer.append(numpy_helper.from_array(np.roll(np.arange(n, dtype=np.int64), 1), "perm"))
    model.graph.node.append(helper.make_node("Gather", [f"{out}_raw", "perm"], [out], axis=1))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "edge-permuted.onnx")
    m.update(version=version, file="edge-permuted.onnx", sha256=sha256_file(folder / "edge-permuted.onnx"), twin=None)
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder / "manifest.json"


def cohort_device(version: str, lo: float, hi: float) -> tuple[str, float]:
    """The first simulated device id whose cohort position for ``version`` is in [lo, hi)."""
    from router.updates import cohort_value

    for i in range(100_000):
        d = f"demo-device-{i}"
        v = cohort_value(d, version)
        if lo <= v < hi:
            return d, v
    raise RuntimeError("no device id in the cohort")  # unreachable: sha256 is uniform


class UpdateStage:
    """Stage 7 (see the module docstring). Every line it prints is measured in this run."""

    def __init__(self, demo: "_Demo", policy_data: dict, bound: float) -> None:
        self.demo, self.c = demo, demo.console
        self.policy_data, self.bound = policy_data, bound
        self.rows: list[dict] = []
        self.errors: list[str] = []
        self.lock = None
        self.phase = "rollout"

    def run(self) -> None:
        import importlib.util

        c = self.c
        c.rule("[bold]7. Model update (signed release channel)[/bold]")
        missing = [m for m in ("tuf", "securesystemslib", "onnx") if importlib.util.find_spec(m) is None]
        if missing:
            c.print(f"  skipped: needs {', '.join(missing)}; run: pip install 'hybrid-edge-router[updates]' "
                    "'hybrid-edge-router-tools[release]'", markup=False)
            return
        import tempfile

        import logging

        quiet = [logging.getLogger(n) for n in ("router.updates", "router.field")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:  # the stage prints what they would log (the alarm, the rollback) itself
            lg.setLevel(logging.CRITICAL)
        try:
            with tempfile.TemporaryDirectory(prefix="hybrid-demo-release-") as tmp:
                self._run(tmp)
        finally:
            for lg, level in zip(quiet, levels):
                lg.setLevel(level)

    def _predict_loop(self, router, k: int, stop) -> None:
        import time

        d = self.demo
        i = k * 997
        while not stop.is_set():
            idx = i % len(d.labels)
            i += 1
            t0 = time.perf_counter()
            try:
                p = router.predict(d.images[idx], deadline_ms=d.deadline_ms)
            except Exception as exc:  # noqa: BLE001 -- a failed answer is what this stage counts
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            ms = (time.perf_counter() - t0) * 1000.0
            time.sleep(UPDATE_PACE_S)
            with self.lock:
                self.rows.append({"ms": ms, "ok": p.class_index == int(d.labels[idx]), "source": p.source,
                                  "reason": p.reason.value, "fallback": p.fallback, "phase": self.phase,
                                  "edge": p.model_version if p.source == "edge" else None})

    def _wait(self, cond, what: str) -> float:
        """Wait (bounded by the stage's time bound) for ``cond``; returns the seconds it took."""
        import time

        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > self.bound:
                raise TimeoutError(f"model update: {what} not seen within {self.bound:g} s")
            time.sleep(0.005)  # polling step of a bounded wait
        return time.monotonic() - t0

    def _run(self, tmp: str) -> None:
        import functools
        import http.server
        import threading
        import time
        from pathlib import Path

        from router import Router
        from router.policy import parse_policy
        from router.updates import in_rollout
        from router_tools import release as rel

        c, d = self.c, self.demo
        tmp = Path(tmp)
        t_stage = time.monotonic()
        repo = rel.Repo.at(tmp / "repo")
        rel.create_keys(repo)
        handler = functools.partial(_quiet_static(), directory=str(repo.public))
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server = threading.Thread(target=httpd.serve_forever, name="demo-channel", daemon=True)
        server.start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        router = None
        stop = threading.Event()
        threads: list[threading.Thread] = []
        try:
            c.print(f"  operator: 4 ed25519 keys (0600) in {repo.keys_dir.name}/, channel {url}", markup=False)
            manifest, stand_in = release_manifest(tmp)
            cal = release_calibration(manifest)
            golden = rel.golden_bytes(*rel.golden_from_test_split(manifest, 64))
            c.print(f"  release {RELEASE_VERSION}{' (stand-in: bundled model re-versioned)' if stand_in else ''}: "
                    f"threshold {cal['threshold']:.4g}", markup=False)
            c.print(f"    ({cal['expected_escalation']:.0%} escalation on {cal.get('split') or 'validation'}) and 64 "
                    "golden answers", markup=False)
            device, pos = cohort_device(RELEASE_VERSION, ROLLOUT_STEPS[0], ROLLOUT_STEPS[1])
            data = {**self.policy_data, "audit_rate": UPDATE_AUDIT_RATE, "audit_queue": 256,
                    "agreement_floor": UPDATE_FLOOR, "drift": {**self.policy_data["drift"], "rollback": True},
                    "decision_log": False,
                    "updates": {"enabled": True, "url": url, "root": str(repo.trust_anchor), "dir": str(tmp / "device"),
                                "check_interval_s": 3600, "device_id": device}}
            router = Router(parse_policy(data, "demo update policy"))
            up = router.updater
            self._wait(lambda: up.checks >= 1 and not up._cycle_lock.locked(), "the first check")
            start = router.stats()["edge"]["version"]
            c.print(f"  router under test: {device}, cohort position {pos:.3f}, answering {start}", markup=False)
            # The operator's side, prepared before the device's threads start (on a real fleet it runs
            # elsewhere): loading onnx's C extension holds the GIL -- a first run in a fresh
            # environment stalled every predicting thread for ~0.7 s.
            bad = permuted_release(manifest, tmp / "bad", BAD_VERSION)
            bad_golden = rel.golden_bytes(*rel.golden_from_test_split(bad, 64))
            self.lock = threading.Lock()
            threads = [threading.Thread(target=self._predict_loop, args=(router, k, stop), name=f"demo-predict-{k}",
                                        daemon=True) for k in range(UPDATE_THREADS)]
            for t in threads:
                t.start()
            self._wait(lambda: len(self.rows) >= 30, "answers before the release")
            fleet = [f"device-{i:04d}" for i in range(FLEET)]
            update_ms = None
            for share in ROLLOUT_STEPS:
                t_pub = time.monotonic()
                rel.publish(repo, manifest, rollout=share, golden=golden, calibration=cal)
                up.wake()  # devices check every updates.check_interval_s; the demo checks at once
                checks = up.checks
                self._wait(lambda: up.checks > checks and not up._cycle_lock.locked(), "the check")
                now = router.stats()["edge"]["version"]
                takes = sum(in_rollout(f, RELEASE_VERSION, share) for f in fleet)
                mine = "in" if in_rollout(device, RELEASE_VERSION, share) else "out"
                c.print(f"  rollout {share:4.0%}: {takes:4d}/{FLEET} devices in cohort; router {mine}: answers {now}",
                        markup=False)
                if now == RELEASE_VERSION and update_ms is None:
                    update_ms = ((time.monotonic() - t_pub) * 1000.0, router.stats()["edge"]["updates"]["last_update"])
            seen = len(self.rows)
            self._wait(lambda: len(self.rows) >= seen + 30, "answers after the swap")
            with self.lock:
                rows = [r for r in self.rows]
            versions = sorted({r["edge"] for r in rows if r["edge"]})
            late = sum(r["ms"] > d.deadline_ms for r in rows)
            c.print(f"  {UPDATE_THREADS} threads predicting meanwhile: {len(rows)} answers, {len(self.errors)} failed, "
                    f"{late} late (> {d.deadline_ms:g} ms)", markup=False)
            c.print(f"  edge versions in those answers: {' -> '.join(versions)}", markup=False)
            if update_ms is not None:
                total, lu = update_ms
                c.print(f"  update time: check saw {RELEASE_VERSION} -> swapped in {lu['swapped_ms']:.0f} ms", markup=False)
                c.print(f"    (download {lu['downloaded_ms']:.0f} ms, load + validate "
                        f"{lu['validated_ms'] - lu['downloaded_ms']:.0f} ms); publish -> answering {total:.0f} ms",
                        markup=False)
            # The bad release: verified, validated (its own golden set), installed; the field catches it.
            self.phase = "bad"
            rel.publish(repo, bad, rollout=1.0, golden=bad_golden, calibration=cal)
            up.wake()
            self._wait(lambda: router.stats()["edge"]["version"] == BAD_VERSION or up.last_error is not None,
                       "the bad release installed")
            c.print(f"  bad release {BAD_VERSION} (outputs permuted; signed, golden set passes): "
                    f"{'installed' if router.stats()['edge']['version'] == BAD_VERSION else up.last_error}",
                    markup=False)
            self._wait(lambda: (router.stats()["field"]["alarm"] or {}).get("rollback") is not None, "the rollback")
            alarm = router.stats()["field"]["alarm"]
            if alarm["kind"] == "agreement":
                c.print(f"  shadow audits ({UPDATE_AUDIT_RATE:.0%} of confident answers) of {alarm['version']}: "
                        f"{alarm['agreed']}/{alarm['audited']} agree", markup=False)
                c.print(f"    with the cloud; upper bound {alarm['upper']:.2f} < agreement_floor {UPDATE_FLOOR:g}",
                        markup=False)
            else:
                c.print(f"  {alarm['message']}", markup=False)
            seen = len(self.rows)
            self._wait(lambda: len(self.rows) >= seen + 20, "answers after the rollback")
            stop.set()
            for t in threads:
                t.join(10)
            after = router.stats()["edge"]["version"]
            with self.lock:
                rows = list(self.rows)
            bad_rows = [r for r in rows if r["phase"] == "bad"]
            late = sum(r["ms"] > d.deadline_ms for r in bad_rows)
            c.print(f"  -> {alarm['kind']} alarm rolled {alarm['version']} back to {alarm['rollback']}; "
                    f"answering now: {after}", markup=False)
            refused = "now refused" if BAD_VERSION in router.updater.status()["refused"] else "NOT refused"
            c.print(f"  since the bad release: {len(bad_rows)} answers, {len(self.errors)} failed, {late} late; "
                    f"{BAD_VERSION} {refused}", markup=False)
            by_version = {}
            for r in rows:
                if r["edge"]:
                    by_version.setdefault(r["edge"], []).append(r["ok"])
            share = {v: f"{v} {sum(oks) / len(oks):.0%} of {len(oks)}" for v, oks in sorted(by_version.items())}
            c.print("  edge answers right, by version: "
                    + ", ".join(t for v, t in share.items() if v != BAD_VERSION), markup=False)
            if BAD_VERSION in share:
                c.print(f"    {share[BAD_VERSION]} (the bad release, until rolled back)", markup=False)
            elapsed = time.monotonic() - t_stage
            ok = (after == RELEASE_VERSION and not self.errors and alarm["rollback"] == RELEASE_VERSION
                  and update_ms is not None)
            what = "staged rollout, live swap, bad release rolled back"
            c.print(f"  [{'green' if ok else 'yellow'}]{'seen' if ok else 'NOT seen'} in {elapsed:.1f} s: {what}[/]")
            s = d.summarize(rows)
            s["cloud_calls"] = router.stats()["cloud_attempts"]
            s["bytes_sent"], s["connections"], s["breaker"] = 0, 0, d.breaker(router)
            d.results.append(("model update", s))
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            if router is not None:
                router.close()
            httpd.shutdown()
            httpd.server_close()


def _quiet_static():
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the channel's access log is not part of the demo's output
            pass

    return Quiet
