"""A confidence threshold with a finite-sample guarantee (numpy + math only, no I/O).

The promises, over the draw of the calibration sample (i.i.d. from the traffic the router will see):

* accuracy: with probability >= 1 - delta, the accuracy of the requests the edge answers at the
  chosen threshold (confidence ``c >= t``) is >= ``A``;
* escalation: with probability >= 1 - delta, the share escalated (``c < t``) is <= ``E``.

Method: Learn-then-Test (Angelopoulos et al., 2021) with the fallback procedure (Wiens, 2003; a
fixed sequence that can restart) over a fixed grid of thresholds, each hypothesis tested with an
exact one-sided binomial (Clopper-Pearson) test.

* Accuracy. For a grid threshold ``t`` the null is ``H_t: P(edge wrong | c >= t) > 1 - A``.
  Given how many calibration examples the edge answers at ``t`` (``n_t``), its errors ``k_t`` are
  Binomial(n_t, p_t), so ``H_t`` is rejected at level delta when ``P(X <= k_t; n_t, 1 - A) <= delta``
  (equivalently: the Clopper-Pearson upper bound on the error rate is <= 1 - A). The grid is walked
  from the most conservative threshold (:data:`GRID` starts at 0.9999) downwards; the level of each
  test is its own share of delta (:data:`ENTRIES`: delta / 4 at each of 0.9999, 0.999, 0.99 and 0.9,
  nothing elsewhere) plus the whole level of the previous test when that one was rejected. Any
  rejected threshold is then safe with probability >= 1 - delta (family-wise error control, for any
  fixed order, without monotonicity of the conditional error in ``t`` -- which does not hold in
  general), and the lowest rejected one is chosen. Once the walk has passed all four entry points
  unbroken, thresholds are tested at the full delta, as in plain fixed-sequence testing; the entry
  points let the walk restart below the very top, where a model with few near-certain answers (or
  one class) has too few examples for any test to pass. Bonferroni over ~1,400 thresholds would
  cost a factor ~1,400 in delta, and conformal risk control bounds the *joint* risk
  ``P(c >= t and wrong)`` in expectation, not the conditional accuracy with probability 1 - delta
  that an operator reads as "edge answers are >= A accurate".
* Escalation. The share escalated ``q_t = P(c < t)`` rises with ``t``; ``H_t: q_t > E`` is rejected
  when ``P(X <= k_t; n, E) <= delta`` with ``k_t`` the escalated count, walking the grid upwards;
  the highest rejected threshold is the most accurate one that keeps the promise.
* Both: each promise gets delta / 2 (Bonferroni over the two), and the lowest threshold keeping
  both is chosen (the accuracy one, if it is below the escalation one).

The grid is fixed, not taken from the data (a data-chosen grid would void the test): steps of
0.0001 from 0.9999 down to 0.9, 0.001 down to 0.5, then 0.01 down to 0.1 -- the edge's
confidences crowd near 1.

The binomial tail is written here (``scipy`` is not a dependency): exact sums of the pmf in log
space (log-factorials from a cumulative sum of logs, exact to ~1e-11 relative for n <= 10^6), vectorised
over the grid, and the Clopper-Pearson bound by bisection on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from router_tools.thresholds import CalibrationError

ENTRIES: tuple[float, ...] = (0.9999, 0.999, 0.99, 0.9)  # each starts a walk with delta / 4
GRID: np.ndarray = np.concatenate([
    np.round(np.arange(9999, 8999, -1) / 10000.0, 4),  # 0.9999 .. 0.9000
    np.round(np.arange(899, 499, -1) / 1000.0, 3),  # 0.899 .. 0.500
    np.round(np.arange(49, 9, -1) / 100.0, 2),  # 0.49 .. 0.10
])


# ----------------------------------------------------------------------------- the binomial tail


def binom_cdf(k: int, n: int, p: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, p)``, exactly (up to float rounding)."""
    return float(binom_cdf_many(np.array([k]), np.array([n]), p)[0])


