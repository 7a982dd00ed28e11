"""Confidence calibration math (numpy only): softmax, temperature scaling, ECE.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar ``T`` fitted to
minimise the negative log-likelihood on held-out data; it changes confidence, not argmax.
"""

from __future__ import annotations

import numpy as np

_MAX, _SUM, _SUB, _EXP, _DIV, _MUL = np.maximum.reduce, np.add.reduce, np.subtract, np.exp, np.true_divide, np.multiply
_INVERSES: dict[float, np.ndarray] = {}
_F32 = np.dtype(np.float32)


def _inverse(temperature: float) -> np.ndarray:
    """``float32(1 / T)`` as a read-only 0-d array, kept per temperature (a process sees a few):
    the same multiplier as a numpy scalar, without numpy 1.x's per-call scalar conversion."""
    inv = _INVERSES.get(temperature)
    if inv is None:
        inv = np.array(np.float32(1.0 / float(temperature)))
        inv.flags.writeable = False
        if len(_INVERSES) < 64:
            _INVERSES[temperature] = inv
    return inv


def calibrated_softmax(logits: np.ndarray, temperature: float = 1.0, *, inplace: bool = False) -> np.ndarray:
    """Row-wise ``softmax(logits / T)`` in float32: the one calibrated-softmax formula of the project.

    The edge runtime, the cloud data plane, the Triton adapter, the router's v2 client and the
    calibration tools all call this, so the same logits give bit-identical probabilities on every
    side (``tests/test_calibration.py`` checks it). ``inplace=True`` reuses a float32 C-contiguous
    ``logits`` buffer (the hot paths own theirs); otherwise the input is copied.
    """
    if inplace and type(logits) is np.ndarray and logits.dtype is _F32 and logits.flags.writeable:
        z = logits  # (`is`: a float32 array's dtype is numpy's one native float32; any other goes the copy way)
    else:
        z = np.array(logits, dtype=np.float32)
    if z.ndim == 1:
        z = z[None, :]
    if temperature != 1.0:
        _MUL(z, _inverse(temperature), z)
    if len(z) == 1:
        # Batch 1 (the router's hot path), the same operations in the same order: 1-D reductions
        # (a third of keepdims ones) called as ufuncs, not through ndarray.max/sum's Python
        # wrappers, into a 0-d array (numpy 1.x converts a numpy scalar operand at ~1 us a call).
        row = z[0]
        m = _MAX(row, None, None, np.empty((), np.float32))
        _SUB(row, m, row)
        _EXP(row, row)
        _DIV(row, _SUM(row, None, None, m), row)
        return z
    # The same reductions as z.max/z.sum(axis=1, keepdims=True), without their Python wrappers.
    _SUB(z, _MAX(z, 1, None, None, True), z)
    _EXP(z, z)
    _DIV(z, _SUM(z, 1, None, None, True), z)
    return z


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Alias of :func:`calibrated_softmax` (a copy; never in place)."""
    return calibrated_softmax(logits, temperature)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """The ``T`` minimising NLL, by golden-section search over ``log T`` (NLL is unimodal there)."""
    a, b = np.log(lo), np.log(hi)
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(logits, labels, np.exp(c)), nll(logits, labels, np.exp(d))
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(logits, labels, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(logits, labels, np.exp(d))
    return float(np.exp((a + b) / 2))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| weighted by size."""
    probs = np.asarray(probs)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)
