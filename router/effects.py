"""The effects the request flow (:mod:`router.flow`) yields, their outcomes, and the request
and outcome records. Plain data; no I/O, no routing logic."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from router.errors import EdgeError
from router.health import EndpointState
from router.policy import Mode, RoutingPolicy
from router.prediction import Prediction


@dataclass
class LocalWork:
    """Preprocess the images and, if ``run_edge``, run the edge model on them.
    ``normalised``: float inputs are declared model-ready (see ``Router.predict``)."""

    images: Sequence[Any]
    run_edge: bool
    normalised: bool = False


@dataclass
class LocalResult:
    x: np.ndarray  # float32 [N, 1, H, W] model input
    pixels: Optional[np.ndarray]  # uint8 [N, H, W] raw pixels (None if an input was a float array)
    probs: Optional[np.ndarray] = None  # calibrated edge probabilities [N, C]
    edge_error: Optional[EdgeError] = None
    edge_s: float = 0.0


@dataclass
class CloudCall:
    """One attempt at one endpoint for some rows, ending at the absolute ``deadline``.

    The deadline is a point on ``clock`` (``time.monotonic`` in a real router), fixed when the
    flow decided the attempt: whoever runs the attempt, however late it starts, ends it there.
    ``timeout_s`` is the attempt's length as decided (for messages and for servers)."""

    state: EndpointState
    x: np.ndarray
    pixels: Optional[np.ndarray]
    timeout_s: float
    budget_s: float  # travels to the server as parameters.timeout
    request_id: str
    deadline: float = float("inf")  # absolute, on ``clock``
    clock: Callable[[], float] = time.monotonic
    # The caller's inputs for these rows: an endpoint whose model takes another input size gets
    # its pixels made from them (the edge's pixels are of the edge's size). None: not available.
    images: Optional[Sequence[Any]] = None

    def remaining_s(self) -> float:
        """Seconds left before this attempt's absolute deadline (never negative)."""
        return max(0.0, min(self.deadline - self.clock(), self.timeout_s))


@dataclass
class CloudReply:
    probs: np.ndarray
    model_version: str
    elapsed_s: float
    bytes_sent: int = 0


@dataclass
class Sleep:
    seconds: float


@dataclass
class Provisional:
    """Only when ``RouteRequest.progressive``: the edge's answers before the escalation starts.
    The runner hands them to the caller and resumes the flow (sending ``None``) when it likes."""

    predictions: list[Prediction]


Effect = LocalWork | CloudCall | Sleep | Provisional


@dataclass
class RouteRequest:
    """Everything one call to predict() fixed when it entered."""

    images: Sequence[Any]
    policy: RoutingPolicy
    mode: Mode
    privacy: bool
    deadline: float
    started: float
    request_id: str
    labels: tuple[str, ...]
    thresholds: tuple[float, ...]
    edge_version: str
    endpoints: Sequence[EndpointState] = ()
    rng: random.Random = field(default_factory=random.Random)
    normalised: bool = False
    budget: Any = None  # router.budget.EscalationBudget, when the policy caps escalations
    arm: Optional[str] = None  # the A/B arm this request was assigned to
    progressive: bool = False  # yield a Provisional answer before escalating (router.progressive)
    # Seconds kept back to answer locally after a failed escalation; None: the policy's
    # budget_reserve_ms. The router raises it to what answering after a failure has recently cost.
    reserve_s: Optional[float] = None


@dataclass
class RouteOutcome:
    predictions: list[Prediction]
    cloud_calls: int = 0
    bytes_sent: int = 0
    cloud_error: Optional[BaseException] = None
