"""Field monitoring: shadow audits of confident edge answers, per-version counts, the drift alarm
and the fleet report. :class:`FieldMonitor` is attached to every :class:`~router.api.Router`.

* ``observe()`` runs after each answered request, on the caller's thread: counter increments
  under one lock and, for ``audit_rate`` of the confident edge rows, a hand-off to the router's
  I/O thread (``loop.call_soon_threadsafe``). The caller never waits for an audit. At most
  ``audit_queue`` audits wait; more are dropped and counted. Nothing of this runs under privacy
  (no sampling, no I/O thread, no socket).
* The I/O thread sends each audit to the first endpoint whose breaker allows calls (the breaker
  and the latency estimate are left alone: audits are not routing signals), charges the
  escalation budget (kind ``audit``) when the policy has one and skips the audit when it has no
  headroom, and records whether the cloud's label equals the edge's, per edge model version.
* The drift alarm (WARNING log, ``stats()["field"]["alarm"]``) fires once per edge version when
  the share of edge answers under their threshold over ``drift.window`` answers leaves
  ``expected ± z·sqrt(p(1-p)/n)``, or when the Wilson upper bound of audit agreement falls under
  ``agreement_floor``. With ``drift.rollback`` it calls ``Router.rollback_edge()`` in a thread of
  its own (loading the previous model must not hold the I/O loop or a caller).
* Every ``fleet_report_interval_s`` the I/O thread POSTs the counts accumulated since the last
  successful report -- counts only, never an input or a label -- to the first endpoint's
  ``/v1/fleet/report``; a failed report keeps its counts for the next one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from router.ab import wilson
from router.budget import price_of
from router.effects import CloudCall, CloudReply
from router.policy import Mode
from router.prediction import Reason

if TYPE_CHECKING:
    from router.api import Router

log = logging.getLogger("router.field")

# The agreement alarm needs this many audits of a version: its Wilson bound, looked at after every
# audit, would otherwise fire on a good model's first disagreement whenever agreement_floor > 0.79
# (0/1 agreed has an upper bound of 0.79 at 95 %). At 20, a model agreeing 95 % of the time stays
# over a 0.9 floor with probability > 0.999; one agreeing 10 % is caught at once.
MIN_AUDITS = 20
MAX_VERSIONS = 16  # versions kept in memory and in one report (a device runs few in its life)
REPORT_PATH = "/v1/fleet/report"
_REPORT_CAP = 4096  # bytes read of the service's answer to a report
_CONFIDENT = Reason.CONFIDENT.value


@dataclass
class VersionCounts:
    """Counts of one edge model version. ``unsure``: answers whose edge confidence was under its
    threshold (what calibration predicts as the escalation share), of ``edge_ran`` answers."""

    answers: Counter = field(default_factory=Counter)  # "source/reason" -> answers
    edge_ran: int = 0
    unsure: int = 0
    escalated: int = 0  # answered by the cloud
    audits_sent: int = 0
    audits_agreed: int = 0
    audits_failed: int = 0
    audits_dropped: int = 0
    audits_skipped_budget: int = 0

    def report(self) -> dict[str, int]:
        return {"answers": sum(self.answers.values()), "escalated": self.escalated, "edge_ran": self.edge_ran,
                "unsure": self.unsure, "audited": self.audits_sent - self.audits_failed, "agreed": self.audits_agreed}


class FieldMonitor:
    """Per-version field counts, shadow audits, drift alarm and fleet report of one router."""

    def __init__(self, router: "Router") -> None:
        self._router = router
        self._lock = threading.Lock()
        self._versions: dict[str, VersionCounts] = {}
        self._unreported: dict[str, Counter] = {}
        # The drift window: a ring of 0/1 "unsure" flags (bytearray: a batch is written as slices
        # and summed in C), its fill and write position, and the running sum of its flags.
        self._window = bytearray(1)
        self._window_len = 0
        self._window_pos = 0
        self._window_sum = 0
        self._window_version: Optional[str] = None
        self._since_check = 0
        self._pending = 0  # audits handed to the I/O thread and not finished
        self._queue: Optional[asyncio.Queue] = None
        self._tasks: list = []  # concurrent futures of the drainer and the reporter, cancelled at close
        self._loop_tasks: list = []  # the same as asyncio tasks (appended on the I/O loop)
        self._reporter_started = False
        self._alarmed: set[str] = set()
        self.alarm: Optional[dict[str, Any]] = None
        self.alarms: list[dict[str, Any]] = []
        self.rollbacks: list[str] = []
        self.reports_sent = 0
        self.report_error: Optional[str] = None

    # ------------------------------------------------------------------ the caller's side

    def _counts(self, version: str) -> VersionCounts:
        c = self._versions.get(version)
        if c is None:
            if len(self._versions) >= MAX_VERSIONS:  # forget the oldest version seen
                self._versions.pop(next(iter(self._versions)))
            c = self._versions[version] = VersionCounts()
        return c

    def observe(self, req, predictions, local) -> None:
        """After a request answered: count it; sample confident edge rows for audit. On the
        caller's thread, so kept to plain attribute reads and integer adds (a few microseconds)."""
        version = req.edge_version
        policy = req.policy
        thresholds = req.thresholds
        audit: list[int] = []
        # Nothing leaves under privacy, in edge_only mode (never the network) or without an endpoint.
        offline = req.privacy or policy.privacy_mode or req.mode is Mode.EDGE_ONLY or not req.endpoints
        rate = 0.0 if offline else policy.audit_rate
        size = policy.drift.window
        # Per row only what differs (the answer's key, whether the edge was unsure, the audit
        # draw); the counts go in once per key and the flags into the window as one slice.
        keys: dict = {}
        flags = bytearray()
        escalated = 0
        rows = predictions
        if len(rows) == 1 and rows[0].source == "edge":  # the confident hot path: no loop
            p = rows[0]
            reason = p.reason._value_
            keys[(p.source, reason)] = 1
            flags.append(p.confidence < thresholds[p.class_index])
            if rate and reason == _CONFIDENT and req.rng.random() < rate:
                audit.append(0)
            rows = ()
        for i, p in enumerate(rows):
            source, reason = p.source, p.reason._value_  # a plain attribute (Enum.value is a descriptor)
            key = (source, reason)
            keys[key] = keys.get(key, 0) + 1
            if source == "cloud":
                escalated += 1
                opinion = p.edge
                if opinion is None:
                    continue
                flags.append(opinion.confidence < thresholds[opinion.class_index])
            else:
                flags.append(p.confidence < thresholds[p.class_index])
                if rate and reason == _CONFIDENT and req.rng.random() < rate:
                    audit.append(i)
        with self._lock:
            c = self._counts(version)
            for key, k in keys.items():
                c.answers[key] += k
            c.escalated += escalated
            unsure = flags.count(1)
            c.edge_ran += len(flags)
            c.unsure += unsure
            if self._window_version != version or len(self._window) != size:  # a new model or window: start again
                self._window = bytearray(size)
                self._window_len = self._window_pos = self._window_sum = 0
                self._window_version = version
            if flags:
                self._push(flags, unsure, size)
            # Looked at every 8th answer once the window is full: the band moves slowly.
            self._since_check += len(predictions)
            full = self._window_len == size
            check = self._since_check >= 8 and full and version not in self._alarmed
            if check:
                self._since_check = 0
            share = self._window_sum / size
        if check:
            self._check_escalation(version, policy, share, size)
        if audit and local is not None and local.x is not None:
            self._enqueue(req, version, local, predictions, audit)
        if (policy.fleet_report_interval_s > 0 and not self._reporter_started and not policy.privacy_mode
                and policy.mode is not Mode.EDGE_ONLY and req.endpoints):
            self._start_reporter()

    def _push(self, flags: bytearray, ones: int, size: int) -> None:
        """Append ``flags`` (``ones`` of them set) to the window ring, oldest first out (under the lock)."""
        window = self._window
        if len(flags) >= size:  # only the newest ``size`` stay
            flags = flags[-size:]
            ones = flags.count(1)
            window[:] = flags
            self._window_pos, self._window_len, self._window_sum = 0, size, ones
            return
        # Slots not yet filled hold 0, so counting the overwritten slice is right before the ring is full too.
        pos, m = self._window_pos, len(flags)
        end = pos + m
        if m == 1:  # one answer (batch 1): one slot
            gone = window[pos]
            window[pos] = ones
        elif end <= size:
            gone = window.count(1, pos, end)
            window[pos:end] = flags
        else:  # wraps around the end of the ring
            head = size - pos
            gone = window.count(1, pos, size) + window.count(1, 0, end - size)
            window[pos:] = flags[:head]
            window[:end - size] = flags[head:]
        self._window_sum += ones - gone
        self._window_pos = end % size
        self._window_len = min(size, self._window_len + m)

    def _enqueue(self, req, version: str, local, predictions, rows: list[int]) -> None:
        with self._lock:
            room = req.policy.audit_queue - self._pending
            c = self._counts(version)
            if room < len(rows):
                c.audits_dropped += len(rows) - max(room, 0)
                rows = rows[:max(room, 0)]
            if not rows:
                return
            self._pending += len(rows)
        idx = np.asarray(rows)
        x = local.x[idx].copy()  # the request's buffers are the caller's again once it returns
        pixels = None if local.pixels is None else local.pixels[idx].copy()
        edge_cls = [predictions[i].class_index for i in rows]
        # The inputs too, for an endpoint whose model takes another input size (arrays copied, as x).
        images = None if req.normalised else [
            im.copy() if isinstance(im, np.ndarray) else im for im in (req.images[i] for i in rows)]
        item = (req, version, x, pixels, edge_cls, images)
        try:
            io = self._router._ensure_io()
            if self._queue is None:
                with self._lock:
                    if self._queue is None:
                        self._queue = asyncio.Queue()
                        self._tasks.append(io.submit(self._drain(self._queue)))
            io.loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except Exception:  # noqa: BLE001 -- the router closed: the audit is dropped, the answer stands
            with self._lock:
                self._pending -= len(rows)
                self._counts(version).audits_dropped += len(rows)

    # ------------------------------------------------------------------ the I/O thread's side

    async def _drain(self, queue: asyncio.Queue) -> None:
        self._loop_tasks.append(asyncio.current_task())
        while True:
            req, version, x, pixels, edge_cls, images = await queue.get()
            try:
                await self._audit(req, version, x, pixels, edge_cls, images)
            except Exception:  # noqa: BLE001 -- an audit never takes the drainer down
                log.exception("field audit failed")
                with self._lock:
                    self._counts(version).audits_failed += len(edge_cls)
            finally:
                with self._lock:
                    self._pending -= len(edge_cls)

    async def _audit(self, req, version: str, x, pixels, edge_cls: list[int], images=None) -> None:
        router = self._router
        snap = router._snap
        policy = snap.policy
        if policy.privacy_mode or policy.mode is Mode.EDGE_ONLY:  # turned on since the answer: nothing leaves
            return
        state = next((s for s in snap.states if s.breaker.would_allow()), None)
        rows = len(edge_cls)
        if state is None:
            with self._lock:
                self._counts(version).audits_failed += rows
            return
        budget = req.budget  # the request's own (an A/B arm may have its own budget)
        if budget is not None:
            price = price_of(state.endpoint)
            room, _ = budget.headroom(0, price)
            if room < rows:
                with self._lock:
                    self._counts(version).audits_skipped_budget += rows
                return
            budget.charge("audit", rows, rows * price)
        with self._lock:
            self._counts(version).audits_sent += rows
        timeout = policy.cloud.per_try_timeout_ms / 1000.0
        now = router._clock()
        reply = await router._cloud.infer(CloudCall(state, x, pixels, timeout, timeout, f"{req.request_id}.audit",
                                                    deadline=now + timeout, clock=router._clock, images=images))
        if not isinstance(reply, CloudReply):
            with self._lock:
                self._counts(version).audits_failed += rows
            return
        agreed = int(sum(int(a == b) for a, b in zip(reply.probs.argmax(axis=1).tolist(), edge_cls)))
        with self._lock:
            c = self._counts(version)
            c.audits_agreed += agreed
            n, k = c.audits_sent - c.audits_failed, c.audits_agreed
        self._check_agreement(version, policy, k, n)

    # ------------------------------------------------------------------ drift alarm

    def expected_escalation(self, policy) -> Optional[float]:
        """The band's centre: the policy's ``drift.expected_escalation``, else the calibration of
        the release answering now (when its calibration is in force: ``updates.calibration:
        release``), else the edge manifest's ``metrics.expected_escalation`` (older manifests)."""
        if policy.drift.expected_escalation is not None:
            return policy.drift.expected_escalation
        cal = getattr(self._router, "_release_cal", None)
        if cal is not None and cal.expected_escalation is not None and policy.updates.calibration == "release":
            return cal.expected_escalation
        edge = self._router.edge_model
        metrics = getattr(getattr(edge, "manifest", None), "metrics", None) or {}
        value = metrics.get("expected_escalation")
        return float(value) if isinstance(value, (int, float)) else None

    def _check_escalation(self, version: str, policy, share: float, n: int) -> None:
        p0 = self.expected_escalation(policy)
        if p0 is None or version in self._alarmed:
            return
        tol = policy.drift.z * math.sqrt(max(p0 * (1 - p0), 1e-12) / n)
        if abs(share - p0) > tol:
            self._fire(version, policy, "escalation",
                       f"edge {version}: realised escalation {share:.3f} over {n} answers is outside the calibrated "
                       f"band {p0:.3f} ± {tol:.3f}", share=round(share, 4), expected=p0, answers=n)

    def _check_agreement(self, version: str, policy, agreed: int, n: int) -> None:
        floor = policy.agreement_floor
        if floor is None or n < MIN_AUDITS or version in self._alarmed:
            return
        lo, hi = wilson(agreed, n, policy.drift.confidence)
        if hi < floor:
            self._fire(version, policy, "agreement",
                       f"edge {version}: audit agreement {agreed}/{n} (upper bound {hi:.3f}) is under the "
                       f"agreement_floor {floor}", agreed=agreed, audited=n, upper=round(hi, 4))

    def _fire(self, version: str, policy, kind: str, message: str, **figures) -> None:
        with self._lock:
            if version in self._alarmed:
                return
            self._alarmed.add(version)
            self.alarm = {"version": version, "kind": kind, "message": message, "at": time.time(),
                          "rollback": None, **figures}
            self.alarms.append(self.alarm)
        log.warning("drift alarm: %s%s", message, "; rolling back" if policy.drift.rollback else "")
        if policy.drift.rollback:
            threading.Thread(target=self._rollback, args=(self.alarm,), name="router-field-rollback",
                             daemon=True).start()

    def _rollback(self, alarm: dict) -> None:
        router = self._router
        if router.edge_model is None or router.edge_model.version != alarm["version"]:
            alarm["rollback"] = "skipped: another version answers now"
            return
        try:
            updater = router.updater
            now = (updater.rollback(reason=f"drift alarm: {alarm['kind']}") if updater is not None
                   else router.rollback_edge())  # (the latter raises the ConfigError that says why not)
        except Exception as exc:  # noqa: BLE001 -- ConfigError (no updater), NothingToRollBack: said in stats
            alarm["rollback"] = f"failed: {exc}"
            log.error("drift alarm: rollback of edge %s failed: %s", alarm["version"], exc)
            return
        alarm["rollback"] = now
        self.rollbacks.append(f"{alarm['version']}->{now}")
        log.warning("drift alarm: edge %s rolled back; %s answers now", alarm["version"], now)

    # ------------------------------------------------------------------ fleet report

    def _start_reporter(self) -> None:
        with self._lock:
            if self._reporter_started:
                return
            self._reporter_started = True
        try:
            self._tasks.append(self._router._ensure_io().submit(self._report_loop()))
        except Exception:  # noqa: BLE001 -- closed router
            pass

    def pending_report(self) -> dict[str, dict[str, int]]:
        """The counts since the last successful report, per version (what the next report sends)."""
        with self._lock:
            now = {v: c.report() for v, c in self._versions.items()}
            out = {}
            for v, counts in now.items():
                sent = self._unreported.get(v, Counter())
                delta = {k: counts[k] - sent.get(k, 0) for k in counts}
                if any(delta.values()):
                    out[v] = delta
            return dict(list(out.items())[-MAX_VERSIONS:])

    async def _report_loop(self) -> None:
        self._loop_tasks.append(asyncio.current_task())
        router = self._router
        while not router._closed:
            policy = router._snap.policy
            interval = policy.fleet_report_interval_s
            if interval <= 0 or policy.privacy_mode or policy.mode is Mode.EDGE_ONLY:
                self._reporter_started = False
                return
            await asyncio.sleep(interval)
            await self.report_now()

    async def report_now(self) -> bool:
        """One report (on the I/O loop); True when the service took it."""
        router = self._router
        snap = router._snap
        if snap.policy.privacy_mode or snap.policy.mode is Mode.EDGE_ONLY or not snap.states:
            return False
        delta = self.pending_report()
        if not delta:
            return True
        ep = snap.states[0].endpoint
        body = json.dumps({"versions": delta}).encode()
        try:
            status, _, content = await router._cloud._exchange(ep, "POST", ep.url + REPORT_PATH, _REPORT_CAP,
                                                               snap.policy.cloud.per_try_timeout_ms / 1000.0,
                                                               content=body)
        except Exception as exc:  # noqa: BLE001 -- kept for the next report
            self.report_error = f"{type(exc).__name__}: {exc}"
            return False
        if status != 200:
            self.report_error = f"HTTP {status}: {content[:200].decode(errors='replace')}"
            return False
        with self._lock:
            for v, d in delta.items():
                sent = self._unreported.setdefault(v, Counter())
                for k, n in d.items():
                    sent[k] += n
        self.reports_sent += 1
        self.report_error = None
        return True

    def close(self, timeout_s: float = 2.0) -> None:
        """Cancel the drainer and the reporter before the router's I/O loop closes, and wait (bounded)
        until they have ended there: an audit in flight is then cancelled on its loop, not destroyed
        with it (asyncio's "Task was destroyed but it is pending" at exit)."""
        tasks = list(self._loop_tasks)
        loop = tasks[0].get_loop() if tasks else None
        if loop is not None and loop.is_running():
            async def stop() -> None:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            try:
                asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout_s)
            except Exception:  # noqa: BLE001 -- best effort at shutdown (the loop may be stopping)
                pass
        for task in self._tasks:
            task.cancel()

    # ------------------------------------------------------------------ stats

    def snapshot(self, policy, current_version: str) -> dict:
        conf = policy.drift.confidence
        with self._lock:
            versions = {}
            for v, c in self._versions.items():
                audited = c.audits_sent - c.audits_failed
                versions[v] = {
                    "answers": {f"{k[0]}/{k[1]}": n for k, n in sorted(c.answers.items())},
                    "requests": sum(c.answers.values()),
                    "escalation_rate": c.escalated / max(1, sum(c.answers.values())),
                    "unsure_rate": c.unsure / c.edge_ran if c.edge_ran else None,
                    "audits": {"sent": c.audits_sent, "agreed": c.audits_agreed, "failed": c.audits_failed,
                               "dropped": c.audits_dropped, "skipped_budget": c.audits_skipped_budget},
                    "agreement": c.audits_agreed / audited if audited else None,
                    "agreement_ci": list(wilson(c.audits_agreed, audited, conf)) if audited else None,
                }
            window = {"version": self._window_version, "answers": self._window_len,
                      "unsure_rate": self._window_sum / self._window_len if self._window_len else None}
            alarm = dict(self.alarm) if self.alarm else None
        return {"edge_version": current_version, "versions": versions, "window": window,
                "expected_escalation": self.expected_escalation(policy), "agreement_floor": policy.agreement_floor,
                "audit_rate": policy.audit_rate, "audits_pending": self._pending, "alarm": alarm,
                "alarms": len(self.alarms), "rollbacks": list(self.rollbacks),
                "fleet_reports": {"sent": self.reports_sent, "last_error": self.report_error}}
