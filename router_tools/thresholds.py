"""Choosing the confidence threshold from labeled data (numpy only, no I/O).

The router escalates a request when the edge's calibrated confidence ``c`` is *below* the
threshold (``c < t``) and answers locally when ``c >= t``. On a labeled set with the edge's and
the cloud's predictions, the only thresholds that make a difference are the sorted unique
confidences ``u_0 < u_1 < ... < u_{m-1}`` -- ``t = u_k`` escalates exactly the confidences below
``u_k`` -- plus one above the largest (escalate everything; only possible when ``u_{m-1} < 1``).
:func:`sweep` evaluates all of them at once with prefix sums (O(n log n)), and every threshold
in ``(u_{k-1}, u_k]`` gives the same split on this data.

Three ways to choose (:func:`choose`):

* ``target_escalation`` -- a quantile: the threshold whose share of confidences strictly below
  it is closest to the target (ties between two candidates go to the lower escalation). With
  tied confidences the exact target may be unreachable; the realised share is reported.
* ``target_accuracy`` -- the lowest escalation whose router accuracy reaches the target.
* ``max_accuracy_drop`` -- the lowest escalation whose accuracy is at most this many points
  (percentage points: ``0.2`` = 0.2 %) below cloud-only accuracy.

The chosen threshold is written as the shortest decimal inside its interval (``0.7`` rather
than ``0.6999999761581421``), nearest the interval's middle: it makes the same split on this
data and reads well in a YAML file.

Temperature: :func:`apply_temperature` turns logits into probabilities with exactly the float32
operations of :class:`edge_model.runtime.OnnxClassifier`, so the confidences swept here are
bit-for-bit those the router compares with the threshold; :func:`refit_temperature` fits a new
temperature (NLL, :func:`edge_model.calibration.fit_temperature`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from edge_model.calibration import calibrated_softmax, expected_calibration_error, fit_temperature
from router.errors import RouterError


class CalibrationError(RouterError, ValueError):
    """Inputs the sweep cannot use, or a target no threshold reaches on this data."""


@dataclass(frozen=True)
class Point:
    """The router on the calibration set at one threshold."""

    threshold: float
    escalated: int
    correct: int
    n: int

    @property
    def escalation(self) -> float:
        return self.escalated / self.n

    @property
    def accuracy(self) -> float:
        return self.correct / self.n


@dataclass(frozen=True)
class Sweep:
    """Router accuracy and escalation at every threshold that makes a difference.

    ``thresholds[k]`` is ascending; ``lower[k]`` is the previous candidate (``-inf`` for the
    first): every ``t`` in ``(lower[k], thresholds[k]]`` gives ``escalated[k]`` and ``correct[k]``.
    """

    thresholds: np.ndarray  # float64 [K]
    lower: np.ndarray  # float64 [K]
    escalated: np.ndarray  # int64 [K], strictly increasing
    correct: np.ndarray  # int64 [K]
    n: int
    edge_correct: int
    cloud_correct: int

    @property
    def escalation(self) -> np.ndarray:
        return self.escalated / self.n

    @property
    def accuracy(self) -> np.ndarray:
        return self.correct / self.n

    @property
    def edge_accuracy(self) -> float:
        return self.edge_correct / self.n

    @property
    def cloud_accuracy(self) -> float:
        return self.cloud_correct / self.n

    def point(self, k: int) -> Point:
        return Point(float(self.thresholds[k]), int(self.escalated[k]), int(self.correct[k]), self.n)

    def at(self, threshold: float) -> Point:
        """The router at an arbitrary threshold (the candidate whose interval holds it)."""
        k = int(np.searchsorted(self.thresholds, float(threshold), side="left"))
        if k >= len(self.thresholds):  # above every candidate: everything escalates
            return Point(float(threshold), self.n, self.cloud_correct, self.n)
        return Point(float(threshold), int(self.escalated[k]), int(self.correct[k]), self.n)


@dataclass(frozen=True)
class Choice:
    """A chosen threshold, the rule that chose it and the router's figures there."""

    threshold: float  # the value to write into the policy
    index: int  # into the sweep
    rule: str  # e.g. "target_escalation=0.25"
    point: Point
    interval: tuple[float, float]  # (lo, hi]: every threshold here splits this data the same way


# ----------------------------------------------------------------------------- the sweep


def confidences(probs: np.ndarray) -> np.ndarray:
    """The router's confidence: the top calibrated probability of each row."""
    probs = _matrix(probs, "probabilities")
    return probs.max(axis=1)


