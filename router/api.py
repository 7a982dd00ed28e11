"""``Router``: the one ``predict()`` client apps call -- thin sync and async shells over the
sans-I/O request flow in :mod:`router.flow`.

* ``predict`` runs everything in the caller's thread: the edge, and an escalation's attempts over
  a pooled synchronous httpcore connection whose every socket operation is cut to the attempt's
  absolute end (no event loop, no thread hop: those were a third of an escalation's client time).
  Only rows that must be split into concurrent requests (``max_batch_size``) or an injected
  transport go to the router's private I/O thread (:mod:`router._io`, an asyncio loop, httpx).
* ``apredict`` runs preprocessing + edge inference in a worker thread (ONNX never blocks the
  caller's event loop) and awaits cloud attempts on the caller's loop.
* Every cloud attempt ends at an absolute point in time fixed by the flow, whoever runs it and
  however late it starts: a caller never waits past its deadline for the network.
* Constructing a router creates no socket. With cloud endpoints and privacy off it does the first
  escalation's one-off work (imports, httpx set-up, worker threads) so that no deadline pays for
  it; the I/O loop (whose self-pipe is a socket pair) starts with the first request that may
  escalate. Under ``privacy_mode`` nothing network-related happens at all.

Policy reload (:mod:`router.reload`), the readiness probe (:mod:`router.probe`) and the
process-wide default router (:mod:`router._default`) live in their own modules.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Sequence

import numpy as np

from edge_model.errors import EdgeModelError, InputError
from edge_model.preprocess import PreprocessConfig, normalise, preload_decoders, preprocess, to_pixels
from edge_model.runtime import DEFAULT_EDGE_MANIFEST, EdgeModel, OnnxClassifier, SessionOptions
from router._io import IOThread
from router.audit import FieldMonitor
from router.ab import ExperimentPlan
from router.budget import budget_for
from router.cloud import CloudClient
from router.effects import CloudCall, CloudReply, LocalResult, LocalWork, Provisional, RouteRequest, Sleep
from router.errors import CloudTimeout, ConfigError, EdgeError, InvalidInput, RouterError
from router.flow import route
from router.health import EndpointState
from router.policy import DEFAULT_POLICY_PATH, CloudSettings, Mode, RoutingPolicy, load_policy
from router.prediction import Prediction
from router.probe import probe_loop
from router.reload import PolicyWatcher, guard_privacy
from router.telemetry import Telemetry

if TYPE_CHECKING:
    from router.progressive import ProgressiveHandle

log = logging.getLogger("router")


_EDGE_WORKERS = max(1, min(4, os.cpu_count() or 1))  # apredict's preprocessing + edge inference threads

# What the first escalation imported lazily (anyio defers its backend until first use), measured
# by diffing sys.modules around a first request; imported at construction instead, because an
# import on the I/O thread holds the GIL that a caller needs to return at its deadline.
_FIRST_REQUEST_MODULES = (
    "sniffio", "anyio.abc", "anyio.lowlevel", "anyio.to_thread", "anyio.streams.memory", "anyio.streams.stapled",
    "anyio.streams.tls", "anyio._core._sockets", "anyio._core._synchronization", "anyio._core._tasks",
    "anyio._backends._asyncio", "httpcore._async.connection_pool", "httpcore._async.http11", "httpcore._backends.anyio",
    "httpcore._sync.connection_pool", "httpcore._sync.http11", "httpcore._backends.sync",  # sync predict's path
    "encodings.idna", "stringprep",  # the socket module's codec for a host name, at the first connect (~1 ms)
)


class _AnswerCost:
    """How long answering took, recently, after an escalation failed: from the failed attempt's
    return -- or its planned end, if it returned later: a thread woken by its timeout may wait
    for the GIL (up to a switch interval, 5 ms) while others run -- to the caller getting its
    answer (the fallback built, telemetry recorded). When many
    requests time out together (a wave of callers, one deadline) they queue for the GIL and the
    last one pays for all; the flow keeps this much of the deadline back (at least the policy's
    ``budget_reserve_ms``) so the attempts end early enough for every answer to be on time.

    The worst of the last ``window`` failures, capped; forgotten ``max_age_s`` after the last
    failure (when escalations stop failing, nothing would ever replace a one-off stall)."""

    def __init__(self, window: int = 16, cap_s: float = 0.010, max_age_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._recent: deque[float] = deque(maxlen=window)
        self._clock = clock
        self._cap, self._max_age = cap_s, max_age_s
        self._lock = threading.Lock()
        self._worst, self._until = 0.0, 0.0

    def observe(self, seconds: float) -> None:
        with self._lock:
            now = self._clock()
            if now >= self._until:
                self._recent.clear()
            self._recent.append(min(seconds, self._cap))
            self._worst, self._until = max(self._recent), now + self._max_age

    @property
    def worst(self) -> float:
        # No clock read until a failure was seen (the confident path asks on every request).
        return self._worst if self._worst and self._clock() < self._until else 0.0


@dataclass(frozen=True)
class _Snapshot:
    """Everything a request reads from the policy, swapped as one reference on reload."""

    policy: RoutingPolicy
    thresholds: tuple[float, ...]
    states: tuple[EndpointState, ...]
    budget: Any = None  # router.budget.EscalationBudget (cloud.budget), kept across reloads
    experiment: ExperimentPlan | None = None  # the A/B arms (policy `experiments`)


def _edge_form(pre: PreprocessConfig):
    """The edge's input as the cloud client arranges pixels for it (``None`` for a tensor model)."""
    return None if pre.codec == "tensor" else pre


