"""Per-endpoint connectivity state: circuit breaker, latency estimate, readiness.

The breaker is small and ours rather than a library's: the router's decision core must *look*
at a breaker's state without making a call (to answer locally at once with ``breaker_open``),
the same state must serve the sync and the async front-end, and tests need an injectable
clock. pybreaker has no asyncio, purgatory keeps separate sync/async state and owns the call,
and neither measures a failure rate over a window (resilience4j does; this one does too).

All objects here are thread-safe and do no I/O.
"""

from __future__ import annotations

import random
import threading
import time
from bisect import bisect_left, insort
from collections import deque
from enum import Enum
from typing import Callable

from router.policy import BreakerSettings

Clock = Callable[[], float]


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """closed -> open (N consecutive failures, or failure rate over a window) -> half-open after
    ``open_duration_s`` -> closed on a successful trial call, open again on a failed one.

    Each open period is jittered, ``open_duration_s x uniform(1 - open_jitter, 1 + open_jitter)``
    from ``rng``: a fixed period would phase-lock with a periodic fault (every trial landing in
    the bad phase) and make a fleet of devices probe a recovering server in lockstep."""

    def __init__(self, settings: BreakerSettings, clock: Clock = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._rng = rng or random.Random()
        self._open_for = settings.open_duration_s
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._window: deque[bool] = deque(maxlen=settings.window)
        self._opened_at = 0.0
        self._trials = 0
        self.opened_count = 0

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._current()

    def _current(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._open_for:
            self._state = BreakerState.HALF_OPEN
            self._trials = 0
        return self._state

    def would_allow(self) -> bool:
        """Whether a call may go now (a pure look; does not take a half-open trial slot)."""
        with self._lock:
            state = self._current()
            return state is BreakerState.CLOSED or (
                state is BreakerState.HALF_OPEN and self._trials < self.settings.half_open_max_calls
            )

    def acquire(self) -> bool:
        """Take permission for one call; in half-open only ``half_open_max_calls`` get it."""
        with self._lock:
            state = self._current()
            if state is BreakerState.CLOSED:
                return True
            if state is BreakerState.HALF_OPEN and self._trials < self.settings.half_open_max_calls:
                self._trials += 1
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self._consecutive = 0
            self._window.append(True)
            if self._current() is BreakerState.HALF_OPEN:
                self._state = BreakerState.CLOSED
                self._window.clear()

    def record_failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            self._window.append(False)
            state = self._current()
            failures = self._window.count(False)
            rate_trip = len(self._window) >= self.settings.min_calls and failures / len(self._window) >= self.settings.failure_rate_threshold
            if state is BreakerState.HALF_OPEN or (
                state is BreakerState.CLOSED and (self._consecutive >= self.settings.failure_threshold or rate_trip)
            ):
                self._state = BreakerState.OPEN
                self._opened_at = self._clock()
                j = self.settings.open_jitter
                self._open_for = self.settings.open_duration_s * (self._rng.uniform(1.0 - j, 1.0 + j) if j else 1.0)
                self.opened_count += 1

    @property
    def open_for_s(self) -> float:
        """Length of the current (or last) open period, jitter included."""
        return self._open_for

    def release(self) -> None:
        """Give back a half-open trial slot that was acquired but never used for a call."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN and self._trials > 0:
                self._trials -= 1


class LatencyEstimator:
    """A high quantile of recent successful call latencies, seeded from config.

    Only successes count (a timeout says only "more than X"), and samples age out after
    ``max_age_s``: without that, one slow spell would keep the estimate above every budget, the
    router would stop escalating, and no new sample could ever bring it back down. With no
    fresh sample the estimate returns to the configured seed. The value is cached until a
    sample arrives or the oldest one expires, so reading it on the hot path costs a lock.
    """

    def __init__(self, initial_s: float, window: int = 50, quantile: float = 0.9,
                 max_age_s: float = 60.0, clock: Clock = time.monotonic) -> None:
        self._initial = initial_s
        self._samples: deque[tuple[float, float]] = deque()  # (when, seconds), oldest first
        self._sorted: list[float] = []  # the same seconds, kept in order (not re-sorted per read)
        self._window = window
        self._q = quantile
        self._max_age = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached = initial_s
        self._valid_until = float("inf")

    def observe(self, seconds: float) -> None:
        with self._lock:
            if len(self._samples) >= self._window:
                self._drop_oldest()
            self._samples.append((self._clock(), seconds))
            insort(self._sorted, seconds)
            self._valid_until = -1.0

    def _drop_oldest(self) -> None:
        _, seconds = self._samples.popleft()
        del self._sorted[bisect_left(self._sorted, seconds)]

    def estimate(self) -> float:
        with self._lock:
            now = self._clock()
            if now < self._valid_until:
                return self._cached
            while self._samples and now - self._samples[0][0] > self._max_age:
                self._drop_oldest()
            if self._samples:
                self._cached = _quantile(self._sorted, self._q)
                self._valid_until = self._samples[0][0] + self._max_age
            else:
                self._cached, self._valid_until = self._initial, float("inf")
            return self._cached

    @property
    def samples(self) -> int:
        return len(self._samples)


def _quantile(ordered: list[float], q: float) -> float:
    """``np.quantile(values, q)`` (its default, linear interpolation) of an already sorted list.
    By hand: the window is ~50 floats, re-read after every escalation, and numpy's call overhead
    was 6 % of an escalation's client time (py-spy) for what ``sorted`` does in ~3 us."""
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Readiness:
    """The readiness probe's last word on an endpoint: True, False, or None (not probed)."""

    def __init__(self) -> None:
        self.ready: bool | None = None
        self.checked_at: float | None = None
        self.detail: str = ""

    def update(self, ready: bool, at: float, detail: str = "") -> None:
        self.ready, self.checked_at, self.detail = ready, at, detail


class EndpointState:
    """Everything the router knows about one cloud endpoint (no I/O here).

    ``meta`` holds what the model metadata said (input name, datatype, shape); the cloud client
    fills it on connect or on the first escalation.
    """

    def __init__(self, endpoint, cloud_settings, clock: Clock = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.endpoint = endpoint
        self.key = endpoint.key
        self.breaker = CircuitBreaker(cloud_settings.breaker, clock, rng)
        self.latency = LatencyEstimator(
            endpoint.initial_latency_ms / 1000.0, cloud_settings.latency_window, cloud_settings.latency_quantile,
            cloud_settings.latency_max_age_s, clock,
        )
        self.readiness = Readiness()
        self.meta = None
        self.last_error: BaseException | None = None

    def status(self) -> str:
        """"ok", "breaker_open" or "offline" (the probe said not ready)."""
        if self.readiness.ready is False:
            return "offline"
        return "ok" if self.breaker.would_allow() else "breaker_open"