def sweep(edge_probs: np.ndarray, cloud_probs: np.ndarray, labels: np.ndarray) -> Sweep:
    """Sweep thresholds for an edge model (confidence and answer from ``edge_probs``) cascading
    to a cloud model (answer from ``cloud_probs``), on ``labels``."""
    edge_probs = _matrix(edge_probs, "edge probabilities")
    cloud_probs = _matrix(cloud_probs, "cloud probabilities")
    labels = np.asarray(labels)
    if edge_probs.shape != cloud_probs.shape:
        raise CalibrationError(f"edge probabilities {edge_probs.shape} and cloud probabilities {cloud_probs.shape} differ in shape")
    if labels.shape != (len(edge_probs),):
        raise CalibrationError(f"labels of shape {labels.shape} do not match {len(edge_probs)} predictions")
    return sweep_scores(
        edge_probs.max(axis=1),
        edge_probs.argmax(axis=1) == labels,
        cloud_probs.argmax(axis=1) == labels,
    )


def sweep_scores(confidence: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray) -> Sweep:
    """The core of :func:`sweep` on scores: the edge's confidence and whether each side was right."""
    conf = np.asarray(confidence, dtype=np.float64)
    e_ok = np.asarray(edge_correct, dtype=bool)
    c_ok = np.asarray(cloud_correct, dtype=bool)
    if conf.ndim != 1 or conf.size == 0:
        raise CalibrationError(f"need a non-empty 1-d array of confidences; got shape {conf.shape}")
    if e_ok.shape != conf.shape or c_ok.shape != conf.shape:
        raise CalibrationError(f"confidences {conf.shape}, edge_correct {e_ok.shape} and cloud_correct {c_ok.shape} differ in shape")
    if not np.isfinite(conf).all() or conf.min() < 0 or conf.max() > 1:
        raise CalibrationError("confidences must be finite and within [0, 1]")
    n = conf.size
    order = np.argsort(conf, kind="stable")
    sorted_conf = conf[order]
    # gain[i] = what escalating the i-th least confident request changes in the correct count
    gain = c_ok[order].astype(np.int64) - e_ok[order].astype(np.int64)
    prefix = np.concatenate(([0], np.cumsum(gain)))
    uniq = np.unique(sorted_conf)
    below = np.searchsorted(sorted_conf, uniq, side="left")  # confidences strictly below each u_k
    thresholds, escalated = uniq, below
    if uniq[-1] < 1.0:
        # One more candidate: above the largest confidence, everything escalates (cloud-only).
        thresholds = np.append(uniq, 1.0)
        escalated = np.append(below, n)
    lower = np.concatenate(([-np.inf], thresholds[:-1]))
    edge_total = int(e_ok.sum())
    return Sweep(
        thresholds=thresholds,
        lower=lower,
        escalated=escalated.astype(np.int64),
        correct=(edge_total + prefix[escalated]).astype(np.int64),
        n=n,
        edge_correct=edge_total,
        cloud_correct=int(c_ok.sum()),
    )


def escalation_rate(confidence: np.ndarray, threshold: float) -> float:
    """Share of requests the router escalates at ``threshold`` (``confidence < threshold``)."""
    conf = np.asarray(confidence, dtype=np.float64)
    return float((conf < float(threshold)).mean()) if conf.size else 0.0


# ----------------------------------------------------------------------------- choosing


def choose(s: Sweep, *, target_escalation: Optional[float] = None, target_accuracy: Optional[float] = None,
           max_accuracy_drop: Optional[float] = None) -> Choice:
    """Choose a threshold by exactly one of the three rules (see the module docstring)."""
    given = [(k, v) for k, v in (("target_escalation", target_escalation), ("target_accuracy", target_accuracy),
                                 ("max_accuracy_drop", max_accuracy_drop)) if v is not None]
    if len(given) != 1:
        raise CalibrationError("give exactly one of target_escalation, target_accuracy, max_accuracy_drop")
    name, value = given[0]
    value = float(value)
    if name == "target_escalation":
        return by_escalation(s, value)
    if name == "target_accuracy":
        return by_accuracy(s, value)
    return by_accuracy_drop(s, value)


def by_escalation(s: Sweep, target: float) -> Choice:
    if not 0.0 <= target <= 1.0:
        raise CalibrationError(f"target escalation must be within [0, 1]; got {target!r}")
    # Integer arithmetic: |escalated/n - target| compared as |escalated - target*n| (no rounding surprises).
    distance = np.abs(s.escalated - target * s.n)
    k = int(np.flatnonzero(distance <= distance.min() + 1e-9)[0])  # ties: the lower escalation
    return _choice(s, k, f"target_escalation={target:g}")


