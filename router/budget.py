"""Escalation budgets: how many requests may leave the device, however unsure the edge is.

Three caps, each optional, set under ``cloud.budget`` in the policy:

* ``rate``: a token bucket (``rate_per_s``, ``burst``) -- escalated images per second;
* ``share``: escalated images over the images that could have escalated, in a sliding window of
  ``window_s`` seconds (``max_share``);
* ``cost_hour`` / ``cost_day``: money per UTC hour / day (``budget_per_hour`` / ``budget_per_day``),
  each call priced by its endpoint's ``price_per_call`` (or ``price_per_1k_calls`` / 1000).

The rule table only *looks* (:meth:`EscalationBudget.headroom` feeds the context); the budget is
*charged* when an attempt is really made (:func:`charged` wraps the flow's escalation), so an
escalation that never left (no usable endpoint, no time left) costs nothing. Shadow and audit
calls charge it too, through :meth:`EscalationBudget.charge`.

Looking and charging are two steps: under concurrency, requests that looked at the same moment may
together overshoot a cap by at most the number of escalations in flight; the token bucket goes
into debt and the money is spent, so the overshoot is paid back by refusals right after.
Written by hand (not ``limits``/``pyrate-limiter``): those are rate limiters keyed by name with
storage back-ends; this needs a share window and money caps under one lock with an injectable
clock, in some eighty lines.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from typing import Any, Callable, Generator, Iterable, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

CAPS = ("rate", "share", "cost_hour", "cost_day")
KINDS = ("escalation", "shadow", "audit")
_SLOTS = 60  # the share window is kept as 60 slots of window_s / 60: memory bounded at any traffic
INF = math.inf


class BudgetSettings(BaseModel):
    """``cloud.budget`` in the policy; every cap is off unless set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_per_s: Optional[float] = Field(None, gt=0, description="escalated images per second (token bucket refill)")
    burst: Optional[int] = Field(None, ge=1, description="bucket size; default: max(1, ceil(rate_per_s))")
    max_share: Optional[float] = Field(None, gt=0, le=1, description="cap on escalated / eligible images in the window")
    window_s: float = Field(60.0, gt=0, description="the share window")
    budget_per_hour: Optional[float] = Field(None, ge=0, description="money per UTC hour, at the endpoints' prices")
    budget_per_day: Optional[float] = Field(None, ge=0, description="money per UTC day")

    @model_validator(mode="after")
    def _burst_needs_rate(self) -> "BudgetSettings":
        if self.burst is not None and self.rate_per_s is None:
            raise ValueError("burst needs rate_per_s (the bucket's refill rate)")
        return self

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.rate_per_s, self.max_share, self.budget_per_hour, self.budget_per_day))

    @property
    def priced(self) -> bool:
        return self.budget_per_hour is not None or self.budget_per_day is not None


def price_of(endpoint: Any) -> float:
    """One image's price at ``endpoint`` (a policy ``Endpoint``): ``price_per_call``, else
    ``price_per_1k_calls`` / 1000, else 0."""
    per_call = getattr(endpoint, "price_per_call", None)
    if per_call is not None:
        return float(per_call)
    per_1k = getattr(endpoint, "price_per_1k_calls", None)
    return float(per_1k) / 1000.0 if per_1k is not None else 0.0


