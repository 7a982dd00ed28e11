"""``Router``: the one ``predict()`` client apps call -- thin sync and async shells over the
sans-I/O core in :mod:`router.decision`.

* ``predict`` runs the edge inline in the caller's thread; only an escalation hands one attempt
  to the router's private I/O thread (an asyncio loop with a pooled httpx client).
* ``apredict`` runs preprocessing + edge inference in a worker thread (ONNX never blocks the
  caller's event loop) and awaits cloud attempts on the caller's loop.
* Constructing a router does no network I/O. Nothing touches the network -- no socket, no DNS,
  no probe, not even the I/O thread's loop -- before the first request that may escalate, so a
  router that only ever answers under privacy never opens a socket.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import itertools
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from edge_model.errors import EdgeModelError, InputError
from edge_model.preprocess import PreprocessConfig, normalise, preprocess, to_pixels
from edge_model.runtime import DEFAULT_EDGE_MANIFEST, EdgeModel, OnnxClassifier, SessionOptions
from router.cloud import CloudClient
from router.decision import CloudCall, CloudReply, LocalResult, LocalWork, RouteRequest, Sleep, route
from router.errors import CloudTimeout, ConfigError, EdgeError, InvalidInput, RouterError
from router.health import EndpointState
from router.policy import DEFAULT_POLICY_PATH, Mode, RoutingPolicy, load_policy
from router.prediction import Prediction
from router.telemetry import Telemetry

log = logging.getLogger("router")


@dataclass(frozen=True)
class _Snapshot:
    """Everything a request reads from the policy, swapped as one reference on reload."""

    policy: RoutingPolicy
    thresholds: tuple[float, ...]
    states: tuple[EndpointState, ...]


class _IOThread:
    """A private asyncio loop in a daemon thread, for the sync API's escalations and the probe."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="router-io", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self, final=None, timeout: float = 2.0) -> None:
        if final is not None:
            try:
                self.submit(final).result(timeout)
            except Exception:  # noqa: BLE001 -- best effort at shutdown
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