def by_accuracy(s: Sweep, target: float, rule: Optional[str] = None) -> Choice:
    if not 0.0 <= target <= 1.0:
        raise CalibrationError(f"target accuracy must be within [0, 1]; got {target!r}")
    need = math.ceil(target * s.n - 1e-9)
    ok = np.flatnonzero(s.correct >= need)
    rule = rule or f"target_accuracy={target:g}"
    if ok.size == 0:
        best = int(np.argmax(s.correct))
        p = s.point(best)
        raise CalibrationError(
            f"{rule}: no threshold reaches accuracy {target:.4f} on these {s.n} examples; the best is "
            f"{p.accuracy:.4f} at escalation {p.escalation:.1%} (edge-only {s.edge_accuracy:.4f}, "
            f"cloud-only {s.cloud_accuracy:.4f})"
        )
    return _choice(s, int(ok[0]), rule)  # escalation increases with k: the first is the lowest


def by_accuracy_drop(s: Sweep, drop_points: float) -> Choice:
    if not drop_points >= 0:
        raise CalibrationError(f"max accuracy drop must be >= 0 percentage points; got {drop_points!r}")
    target = max(0.0, s.cloud_accuracy - drop_points / 100.0)
    return by_accuracy(s, target, rule=f"max_accuracy_drop={drop_points:g}pt (accuracy >= {target:.4f})")


def _choice(s: Sweep, k: int, rule: str) -> Choice:
    lo, hi = float(s.lower[k]), float(s.thresholds[k])
    t = nice_threshold(lo, hi)
    return Choice(threshold=t, index=k, rule=rule, point=Point(t, int(s.escalated[k]), int(s.correct[k]), s.n),
                  interval=(max(lo, 0.0) if lo > -np.inf else 0.0, hi))


def guaranteed_choice(s: Sweep, promise) -> Choice:
    """The sweep's point at a threshold chosen by :func:`router_tools.guarantee.certify`.

    The threshold is kept as certified (a fixed grid value), not moved to a nicer decimal: the
    promise is about that threshold on unseen traffic, not about this sample's split."""
    t = float(promise.threshold)
    k = min(int(np.searchsorted(s.thresholds, t, side="left")), len(s.thresholds) - 1)
    rule = ", ".join(f"{name}={value:g}" for name, value in (("guarantee_accuracy", promise.accuracy),
                                                              ("guarantee_escalation", promise.escalation))
                     if value is not None) + f", delta={promise.delta:g}"
    return Choice(threshold=t, index=k, rule=rule, point=s.at(t), interval=(t, t))


def nice_threshold(lo: float, hi: float) -> float:
    """The shortest decimal ``t`` with ``lo < t <= hi`` (``t`` in [0, 1]), nearest the middle.

    ``lo = -inf`` (the first candidate: nothing escalates) gives 0.0.
    """
    if not lo < hi:
        raise CalibrationError(f"empty threshold interval ({lo}, {hi}]")
    if lo < 0.0 <= hi:
        return 0.0
    mid = (lo + hi) / 2.0
    for digits in range(1, 18):
        q = 10 ** digits
        a, b = math.floor(lo * q) + 1, math.floor(hi * q)
        if a > b:
            continue
        c = min(max(round(mid * q), a), b)
        for cand in (c, c - 1, c + 1, a, b, a + 1, b - 1):
            t = cand / q
            if lo < t <= hi:
                return t
    return hi


# ----------------------------------------------------------------------------- temperature


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities with the same float32 operations as ``OnnxClassifier.predict_proba``."""
    if not temperature > 0:
        raise CalibrationError(f"temperature must be > 0; got {temperature!r}")
    return calibrated_softmax(logits, temperature)


def refit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising NLL of ``labels`` under ``logits / T``."""
    logits = _matrix(logits, "logits")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(logits),):
        raise CalibrationError(f"labels of shape {labels.shape} do not match {len(logits)} rows of logits")
    return fit_temperature(logits, labels)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    return expected_calibration_error(probs, labels, bins)


def _matrix(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] < 2:
        raise CalibrationError(f"{what} must be a non-empty [N, C>=2] array; got shape {a.shape}")
    if not np.isfinite(a).all():
        raise CalibrationError(f"{what} contain NaN or infinite values")
    return a