class Router:
    """Answers on-device or escalates to the cloud, per request; see the module docstring.

    ``privacy=True`` (or a ``policy`` object with ``privacy_mode: true``) pins privacy for the
    router's life: no policy file can lift it. ``policy_path``: the file the policy came from,
    re-read when it changes (see :mod:`router.reload`)."""

    def __init__(
        self,
        policy: RoutingPolicy | None = None,
        *,
        policy_path: str | os.PathLike | None = None,
        privacy: bool = False,
        edge_model: OnnxClassifier | None = None,
        clock: Callable[[], float] = time.monotonic,
        transport=None,
        rng: random.Random | None = None,
    ) -> None:
        self._policy_path = Path(policy_path) if policy_path else None
        self._watcher = PolicyWatcher(self._policy_path) if self._policy_path else None
        self._pinned_privacy = bool(privacy) or (policy is not None and policy.privacy_mode)
        if policy is None:
            policy = self._watcher.load() if self._watcher else load_policy(None)
        elif self._watcher is not None:
            self._watcher.baseline()
        if self._pinned_privacy and not policy.privacy_mode:
            policy = policy.model_copy(update={"privacy_mode": True})
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.RLock()
        self._reload_lock = threading.Lock()
        self._telemetry = Telemetry()
        self._answer_cost = _AnswerCost()
        self._field = FieldMonitor(self)  # per-version counts, audits, drift alarm (router/audit.py)
        self._id_prefix, self._ids = os.urandom(4).hex(), itertools.count(1)  # unique per router, cheap per request
        self._edge, self._edge_error = self._load_edge(policy, edge_model, self._policy_path)
        if self._edge is None and policy.edge.required:
            raise self._edge_error
        preload_decoders()  # Pillow's plugins now, not inside the first image request's deadline
        self._labels = self._edge.labels if self._edge else tuple(_default_labels())
        self._release_cal = None  # calibration of the release answering now (router/updates.py)
        self._edge_version = self._edge.version if self._edge else "unavailable"
        self._pre = self._edge.preprocess_config if self._edge else PreprocessConfig()
        if policy.edge.max_pixels != self._pre.max_pixels:
            self._pre = PreprocessConfig(**{**self._pre.__dict__, "max_pixels": policy.edge.max_pixels})
        self._spec: tuple = (None, None, None)  # (config, its np_dtype, its sample_shape): see _local
        self._snap = self._snapshot(policy, {})
        self._io: IOThread | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._probe_started = False
        self._closed = False
        self._next_reload_check = clock() + policy.reload_check_interval_s
        # Under privacy the client gets no endpoints: preparing real ones imports the async stack.
        self._cloud = CloudClient(CloudSettings() if policy.privacy_mode else policy.cloud, transport,
                                  classes=len(self._labels),  # answers with another class count are refused
                                  labels=self._labels,  # and endpoints publishing other labels
                                  edge_form=_edge_form(self._pre))  # pixels arranged as each endpoint takes them
        self._warm(policy)
        self._updater = None
        if policy.updates.enabled:  # the signed release channel (optional extra), never on the request path
            from router.updates import attach_updater

            self._updater = attach_updater(self, self._policy_path)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, path: str | os.PathLike | None = None, **kwargs) -> "Router":
        path = Path(path or os.environ.get("HYBRID_ROUTER_POLICY") or DEFAULT_POLICY_PATH)
        return cls(policy_path=path, **kwargs)

    @staticmethod
    def _load_edge(policy: RoutingPolicy, given: OnnxClassifier | None, policy_path: Path | None = None):
        if given is not None:
            return given, None
        manifest = Path(policy.edge.manifest) if policy.edge.manifest else DEFAULT_EDGE_MANIFEST
        if not manifest.is_absolute() and policy_path is not None:
            manifest = policy_path.parent / manifest  # relative to the policy file, not the working directory
        try:
            return EdgeModel(manifest, options=SessionOptions(intra_op_threads=policy.edge.intra_op_threads)), None
        except EdgeModelError as exc:
            # Loud: the router still answers (requests escalate with reason edge_error), but every
            # answer now costs a round trip and none is possible offline or under privacy.
            log.error("edge model unavailable, every request will escalate (set edge.required: true to refuse "
                      "to start instead): %s", exc)
            return None, EdgeError(f"edge model unavailable: {exc}")

    def _snapshot(self, policy: RoutingPolicy, old: dict[str, EndpointState]) -> _Snapshot:
        states = tuple(old.get(ep.key) or EndpointState(ep, policy.cloud, self._clock) for ep in policy.cloud.endpoints)
        for s, ep in zip(states, policy.cloud.endpoints):
            s.endpoint = ep  # same URL/model/version; other fields (priority, key env) may have changed
        prev = getattr(self, "_snap", None)
        budget = budget_for(policy.cloud.budget, prev.budget if prev else None, self._clock)
        plan = None
        if policy.experiments is not None:
            plan = ExperimentPlan.build(policy, self._labels, budget, prev.experiment if prev else None, self._clock)
        arm_budgets = {name: r.budget for name, r in plan.routes.items() if r.budget is not budget} if plan else {}
        self._telemetry.attach({"": budget, **arm_budgets}, policy.experiments)
        try:
            cal = self._release_cal  # a release's calibrated threshold travels with it unless the policy pins its own
            if cal is not None and cal.threshold is not None and policy.updates.calibration == "release":
                thresholds = (float(cal.threshold),) * len(self._labels)
            else:
                thresholds = policy.thresholds_for(self._labels)
        except ConfigError as exc:  # name the file: the labels are only known once the edge model loaded
            if self._policy_path is None:
                raise
            raise ConfigError(f"{self._policy_path}: {exc}") from None
        return _Snapshot(policy, thresholds, states, budget, plan)

    def _warm(self, policy: RoutingPolicy) -> None:
        """Pay the first escalation's one-off costs now (the async stack's imports, httpx's client
        and SSL set-up, the worker threads), so they never land inside a request's deadline.
        Creates no socket (not even the I/O loop's self-pipe: that waits for the first request
        that may escalate); does nothing under privacy or without endpoints."""
        if policy.privacy_mode or not policy.cloud.endpoints:
            return
        self._cloud.prepare(policy.cloud)
        import importlib

        import httpx

        for name in _FIRST_REQUEST_MODULES:
            try:
                importlib.import_module(name)
            except ImportError:  # another anyio/httpcore layout: that request pays, nothing breaks
                pass
        httpx.AsyncClient(trust_env=False, verify=False)  # first construction builds httpcore's pool types
        for ep in policy.cloud.endpoints:  # sync predict's connection pools (no socket until a request)
            self._cloud.warm_sync(ep)
        ex = self._local_executor()
        for f in [ex.submit(time.sleep, 0) for _ in range(_EDGE_WORKERS)]:  # spawn the workers now
            f.result()

    @property
    def policy(self) -> RoutingPolicy:
        return self._snap.policy

    @property
    def edge_model(self) -> OnnxClassifier | None:
        return self._edge

    def _swap_edge(self, edge: OnnxClassifier, *, release: bool = True) -> None:
        """Install an edge model that :mod:`router.updates` validated (same input spec), with its
        labels (the endpoints' published labels are compared again) and, for a ``release``, its
        manifest's calibration. Each request reads the model reference once, so it runs on the old
        or the new one, whole; one that began under other labels does not take its answer (_run_edge)."""
        pre = edge.preprocess_config
        if pre.max_pixels != self._snap.policy.edge.max_pixels:
            pre = PreprocessConfig(**{**pre.__dict__, "max_pixels": self._snap.policy.edge.max_pixels})
        with self._lock:
            self._pre = pre
            if tuple(edge.labels) != tuple(self._labels) or _edge_form(pre) != self._cloud.edge_form:
                self._labels = edge.labels
                self._cloud.relabel(self._labels, self._snap.states, _edge_form(pre))
            self._release_cal = getattr(edge.manifest, "calibration", None) if release else None
            self._edge, self._edge_error, self._edge_version = edge, None, edge.version
            self._snap = self._snapshot(self._snap.policy, {s.key: s for s in self._snap.states})

    def rollback_edge(self) -> str:
        """Go back to the previous edge model version now; returns the version that answers."""
        if self._updater is None:
            raise ConfigError("rollback_edge: updates are not enabled in the policy (set updates.enabled: true)")
        return self._updater.rollback()

    @property
    def updater(self):
        """The :class:`router.updates.EdgeUpdater` when the policy enables updates, else None."""
        return self._updater

    # ------------------------------------------------------------------ policy reload

    def reload_policy(self, policy: RoutingPolicy | None = None) -> RoutingPolicy:
        """Swap in a new policy atomically (from ``policy`` or by re-reading the file, waiting
        for it to be at rest). Requests in flight finish with the snapshot they started with.
        A policy given here with ``privacy_mode: true`` pins privacy, as at construction."""
        if policy is None:
            if self._watcher is None:
                raise ConfigError("this router was not built from a file; pass the new policy")
            return self._apply(self._watcher.load(), str(self._policy_path))
        if policy.privacy_mode:
            self._pinned_privacy = True
        return self._apply(policy, "reload_policy()")

    def _apply(self, policy: RoutingPolicy, source: str) -> RoutingPolicy:
        with self._lock:
            policy = guard_privacy(self._snap.policy, policy, self._pinned_privacy, source)
            prev = self._snap
            old = prev.policy
            self._snap = replace(prev, policy=policy)  # what _swap_edge reads (max_pixels)
            try:
                if policy.edge != old.edge:
                    edge, err = self._load_edge(policy, None, self._policy_path)
                    if edge is None:
                        raise ConfigError(f"edge: {err}")
                    active = self._updater.active if self._updater is not None else None
                    if active is not None:  # a validated release stays: only updates.pin or a rollback replace it
                        self._updater.set_base(edge)
                        log.warning("%s changed edge: the installed release %s keeps answering; %s %s is now what "
                                    "a rollback returns to (set updates.pin, or call rollback_edge())", source, active,
                                    edge.name, edge.version)
                    else:
                        if self._updater is not None:
                            self._updater.set_base(edge)
                        self._swap_edge(edge, release=False)
                self._snap = self._snapshot(policy, {s.key: s for s in self._snap.states})
            except BaseException:
                self._snap = prev
                raise
            if self._updater is not None and policy.updates.pin != old.updates.pin:
                self._updater.wake()  # a new pin is taken at once, not at the next interval
            if not policy.privacy_mode:
                self._cloud.prepare(policy.cloud)
            log.info("routing policy reloaded (mode=%s threshold=%s privacy=%s)", policy.mode.value,
                     policy.confidence_threshold, policy.privacy_mode)
            return policy

    def _maybe_reload(self, now: float) -> None:
        if not self._reload_lock.acquire(blocking=False):
            return  # another request is looking at the file
        try:
            policy = self._watcher.poll()
            # A change seen but not yet at rest is looked at again soon; otherwise at the interval.
            wait = self._watcher.settle_s if self._watcher.pending else self._snap.policy.reload_check_interval_s
            self._next_reload_check = now + wait
            if policy is not None:
                try:
                    self._apply(policy, str(self._policy_path))
                except ConfigError as exc:
                    # A bad edit must not take the router down: keep serving with the last good policy.
                    log.error("policy file changed but cannot be applied; keeping the previous policy: %s", exc)
        finally:
            self._reload_lock.release()

    # ------------------------------------------------------------------ request set-up

    def _begin(self, images: Sequence[Any], deadline_ms, privacy, mode, request_id, threshold,
               normalised=False, ab_key: str | None = None) -> RouteRequest:
        if self._closed:
            raise RouterError("this router is closed")
        now = self._clock()
        snap = self._snap
        if self._watcher is not None and snap.policy.reload_check_interval_s > 0 and now >= self._next_reload_check:
            self._maybe_reload(now)
            snap = self._snap
        policy = snap.policy
        thresholds, budget, arm = snap.thresholds, snap.budget, None
        request_id = request_id or f"{self._id_prefix}-{next(self._ids)}"
        if snap.experiment is not None:  # the arm's policy; explicit arguments of this call still win
            route_ = snap.experiment.route_for(None if ab_key is None else str(ab_key), request_id)
            policy, thresholds, budget, arm = route_.policy, route_.thresholds, route_.budget, route_.name
        try:
            mode = Mode(mode) if mode is not None else policy.mode
        except ValueError:
            raise ConfigError(f"mode: {mode!r} is not one of {[m.value for m in Mode]}") from None
        budget_ms = policy.default_deadline_ms if deadline_ms is None else float(deadline_ms)
        if not budget_ms > 0:
            raise ConfigError(f"deadline_ms must be a positive number of milliseconds; got {deadline_ms!r}")
        if threshold is not None:
            if not 0 <= threshold <= 1:
                raise ConfigError(f"threshold must be within [0, 1]; got {threshold!r}")
            thresholds = (float(threshold),) * len(thresholds)
        # Positional, in RouteRequest's field order (keyword passing cost ~0.5 us per request):
        return RouteRequest(
            images,
            policy,
            mode,
            bool(privacy) or policy.privacy_mode,  # privacy: a call may add it, never lift the policy's
            now + budget_ms / 1000.0,  # deadline
            now,  # started
            request_id,
            self._labels,
            thresholds,
            self._edge_version,
            snap.states,  # endpoints
            self._rng,
            bool(normalised),
            budget,
            arm,
            False,  # progressive (router.progressive sets it)
            # reserve_s: the policy's (None) until an escalation failed and answering after it was timed
            _larger_reserve(self._answer_cost.worst, policy.budget_reserve_ms) if self._answer_cost._worst else None,
        )

    # ------------------------------------------------------------------ local work (no I/O)

    def _local(self, work: LocalWork, labels: tuple[str, ...] | None = None) -> LocalResult:
        cfg = self._pre
        spec = self._spec
        if spec[0] is not cfg:  # the config's dtype and shape, computed once per config (properties)
            spec = self._spec = (cfg, cfg.np_dtype, cfg.sample_shape)
        _, dtype, shape = spec
        n = len(work.images)
        image = work.images[0]
        if n == 1 and work.normalised and type(image) is np.ndarray and image.dtype == dtype and image.shape == shape:
            # Declared model input (the hot path of an app that preprocesses itself): check and go.
            if not _all_finite(image):
                raise InvalidInput("array contains NaN or infinite values")
            return self._run_edge(work, image[None], None, labels)
        if n > 1 and work.normalised and cfg.codec != "tensor":
            images = work.images
            # Every image a numpy array of the model's dtype (set-builders: half the cost of a loop
            # of tests), and of its shape: np.array stacks equal shapes only, the stack's shape says it.
            if set(map(type, images)) == _NDARRAY and {im.dtype for im in images} == {dtype}:
                # A batch of declared model input: one copy (the caller's arrays are never aliased;
                # np.array of equal-shaped arrays is np.stack's result at a third of its cost) and
                # one finiteness check instead of ~13 us of checks per image.
                try:
                    x = np.array(images)
                except ValueError:  # ragged: the per-image path below names the image at fault
                    x = None
                if x is not None and x.shape[1:] == shape and _all_finite(x):
                    return self._run_edge(work, x, None, labels)
                # otherwise the per-image path below names the image at fault
        tensor = cfg.codec == "tensor"  # a model whose app encodes its input: no pixels, no decoding
        x = np.empty((n, *cfg.sample_shape), dtype=cfg.np_dtype) if not tensor else None
        pixels: np.ndarray | None = None if tensor else np.empty((n, *cfg.pixel_shape), dtype=np.uint8)
        i = 0
        try:
            for i, image in enumerate(work.images):
                if tensor:
                    row = preprocess(image, cfg)
                    x = np.empty((n, *row.shape), dtype=row.dtype) if x is None else x
                    x[i] = row
                elif isinstance(image, np.ndarray) and image.dtype.kind == "f":
                    # Model input only when declared so; otherwise the preprocessing refuses it
                    # (a [0, 1] image fed as model input silently costs most of the accuracy).
                    x[i] = preprocess(image, cfg, normalised=work.normalised)
                    pixels = None  # no pixels to send
                else:
                    p = to_pixels(image, cfg)
                    x[i] = normalise(p, cfg).reshape(cfg.sample_shape)
                    if pixels is not None:
                        pixels[i] = p
        except InputError as exc:
            where = f"image {i}: " if n > 1 else ""
            raise InvalidInput(f"{where}{exc}") from exc
        except EdgeModelError as exc:  # not the input's fault (e.g. the decode budget is busy)
            raise EdgeError(f"preprocessing failed: {exc}") from exc
        return self._run_edge(work, x, pixels, labels)

    def _run_edge(self, work: LocalWork, x: np.ndarray, pixels: np.ndarray | None,
                  labels: tuple[str, ...] | None = None) -> LocalResult:
        if not work.run_edge:
            return LocalResult(x, pixels)
        edge = self._edge
        if edge is None:
            return LocalResult(x, pixels, edge_error=self._edge_error)
        if labels is not None and edge.labels is not labels and tuple(edge.labels) != tuple(labels):
            # Swapped to a model with other labels after this request began: its class indices
            # would be read under the old names.
            return LocalResult(x, pixels, edge_error=EdgeError("the edge model changed labels during this request"))
        t0 = _perf_counter()
        try:
            probs = edge.predict_proba(x, validate=False)  # x came out of the preprocessing
        except EdgeModelError as exc:
            return LocalResult(x, pixels, edge_error=EdgeError(f"edge inference failed: {exc}"), edge_s=time.perf_counter() - t0)
        return LocalResult(x, pixels, probs, None, _perf_counter() - t0)  # positional: x, pixels, probs, edge_error, edge_s

    # ------------------------------------------------------------------ sync shell

    def predict(self, image, *, deadline_ms: float | None = None, privacy: bool | None = None,
                mode: str | Mode | None = None, request_id: str | None = None,
                threshold: float | None = None, normalised: bool = False, ab_key: str | None = None) -> Prediction:
        """Classify one image within ``deadline_ms``: anything :mod:`edge_model.preprocess`
        accepts as pixels (a path, encoded bytes, a PIL image, a uint8 array). A float array is
        taken as model-ready input only with ``normalised=True``; otherwise it is refused.
        ``ab_key``: the caller's key (user, device) for the policy's A/B experiment: the same key
        always gets the same arm (``Prediction.arm``)."""
        req = self._begin((image,), deadline_ms, privacy, mode, request_id, threshold, normalised, ab_key)
        return self._drive_sync(req, route(req, self._clock))[0]

    def predict_batch(self, images: Iterable, *, deadline_ms: float | None = None, privacy: bool | None = None,
                      mode: str | Mode | None = None, request_id: str | None = None,
                      threshold: float | None = None, normalised: bool = False,
                      ab_key: str | None = None) -> list[Prediction]:
        """Classify several images under one deadline; escalations go as one cloud request."""
        images = list(images)
        if not images:
            return []
        req = self._begin(images, deadline_ms, privacy, mode, request_id, threshold, normalised, ab_key)
        return self._drive_sync(req, route(req, self._clock))

    def _drive_sync(self, req: RouteRequest, gen) -> list[Prediction] | Provisional:
        """Execute the flow's effects inline until it ends (its answers, recorded), or -- only in
        a progressive call -- until it yields a :class:`Provisional` (returned; ``gen`` stays
        open for :mod:`router.progressive` to resume)."""
        attempts = 0
        local = None
        failed_at = None
        try:
            effect = gen.send(None)
            while True:
                kind = type(effect)
                if kind is LocalWork:
                    result = local = self._local(effect, req.labels)
                elif kind is CloudCall:
                    attempts += 1
                    ends = time.perf_counter() + effect.remaining_s()
                    result = self._cloud_sync(effect, req.deadline)
                    failed_at = None if type(result) is CloudReply else min(time.perf_counter(), ends)
                elif kind is Sleep:
                    time.sleep(max(0.0, min(effect.seconds, req.deadline - self._clock())))
                    result = None
                else:
                    return effect
                effect = gen.send(result)
        except StopIteration as stop:
            outcome = stop.value
        except BaseException as exc:
            gen.close()
            if isinstance(exc, RouterError):
                self._telemetry.record_failure(exc, attempts)
            raise
        self._record(req, outcome, local)
        if failed_at is not None:
            self._answer_cost.observe(time.perf_counter() - failed_at)
        return outcome.predictions

    def _record(self, req: RouteRequest, outcome, local: LocalResult | None = None) -> None:
        policy = req.policy
        details = not req.privacy or policy.decision_log_privacy_details
        self._telemetry.record(outcome.predictions, outcome.cloud_calls, outcome.bytes_sent, policy.decision_log,
                               details)
        # After the answer is built: counts per edge version; audits leave on the I/O thread.
        self._field.observe(req, outcome.predictions, local)

    def _cloud_sync(self, call: CloudCall, answer_by: float):
        if self._cloud.can_run_sync(call):
            # In this thread (no event loop, no hop): every socket operation is cut to the
            # attempt's absolute end, so the attempt returns by then whatever the server does.
            self._start_probe()
            if self._closed:
                raise RouterError("this router is closed")
            return self._cloud.infer_sync(call)
        io = self._start_io()
        fut = io.submit(self._cloud.infer(_late(call, answer_by)))
        try:
            # The attempt's absolute end, not a length from when the I/O loop gets to it.
            return fut.result(call.remaining_s())
        except concurrent.futures.TimeoutError:
            # Not cancelled from here: the attempt ends itself after the deadline (see _late), so
            # its clean-up does not compete for the GIL with this caller's answer.
            return _timed_out(call)

    def predict_progressive(self, image, *, deadline_ms: float | None = None, privacy: bool | None = None,
                            mode: str | Mode | None = None, request_id: str | None = None,
                            threshold: float | None = None, normalised: bool = False,
                            ab_key: str | None = None) -> "ProgressiveHandle":
        """The edge's answer now (``h.first``, computed on this thread) and the cloud's refinement
        when it lands within the deadline (``h.final()``); see :mod:`router.progressive`."""
        from router.progressive import start

        return start(self, self._begin((image,), deadline_ms, privacy, mode, request_id, threshold, normalised,
                                       ab_key))

    # ------------------------------------------------------------------ async shell

    def apredict_progressive(self, image, *, deadline_ms: float | None = None, privacy: bool | None = None,
                             mode: str | Mode | None = None, request_id: str | None = None,
                             threshold: float | None = None, normalised: bool = False,
                             ab_key: str | None = None) -> AsyncIterator[Prediction]:
        """``async for p in router.apredict_progressive(image)``: the edge's answer, then the
        final one (only one when nothing is refined); see :mod:`router.progressive`. The
        deadline starts at this call."""
        from router.progressive import iterate

        return iterate(self, self._begin((image,), deadline_ms, privacy, mode, request_id, threshold, normalised,
                                         ab_key))


    async def apredict(self, image, *, deadline_ms: float | None = None, privacy: bool | None = None,
                       mode: str | Mode | None = None, request_id: str | None = None,
                       threshold: float | None = None, normalised: bool = False,
                       ab_key: str | None = None) -> Prediction:
        req = self._begin((image,), deadline_ms, privacy, mode, request_id, threshold, normalised, ab_key)
        return (await self._run_async(req))[0]

    async def apredict_batch(self, images: Iterable, *, deadline_ms: float | None = None, privacy: bool | None = None,
                             mode: str | Mode | None = None, request_id: str | None = None,
                             threshold: float | None = None, normalised: bool = False,
                             ab_key: str | None = None) -> list[Prediction]:
        images = list(images)
        if not images:
            return []
        return await self._run_async(self._begin(images, deadline_ms, privacy, mode, request_id, threshold, normalised,
                                                 ab_key))

    async def _run_async(self, req: RouteRequest) -> list[Prediction]:
        return await self._drive_async(req, route(req, self._clock))

    async def _drive_async(self, req: RouteRequest, gen, stop: Callable[[], bool] | None = None):
        """Await the flow's effects until it ends (its answers, recorded) or yields a
        :class:`Provisional` (returned, ``gen`` left open). ``stop`` (a progressive call's
        cancel) is checked before each further attempt or backoff: when set, the flow is closed
        and None returned."""
        loop = asyncio.get_running_loop()
        attempts = 0
        local = None
        failed_at = None
        try:
            effect = gen.send(None)
            while True:
                kind = type(effect)
                if stop is not None and kind is not LocalWork and stop():
                    if kind is CloudCall:
                        effect.state.breaker.release()  # a half-open trial slot taken for a call that will not go
                    gen.close()
                    return None
                if kind is LocalWork:
                    result = local = await loop.run_in_executor(self._local_executor(), self._local, effect,
                                                                req.labels)
                elif kind is CloudCall:
                    attempts += 1
                    self._start_probe()
                    ends = time.perf_counter() + effect.remaining_s()
                    result = await self._cloud_async(effect, req.deadline)
                    failed_at = None if type(result) is CloudReply else min(time.perf_counter(), ends)
                elif kind is Sleep:
                    await asyncio.sleep(max(0.0, min(effect.seconds, req.deadline - self._clock())))
                    result = None
                else:
                    return effect
                effect = gen.send(result)
        except StopIteration as stop_:
            outcome = stop_.value
        except BaseException as exc:
            gen.close()
            if isinstance(exc, RouterError):
                self._telemetry.record_failure(exc, attempts)
            raise
        self._record(req, outcome, local)
        if failed_at is not None:
            self._answer_cost.observe(time.perf_counter() - failed_at)
        return outcome.predictions

    async def _cloud_async(self, call: CloudCall, answer_by: float):
        # The attempt runs as its own task so that at the deadline this request answers first.
        # It is not cancelled: it ends itself after the request's deadline (see _late).
        task = asyncio.ensure_future(self._cloud.infer(_late(call, answer_by)))
        done, _ = await asyncio.wait((task,), timeout=call.remaining_s())
        if done:
            return task.result()
        return _timed_out(call)

    def _local_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        max_workers=_EDGE_WORKERS, thread_name_prefix="router-edge"
                    )
        return self._executor

    # ------------------------------------------------------------------ network lifecycle

    def _ensure_io(self) -> IOThread:
        if self._io is None:
            with self._lock:
                if self._closed:
                    raise RouterError("this router is closed")
                if self._io is None:
                    self._io = IOThread()
        return self._io

    def _start_io(self) -> IOThread:
        io = self._ensure_io()
        self._start_probe()
        return io

    def _start_probe(self) -> None:
        if self._probe_started:
            return
        policy = self._snap.policy
        if policy.privacy_mode or policy.cloud.health_probe_interval_s <= 0 or not policy.cloud.endpoints:
            return
        with self._lock:
            if self._probe_started:
                return
            self._probe_started = True
        self._ensure_io().submit(probe_loop(lambda: self._snap, self._cloud, self._clock, lambda: self._closed))

    def connect(self, timeout_s: float = 2.0) -> dict[str, str]:
        """Eagerly read every endpoint's model metadata and start the probe (optional: the first
        escalation does this lazily). Returns ``{endpoint: "ok" | error}``; never raises for a
        down endpoint. A no-op under ``privacy_mode``."""
        if self._snap.policy.privacy_mode:
            return {}
        io = self._start_io()

        async def fetch_all():
            async def one(state):
                try:
                    await self._cloud.fetch_metadata(state, timeout_s)
                    return state.endpoint.label, "ok"
                except RouterError as exc:
                    return state.endpoint.label, str(exc)

            return dict(await asyncio.gather(*(one(s) for s in self._snap.states)))

        return io.submit(fetch_all()).result(timeout_s + 1.0)

    def record_outcome(self, request_id: str, label: str | int) -> bool:
        """Report the true label (name or class index) of an answered request, for the A/B
        experiment's per-arm accuracy. False when the request id is unknown (not answered under
        an arm, already reported, or among the oldest forgotten after 100,000 answers)."""
        return self._telemetry.record_outcome(request_id, label)

    def stats(self) -> dict:
        """Counters, escalation rate, latency histograms, each endpoint's breaker and estimate,
        and whether the edge model is available (with the error when it is not); with
        ``cloud.budget``, ``escalation_budget`` (refusals by the cap that bound, calls charged);
        with an experiment, ``experiments`` (per-arm counts, escalation, latency, accuracy, CIs)."""
        out = self._telemetry.snapshot()
        out["endpoints"] = {
            s.endpoint.label: {
                "breaker": s.breaker.state.value,
                "breaker_opened": s.breaker.opened_count,
                "latency_estimate_ms": round(s.latency.estimate() * 1000.0, 3),
                "latency_samples": s.latency.samples,
                "ready": s.readiness.ready,
                "input_datatype": s.meta.datatype if s.meta else None,
            }
            for s in self._snap.states
        }
        edge = {"version": self._edge_version, "available": self._edge is not None,
                "error": None if self._edge_error is None else str(self._edge_error)}
        out["edge"] = edge
        out["edge_model"] = edge  # the earlier name of the same entry
        if self._updater is not None:
            edge["updates"] = self._updater.status()
        out["field"] = self._field.snapshot(self._snap.policy, self._edge_version)
        out["policy"] = {"mode": self._snap.policy.mode.value, "threshold": self._snap.policy.confidence_threshold,
                         "privacy_mode": self._snap.policy.privacy_mode}
        return out

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        if getattr(self, "_updater", None) is not None:
            self._updater.close()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            io, self._io = self._io, None
            ex, self._executor = self._executor, None
        self._field.close()  # its tasks on the I/O loop end before the loop does
        if io is not None:
            io.close(self._cloud.aclose())
        self._cloud.close_sync()
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        await self._cloud.aclose()
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "Router":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


