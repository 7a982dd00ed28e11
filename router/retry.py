"""Retry rules for one escalation, as tenacity components that never sleep by themselves.

The decision core drives ``Retrying.iter`` (tenacity's own step function) and turns its
``DoSleep`` into an effect for the sync or async shell, so one retry policy serves both.

* retry: connect errors, timeouts, 502/503/504 (``CloudError.retryable``); never 4xx, 500 or
  garbage -- except that any failure may *fail over* to an endpoint not yet tried.
* wait: nothing before a fresh endpoint; else the server's ``Retry-After`` when it fits; else
  full-jitter exponential backoff, ``random(0, min(initial * mult**(n-1), max))`` as in gRPC.
* stop: after ``max_attempts``, or when the next sleep plus the next endpoint's estimated
  latency would not fit before the deadline minus the reserve (tenacity's ``stop_after_delay`` can overshoot
  by its last sleep; this one stops in time, like ``stop_before_delay``).
"""

from __future__ import annotations

import random
from typing import Callable

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from router.errors import CloudError, CloudUnavailable
from router.policy import RetrySettings


class stop_before_deadline(stop_base):
    """Stop unless the next attempt, after its sleep, still has ``need_s()`` seconds before the
    deadline minus the reserve (``need_s``: the next endpoint's estimated latency, at least
    the minimum attempt): an attempt that cannot finish in time is not worth starting."""

    def __init__(self, clock: Callable[[], float], deadline: float, reserve_s: float, need_s: Callable[[], float]) -> None:
        self.clock, self.deadline, self.reserve_s, self.need_s = clock, deadline, reserve_s, need_s

    def __call__(self, retry_state: RetryCallState) -> bool:
        start_next = self.clock() + retry_state.upcoming_sleep
        return start_next + self.need_s() > self.deadline - self.reserve_s


class wait_failover_or_backoff(wait_base):
    def __init__(
        self, settings: RetrySettings, has_fresh_endpoint: Callable[[], bool], rng: random.Random | None = None
    ) -> None:
        self.settings = settings
        self.has_fresh_endpoint = has_fresh_endpoint
        self.rng = rng or random.Random()

    def __call__(self, retry_state: RetryCallState) -> float:
        if self.has_fresh_endpoint():
            return 0.0
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if self.settings.honour_retry_after and isinstance(exc, CloudUnavailable) and exc.retry_after is not None:
            return float(exc.retry_after)
        n = retry_state.attempt_number
        cap = min(self.settings.initial_backoff_ms * self.settings.multiplier ** (n - 1), self.settings.max_backoff_ms)
        return self.rng.uniform(0.0, cap) / 1000.0


def _no_sleep(seconds: float) -> None:  # the shells sleep; tenacity must not
    raise RuntimeError("the decision core drives tenacity step by step; it never sleeps itself")


def make_retrying(
    settings: RetrySettings,
    *,
    clock: Callable[[], float],
    deadline: float,
    reserve_s: float,
    need_s: Callable[[], float],
    has_fresh_endpoint: Callable[[], bool],
    rng: random.Random | None = None,
) -> Retrying:
    def worth_retrying(exc: BaseException) -> bool:
        return isinstance(exc, CloudError) and (exc.retryable or has_fresh_endpoint())

    return Retrying(
        stop=stop_after_attempt(settings.max_attempts) | stop_before_deadline(clock, deadline, reserve_s, need_s),
        wait=wait_failover_or_backoff(settings, has_fresh_endpoint, rng),
        retry=retry_if_exception(worth_retrying),
        reraise=True,
        sleep=_no_sleep,
    )