def binom_cdf_many(k: np.ndarray, n: np.ndarray, p: float) -> np.ndarray:
    """``P(X_i <= k_i)`` for ``X_i ~ Binomial(n_i, p)``, element-wise."""
    k = np.asarray(k, dtype=np.int64).ravel()
    n = np.asarray(n, dtype=np.int64).ravel()
    p = float(p)
    if k.shape != n.shape or (n.size and n.min() < 0) or not 0.0 <= p <= 1.0:
        raise CalibrationError(f"binomial needs matching k, n >= 0 and p in [0, 1]; got p={p}")
    out = np.where(k >= n, 1.0, 0.0)
    inner = np.flatnonzero((k >= 0) & (k < n))
    if inner.size == 0:
        return out
    if p == 0.0 or p == 1.0:
        out[inner] = 1.0 if p == 0.0 else 0.0
        return out
    log_fact = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, int(n.max()) + 1, dtype=np.float64)))))
    lp, lq = math.log(p), math.log1p(-p)
    rows = max(1, 1_000_000 // (int(k[inner].max()) + 1))  # bound the [rows, k+1] block
    for a in range(0, inner.size, rows):
        idx = inner[a:a + rows]
        kk, nn = k[idx][:, None], n[idx][:, None]
        j = np.arange(int(kk.max()) + 1)[None, :]
        jj = np.minimum(j, kk)  # columns past k are masked below; keep their indices in range
        log_pmf = log_fact[nn] - log_fact[jj] - log_fact[nn - jj] + jj * lp + (nn - jj) * lq
        log_pmf = np.where(j <= kk, log_pmf, -np.inf)
        top = log_pmf.max(axis=1, keepdims=True)
        out[idx] = np.minimum(1.0, np.exp(top[:, 0]) * np.exp(log_pmf - top).sum(axis=1))
    return out


def binom_sf(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``."""
    return 1.0 - binom_cdf(int(k) - 1, n, p) if k > 0 else 1.0


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """Exact one-sided upper confidence bound (level 1 - alpha) on a binomial rate from ``k`` of ``n``:
    the ``p`` with ``P(X <= k; n, p) = alpha`` (1.0 when ``k == n``)."""
    _check_alpha(alpha)
    if n <= 0 or k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(100):  # bisection: the cdf falls as p rises
        mid = (lo + hi) / 2.0
        if binom_cdf(k, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return hi


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """Exact one-sided lower confidence bound (level 1 - alpha): ``1 - upper(n - k, n)``."""
    return 0.0 if k <= 0 or n <= 0 else 1.0 - clopper_pearson_upper(n - k, n, alpha)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise CalibrationError(f"delta must be within (0, 1); got {alpha!r}")


# ----------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class Guarantee:
    """A threshold chosen with a finite-sample promise, and the calibration figures behind it."""

    threshold: float
    delta: float
    n: int
    answered: int  # calibration examples the edge answers at the threshold (c >= t)
    errors: int  # ... of which the edge got wrong
    escalated: int  # n - answered
    accuracy: Optional[float] = None  # promised edge-answered accuracy A
    escalation: Optional[float] = None  # promised escalation share E
    error_bound: float = 1.0  # Clopper-Pearson upper bound on the edge-answered error rate (level of its test)
    escalation_bound: float = 1.0  # Clopper-Pearson upper bound on the escalation share
    tested: int = 0  # hypotheses tested in the fixed sequences
    method: str = "Learn-then-Test, fallback procedure over a fixed grid, exact binomial (Clopper-Pearson)"

    @property
    def escalation_share(self) -> float:
        return self.escalated / self.n

    @property
    def edge_accuracy(self) -> float:
        return 1.0 - self.errors / self.answered if self.answered else 1.0

    def statement(self) -> str:
        """The promise in words, with the figures on the calibration sample."""
        promises = []
        if self.accuracy is not None:
            promises.append(f"edge-answered accuracy >= {self.accuracy:.1%}")
        if self.escalation is not None:
            promises.append(f"escalation <= {self.escalation:.1%}")
        return (f"with probability >= {1 - self.delta:.0%} over the calibration sample (n={self.n}), "
                f"{' and '.join(promises)} at threshold {self.threshold:g}; on this sample: escalation "
                f"{self.escalation_share:.1%}, edge-answered accuracy {self.edge_accuracy:.2%} "
                f"({self.answered - self.errors}/{self.answered})")


def certify(confidence: np.ndarray, edge_correct: np.ndarray, *, accuracy: Optional[float] = None,
            escalation: Optional[float] = None, delta: float = 0.05, grid: np.ndarray = GRID,
            entries: tuple[float, ...] = ENTRIES) -> Guarantee:
    """The lowest grid threshold keeping the promise(s) (see the module docstring).

    ``confidence``: the edge's calibrated top probability per calibration example; ``edge_correct``:
    whether the edge's answer was right. Raises :class:`CalibrationError` when no threshold can be
    certified on this sample (too few examples for the promise, or promises in conflict)."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(edge_correct, dtype=bool)
    if conf.ndim != 1 or conf.size == 0 or ok.shape != conf.shape:
        raise CalibrationError(f"need equal-length non-empty confidences and correctness; got {conf.shape}, {ok.shape}")
    if accuracy is None and escalation is None:
        raise CalibrationError("give an accuracy or an escalation promise (or both)")
    if accuracy is not None and not 0.0 < accuracy < 1.0:
        raise CalibrationError(f"guaranteed accuracy must be within (0, 1); got {accuracy!r}")
    if escalation is not None and not 0.0 < escalation < 1.0:
        raise CalibrationError(f"guaranteed escalation must be within (0, 1); got {escalation!r}")
    _check_alpha(delta)
    grid = np.sort(np.asarray(grid, dtype=np.float64))[::-1]  # descending: most conservative first
    each = delta / 2.0 if accuracy is not None and escalation is not None else delta
    n = conf.size
    order = np.argsort(conf, kind="stable")
    sorted_conf, wrong_sorted = conf[order], ~ok[order]
    wrong_above = np.concatenate((np.cumsum(wrong_sorted[::-1])[::-1], [0]))  # wrong among sorted[i:]
    below = np.searchsorted(sorted_conf, grid, side="left")  # escalated count at each grid threshold
    tested = 0

    t_acc = None
    if accuracy is not None:
        answered_all, errors_all = n - below, wrong_above[below]
        p_values = np.where(answered_all > 0, binom_cdf_many(errors_all, answered_all, 1.0 - accuracy), 1.0)
        is_entry = np.isclose(grid[:, None], np.asarray(entries, dtype=np.float64)[None, :], rtol=0, atol=1e-12).any(axis=1)
        starts = np.flatnonzero(is_entry).tolist() or [0]
        weight = [0.0] * len(grid)
        for i in starts:
            weight[i] = each / len(starts)
        level, last, t_acc = 0.0, False, None
        for i, p_value in enumerate(p_values.tolist()):  # the fallback procedure: a rejection passes its level on
            level = weight[i] + (level if last else 0.0)
            tested += level > 0
            last = level > 0 and p_value <= level
            if last:
                t_acc = i  # descending grid: the last rejected is the lowest threshold
        if t_acc is None:
            top = grid[starts[0]]
            answered = n - int(below[starts[0]])
            errors = int(wrong_above[below[starts[0]]])
            raise CalibrationError(
                f"no threshold guarantees edge-answered accuracy >= {accuracy:.2%} at delta={delta:g} from these "
                f"{n} examples (at the most conservative threshold {top:g} the edge answers {answered} with "
                f"{errors} wrong: error bound {clopper_pearson_upper(errors, answered, each):.2%}); "
                "use more calibration data or a lower accuracy")

    t_esc = None
    if escalation is not None:
        ascending = below[::-1]
        rejected = binom_cdf_many(ascending, np.full_like(ascending, n), escalation) <= each
        stop = int(np.argmin(rejected)) if not rejected.all() else len(grid)
        tested += min(stop + 1, len(grid))
        t_esc = len(grid) - stop if stop > 0 else None  # back to a descending-grid index
        if t_esc is None:
            raise CalibrationError(
                f"no threshold guarantees escalation <= {escalation:.1%} at delta={delta:g} from these {n} examples; "
                "use more calibration data or a higher escalation share")

    if t_acc is not None and t_esc is not None and t_acc < t_esc:  # descending grid: index < means higher t
        raise CalibrationError(
            f"the promises conflict at delta={delta:g}: edge-answered accuracy >= {accuracy:.2%} needs a threshold "
            f">= {grid[t_acc]:g}, escalation <= {escalation:.1%} needs one <= {grid[t_esc]:g}")
    k = t_acc if t_acc is not None else t_esc
    answered, errors = n - int(below[k]), int(wrong_above[below[k]])
    return Guarantee(
        threshold=float(grid[k]), delta=float(delta), n=n, answered=answered, errors=errors,
        escalated=int(below[k]), accuracy=accuracy, escalation=escalation,
        error_bound=clopper_pearson_upper(errors, answered, each) if answered else 0.0,
        escalation_bound=clopper_pearson_upper(int(below[k]), n, each), tested=tested)