# How long after the request's deadline an attempt its caller stopped waiting for ends by itself.
_LATE_S = 0.005


def _late(call: CloudCall, answer_by: float) -> CloudCall:
    """The attempt as the network side runs it. Its caller stops waiting at the attempt's end and
    answers; the attempt is not cancelled then but ends itself ``_LATE_S`` after the request's
    deadline (``answer_by``). Its clean-up (httpcore and anyio unwinding, ~0.3 ms of Python) so
    runs once the answers due by that deadline are given, not while they are: callers that fail
    together (one deadline, one dead server) wake together, and a thread asking for the GIL
    while another runs Python waits up to the switch interval, 5 ms. Cancelling every attempt
    of such a wave at its end kept the loop's thread busy right then."""
    if not math.isfinite(call.deadline):
        return replace(call, timeout_s=call.timeout_s + _LATE_S)
    extra = max(0.0, answer_by - call.deadline) + _LATE_S
    return replace(call, timeout_s=call.timeout_s + extra, deadline=call.deadline + extra)


def _all_finite(x: np.ndarray) -> bool:
    """Every element finite. A finite sum proves it (a NaN or an infinity makes the sum NaN or
    infinite) in one pass with no temporary; only a non-finite sum (or finite values whose sum
    overflows) needs the element-wise check. One image's sum is its dot product with itself (a
    sum of squares: BLAS, half np.add.reduce's cost at this size); a batch's, np.add.reduce (BLAS
    may start threads for long vectors)."""
    return (math.isfinite(_VDOT(x, x) if x.size <= 4096 else _SUM(x, None))) or bool(np.isfinite(x).all())


_SUM = np.add.reduce
_VDOT = np.vdot
_NDARRAY = {np.ndarray}
_perf_counter = time.perf_counter


def _larger_reserve(learned_s: float, policy_ms: float) -> float | None:
    """The learned reserve when it exceeds the policy's, else None (the flow uses the policy's)."""
    return learned_s if learned_s * 1000.0 > policy_ms else None


def _timed_out(call: CloudCall) -> CloudTimeout:
    label = call.state.endpoint.label
    err = CloudTimeout(f"{label}: no answer within {call.timeout_s * 1000:.0f} ms", endpoint=label)
    err.elapsed_s = call.timeout_s
    return err


def _default_labels():
    """The bundled edge model's labels, read from its manifest (used when no edge model loads)."""
    from edge_model.manifest import Manifest

    return Manifest.load(DEFAULT_EDGE_MANIFEST).labels


def __getattr__(name: str):
    # default_router/predict moved to router._default; kept reachable from here lazily (an eager
    # import would be circular).
    if name in ("default_router", "predict"):
        from router import _default

        return getattr(_default, name)
    raise AttributeError(name)