class EscalationBudget:
    """The budget's state, shared by all requests (thread-safe). ``clock``: monotonic seconds
    (rate and share); ``wall``: epoch seconds (the UTC hour and day the money belongs to)."""

    def __init__(self, settings: BudgetSettings, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._clock, self._wall = clock, wall
        self.settings = settings
        self._tokens = float(self._burst())
        self._last = clock()
        self._slots: deque[list] = deque()  # [slot index, eligible images, escalated images]
        self._eligible = 0
        self._escalated = 0
        self._hour, self._day = self._periods()
        self._spent_hour = 0.0
        self._spent_day = 0.0
        self.refused: Counter[str] = Counter()
        self.charged: Counter[str] = Counter()

    def configure(self, settings: BudgetSettings) -> None:
        """New caps on reload; the bucket, window and money spent so far are kept."""
        with self._lock:
            self._refill()
            self.settings = settings
            self._tokens = min(self._tokens, float(self._burst()))

    # ------------------------------------------------------------------ internals (lock held)

    def _burst(self) -> int:
        s = self.settings
        if s.rate_per_s is None:
            return 0
        return s.burst if s.burst is not None else max(1, math.ceil(s.rate_per_s))

    def _periods(self) -> tuple[int, int]:
        t = self._wall()
        return int(t // 3600), int(t // 86400)

    def _refill(self) -> None:
        now = self._clock()
        if self.settings.rate_per_s is not None:
            self._tokens = min(float(self._burst()), self._tokens + (now - self._last) * self.settings.rate_per_s)
        self._last = now

    def _slot(self) -> list:
        width = self.settings.window_s / _SLOTS
        index = int(self._clock() // width)
        while self._slots and self._slots[0][0] <= index - _SLOTS:
            _, e, x = self._slots.popleft()
            self._eligible -= e
            self._escalated -= x
        if not self._slots or self._slots[-1][0] != index:
            self._slots.append([index, 0, 0])
        return self._slots[-1]

    def _roll(self) -> None:
        hour, day = self._periods()
        if hour != self._hour:
            self._hour, self._spent_hour = hour, 0.0
        if day != self._day:
            self._day, self._spent_day = day, 0.0

    # ------------------------------------------------------------------ the flow's side

    def headroom(self, eligible: int, price: float = 0.0) -> tuple[float, Optional[str]]:
        """Record ``eligible`` images that may escalate; return how many of them may escalate now
        and the cap that binds beyond that (None: no cap binds).
        ``price``: one image's price at the dearest endpoint it may go to."""
        s = self.settings
        room: list[tuple[float, str]] = []
        with self._lock:
            if s.rate_per_s is not None:
                self._refill()
                room.append((max(0.0, math.floor(self._tokens)), "rate"))
            if s.max_share is not None:
                slot = self._slot()
                slot[1] += eligible
                self._eligible += eligible
                # The images of this request count in the window: a cap of 0.3 lets 3 of 10 through.
                room.append((max(0.0, math.floor(s.max_share * self._eligible + 1e-9) - self._escalated), "share"))
            if s.priced and price > 0:
                self._roll()
                if s.budget_per_hour is not None:
                    room.append((max(0.0, math.floor((s.budget_per_hour - self._spent_hour) / price + 1e-9)), "cost_hour"))
                if s.budget_per_day is not None:
                    room.append((max(0.0, math.floor((s.budget_per_day - self._spent_day) / price + 1e-9)), "cost_day"))
        if not room:
            return INF, None
        best = min(room, key=lambda r: r[0])  # ties: the first in CAPS order
        return best

    def charge(self, kind: str = "escalation", rows: int = 1, cost: float = 0.0) -> None:
        """A call that really left: ``rows`` images take tokens and count as escalated in the
        share window, and ``cost`` is spent. ``kind``: escalation, shadow or audit."""
        if kind not in KINDS:
            raise ValueError(f"charge: kind must be one of {KINDS}, got {kind!r}")
        with self._lock:
            self.charged[kind] += rows
            if self.settings.rate_per_s is not None:
                self._refill()
                self._tokens -= rows  # may go into debt under concurrency (see the module docstring)
            if self.settings.max_share is not None:
                self._slot()[2] += rows
                self._escalated += rows
            self._spend_locked(cost)

    def spend(self, cost: float) -> None:
        """Money only: a retry or failover attempt of an escalation already charged."""
        if cost:
            with self._lock:
                self._spend_locked(cost)

    def _spend_locked(self, cost: float) -> None:
        if cost:
            self._roll()
            self._spent_hour += cost
            self._spent_day += cost

    def refuse(self, cap: str, rows: int = 1) -> None:
        with self._lock:
            self.refused[cap] += rows

    def snapshot(self) -> dict:
        s = self.settings
        with self._lock:
            out: dict[str, Any] = {"refused": {c: self.refused.get(c, 0) for c in CAPS},
                                   "charged": {k: self.charged.get(k, 0) for k in KINDS}}
            if s.rate_per_s is not None:
                self._refill()
                out["tokens"] = round(self._tokens, 3)
            if s.max_share is not None:
                self._slot()
                out["window_share"] = self._escalated / self._eligible if self._eligible else 0.0
            if s.priced:
                self._roll()
                out["spent_hour"], out["spent_day"] = self._spent_hour, self._spent_day
        return out


def budget_for(settings: BudgetSettings, old: Optional[EscalationBudget], clock: Callable[[], float],
               wall: Callable[[], float] = time.time) -> Optional[EscalationBudget]:
    """The budget a policy asks for, keeping ``old``'s state across a reload (None: no cap)."""
    if not settings.enabled:
        return None
    if old is not None:
        old.configure(settings)
        return old
    return EscalationBudget(settings, clock, wall)


class Gate:
    """One request's view of the budget, for the rule table: the cap that would bind if the next
    image escalated (``cap``), updated as the rows of a batch are decided (:meth:`saw`)."""

    __slots__ = ("budget", "room", "bound", "wanted", "cap")

    def __init__(self, budget: Optional[EscalationBudget], eligible: int, endpoints: Iterable[Any] = ()) -> None:
        self.budget = budget
        self.wanted = 0
        if budget is None:
            self.room, self.bound, self.cap = INF, None, None
            return
        price = max((price_of(s.endpoint) for s in endpoints), default=0.0) if budget.settings.priced else 0.0
        self.room, self.bound = budget.headroom(eligible, price)
        self.cap = self.bound if self.room <= 0 else None

    def saw(self, verdict) -> None:
        if self.budget is None:
            return
        if verdict.side == "cloud":
            self.wanted += 1
            if self.wanted >= self.room:
                self.cap = self.bound
        elif verdict.reason.value == "escalation_budget":
            self.budget.refuse(self.cap)


NO_GATE = Gate(None, 0)


def charged(escalation: Generator, budget: Optional[EscalationBudget], rows: int) -> Generator:
    """The flow's escalation, charging ``budget`` as its attempts really go out: the first
    attempt charges the escalation (tokens, share, money), later ones (retries, failover) money."""
    if budget is None:
        return (yield from escalation)
    first = True
    try:
        effect = next(escalation)
        while True:
            state = getattr(effect, "state", None)
            if state is not None:  # a CloudCall
                cost = rows * price_of(state.endpoint)
                if first:
                    budget.charge("escalation", rows, cost)
                    first = False
                else:
                    budget.spend(cost)
            effect = escalation.send((yield effect))
    except StopIteration as stop:
        return stop.value
    finally:
        escalation.close()