class Router:
    """Answers on-device or escalates to the cloud, per request; see the package docstring."""

    def __init__(
        self,
        policy: RoutingPolicy | None = None,
        *,
        policy_path: str | os.PathLike | None = None,
        edge_model: OnnxClassifier | None = None,
        clock: Callable[[], float] = time.monotonic,
        transport=None,
        rng: random.Random | None = None,
    ) -> None:
        self._policy_path = Path(policy_path) if policy_path else None
        policy = policy or load_policy(self._policy_path)
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.RLock()
        self._telemetry = Telemetry()
        self._id_prefix, self._ids = os.urandom(4).hex(), itertools.count(1)  # unique per router, cheap per request
        self._edge, self._edge_error = self._load_edge(policy, edge_model, self._policy_path)
        self._labels = self._edge.labels if self._edge else tuple(_default_labels())
        self._edge_version = self._edge.version if self._edge else "unavailable"
        self._pre = self._edge.preprocess_config if self._edge else PreprocessConfig()
        if policy.edge.max_pixels != self._pre.max_pixels:
            self._pre = PreprocessConfig(**{**self._pre.__dict__, "max_pixels": policy.edge.max_pixels})
        self._snap = self._snapshot(policy, {})
        self._cloud = CloudClient(policy.cloud, transport)
        self._io: _IOThread | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._probe_started = False
        self._closed = False
        self._mtime = self._file_mtime()
        self._next_reload_check = clock() + policy.reload_check_interval_s

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, path: str | os.PathLike | None = None, **kwargs) -> "Router":
        path = Path(path or os.environ.get("HYBRID_ROUTER_POLICY") or DEFAULT_POLICY_PATH)
        return cls(load_policy(path), policy_path=path, **kwargs)

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
            # The router still works: requests escalate with reason edge_error.
            log.warning("edge model unavailable, every request will escalate: %s", exc)
            return None, EdgeError(f"edge model unavailable: {exc}")

    def _snapshot(self, policy: RoutingPolicy, old: dict[str, EndpointState]) -> _Snapshot:
        states = tuple(old.get(ep.key) or EndpointState(ep, policy.cloud, self._clock) for ep in policy.cloud.endpoints)
        for s, ep in zip(states, policy.cloud.endpoints):
            s.endpoint = ep  # same URL/model/version; other fields (priority, key env) may have changed
        return _Snapshot(policy, policy.thresholds_for(self._labels), states)

    @property
    def policy(self) -> RoutingPolicy:
        return self._snap.policy

    @property
    def edge_model(self) -> OnnxClassifier | None:
        return self._edge

    # ------------------------------------------------------------------ policy reload

    def reload_policy(self, policy: RoutingPolicy | None = None) -> RoutingPolicy:
        """Swap in a new policy atomically (from ``policy`` or by re-reading the file).
        Requests in flight finish with the snapshot they started with."""
        with self._lock:
            if policy is None:
                if self._policy_path is None:
                    raise ConfigError("this router was not built from a file; pass the new policy")
                policy = load_policy(self._policy_path)
                self._mtime = self._file_mtime()
            if policy.edge != self._snap.policy.edge:
                edge, err = self._load_edge(policy, None, self._policy_path)
                if edge is None:
                    raise ConfigError(f"edge: {err}")
                self._edge, self._edge_error = edge, None
                self._edge_version, self._pre = edge.version, edge.preprocess_config
            self._snap = self._snapshot(policy, {s.key: s for s in self._snap.states})
            self._cloud.prepare(policy.cloud)
            log.info("routing policy reloaded (mode=%s threshold=%s)", policy.mode.value, policy.confidence_threshold)
            return policy

    def _file_mtime(self) -> float | None:
        try:
            return self._policy_path.stat().st_mtime_ns if self._policy_path else None
        except OSError:
            return None

    def _maybe_reload(self, now: float) -> None:
        self._next_reload_check = now + self._snap.policy.reload_check_interval_s
        mtime = self._file_mtime()
        if mtime is None or mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            self.reload_policy()
        except ConfigError as exc:
            # A bad edit must not take the router down: keep serving with the last good policy.
            log.error("policy file changed but is invalid; keeping the previous policy: %s", exc)

    # ------------------------------------------------------------------ request set-up

    def _begin(self, images: Sequence[Any], deadline_ms, privacy, mode, request_id, threshold) -> RouteRequest:
        if self._closed:
            raise RouterError("this router is closed")
        now = self._clock()
        snap = self._snap
        if self._policy_path is not None and snap.policy.reload_check_interval_s > 0 and now >= self._next_reload_check:
            self._maybe_reload(now)
            snap = self._snap
        policy = snap.policy
        try:
            mode = Mode(mode) if mode is not None else policy.mode
        except ValueError:
            raise ConfigError(f"mode: {mode!r} is not one of {[m.value for m in Mode]}") from None
        budget_ms = policy.default_deadline_ms if deadline_ms is None else float(deadline_ms)
        if not budget_ms > 0:
            raise ConfigError(f"deadline_ms must be a positive number of milliseconds; got {deadline_ms!r}")
        thresholds = snap.thresholds
        if threshold is not None:
            if not 0 <= threshold <= 1:
                raise ConfigError(f"threshold must be within [0, 1]; got {threshold!r}")
            thresholds = (float(threshold),) * len(thresholds)
        return RouteRequest(
            images=images,
            policy=policy,
            mode=mode,
            privacy=bool(privacy) or policy.privacy_mode,  # a call may add privacy, never lift the policy's
            deadline=now + budget_ms / 1000.0,
            started=now,
            request_id=request_id or f"{self._id_prefix}-{next(self._ids)}",
            labels=self._labels,
            thresholds=thresholds,
            edge_version=self._edge_version,
            endpoints=snap.states,
            rng=self._rng,
        )

    # ------------------------------------------------------------------ local work (no I/O)

    def _local(self, work: LocalWork) -> LocalResult:
        cfg = self._pre
        n = len(work.images)
        image = work.images[0]
        if n == 1 and type(image) is np.ndarray and image.dtype == np.float32 and image.shape == (1, cfg.height, cfg.width):
            # Already model input (the hot path of an app that preprocesses itself): check and go.
            if not np.isfinite(image).all():
                raise InvalidInput("array contains NaN or infinite values")
            return self._run_edge(work, image[None], None)
        x = np.empty((n, 1, cfg.height, cfg.width), dtype=np.float32)
        pixels: np.ndarray | None = np.empty((n, cfg.height, cfg.width), dtype=np.uint8)
        try:
            for i, image in enumerate(work.images):
                if isinstance(image, np.ndarray) and image.dtype.kind == "f":
                    x[i] = preprocess(image, cfg)  # already model input: no pixels to send
                    pixels = None
                else:
                    p = to_pixels(image, cfg)
                    x[i, 0] = normalise(p, cfg)
                    if pixels is not None:
                        pixels[i] = p
        except InputError as exc:
            where = f"image {i}: " if n > 1 else ""
            raise InvalidInput(f"{where}{exc}") from exc
        return self._run_edge(work, x, pixels)

    def _run_edge(self, work: LocalWork, x: np.ndarray, pixels: np.ndarray | None) -> LocalResult:
        if not work.run_edge:
            return LocalResult(x, pixels)
        if self._edge is None:
            return LocalResult(x, pixels, edge_error=self._edge_error)
        t0 = time.perf_counter()
        try:
            probs = self._edge.predict_proba(x, validate=False)  # x came out of the preprocessing
        except EdgeModelError as exc:
            return LocalResult(x, pixels, edge_error=EdgeError(f"edge inference failed: {exc}"), edge_s=time.perf_counter() - t0)
        return LocalResult(x, pixels, probs, edge_s=time.perf_counter() - t0)

    # ------------------------------------------------------------------ sync shell

    def predict(self, image, *, deadline_ms: float | None = None, privacy: bool | None = None,
                mode: str | Mode | None = None, request_id: str | None = None,
                threshold: float | None = None) -> Prediction:
        """Classify one image (anything :mod:`edge_model.preprocess` accepts) within ``deadline_ms``."""
        return self._run_sync(self._begin((image,), deadline_ms, privacy, mode, request_id, threshold))[0]

    def predict_batch(self, images: Iterable, *, deadline_ms: float | None = None, privacy: bool | None = None,
                      mode: str | Mode | None = None, request_id: str | None = None,
                      threshold: float | None = None) -> list[Prediction]:
        """Classify several images under one deadline; escalations go as one cloud request."""
        images = list(images)
        if not images:
            return []
        return self._run_sync(self._begin(images, deadline_ms, privacy, mode, request_id, threshold))

    def _run_sync(self, req: RouteRequest) -> list[Prediction]:
        gen = route(req, self._clock)
        attempts = 0
        try:
            effect = next(gen)
            while True:
                kind = type(effect)
                if kind is LocalWork:
                    result = self._local(effect)
                elif kind is CloudCall:
                    attempts += 1
                    result = self._cloud_sync(effect)
                else:
                    time.sleep(max(0.0, min(effect.seconds, req.deadline - self._clock())))
                    result = None
                effect = gen.send(result)
        except StopIteration as stop:
            outcome = stop.value
        except RouterError as exc:
            self._telemetry.record_failure(exc, attempts)
            raise
        finally:
            gen.close()
        self._telemetry.record(outcome.predictions, outcome.cloud_calls, outcome.bytes_sent, req.policy.decision_log)
        return outcome.predictions

    def _cloud_sync(self, call: CloudCall):
        io = self._start_io()
        fut = io.submit(self._cloud.infer(call))
        try:
            # infer() bounds itself with asyncio.timeout; this guards only against a stalled I/O
            # loop, with a margin small enough to keep the caller inside its deadline.
            return fut.result(call.timeout_s + 0.02)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            err = CloudTimeout(f"{call.state.endpoint.label}: no answer within {call.timeout_s * 1000:.0f} ms")
            err.elapsed_s = call.timeout_s
            return err

    # ------------------------------------------------------------------ async shell

    async def apredict(self, image, *, deadline_ms: float | None = None, privacy: bool | None = None,
                       mode: str | Mode | None = None, request_id: str | None = None,
                       threshold: float | None = None) -> Prediction:
        req = self._begin((image,), deadline_ms, privacy, mode, request_id, threshold)
        return (await self._run_async(req))[0]

    async def apredict_batch(self, images: Iterable, *, deadline_ms: float | None = None, privacy: bool | None = None,
                             mode: str | Mode | None = None, request_id: str | None = None,
                             threshold: float | None = None) -> list[Prediction]:
        images = list(images)
        if not images:
            return []
        return await self._run_async(self._begin(images, deadline_ms, privacy, mode, request_id, threshold))

    async def _run_async(self, req: RouteRequest) -> list[Prediction]:
        loop = asyncio.get_running_loop()
        gen = route(req, self._clock)
        attempts = 0
        try:
            effect = next(gen)
            while True:
                kind = type(effect)
                if kind is LocalWork:
                    result = await loop.run_in_executor(self._local_executor(), self._local, effect)
                elif kind is CloudCall:
                    attempts += 1
                    self._start_probe()
                    result = await self._cloud.infer(effect)
                else:
                    await asyncio.sleep(max(0.0, min(effect.seconds, req.deadline - self._clock())))
                    result = None
                effect = gen.send(result)
        except StopIteration as stop:
            outcome = stop.value
        except RouterError as exc:
            self._telemetry.record_failure(exc, attempts)
            raise
        finally:
            gen.close()
        self._telemetry.record(outcome.predictions, outcome.cloud_calls, outcome.bytes_sent, req.policy.decision_log)
        return outcome.predictions

    def _local_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="router-edge"
                    )
        return self._executor

    # ------------------------------------------------------------------ network lifecycle

    def _start_io(self) -> _IOThread:
        if self._io is None:
            with self._lock:
                if self._closed:
                    raise RouterError("this router is closed")
                if self._io is None:
                    self._io = _IOThread()
        self._start_probe()
        return self._io

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
        io = self._start_io()
        io.submit(self._probe_loop())

    async def _probe_loop(self) -> None:
        while not self._closed:
            snap = self._snap
            interval = snap.policy.cloud.health_probe_interval_s
            if interval <= 0 or snap.policy.privacy_mode:
                await asyncio.sleep(1.0)
                continue
            for state in snap.states:
                ok = await self._cloud.ready(state, timeout_s=min(1.0, interval))
                state.readiness.update(ok, self._clock())
            await asyncio.sleep(interval)

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

    def stats(self) -> dict:
        """Counters, escalation rate, latency histograms, and each endpoint's breaker and estimate."""
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
        out["edge_model"] = {"version": self._edge_version, "available": self._edge is not None}
        out["policy"] = {"mode": self._snap.policy.mode.value, "threshold": self._snap.policy.confidence_threshold}
        return out

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            io, self._io = self._io, None
            ex, self._executor = self._executor, None
        if io is not None:
            io.close(self._cloud.aclose())
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


def _default_labels():
    """The bundled edge model's labels, read from its manifest (used when no edge model loads)."""
    from edge_model.manifest import Manifest

    return Manifest.load(DEFAULT_EDGE_MANIFEST).labels


# ---------------------------------------------------------------------- module-level predict()

_default: Router | None = None
_default_lock = threading.Lock()


def default_router() -> Router:
    """The process-wide router over the default policy file (created on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Router.from_config()
                atexit.register(_default.close)
    return _default


def predict(image, **kwargs) -> Prediction:
    """``router.predict(image, deadline_ms=..., privacy=..., mode=...)`` over the default config."""
    return default_router().predict(image, **kwargs)
