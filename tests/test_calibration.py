"""router_tools.thresholds on synthetic scores: known quantiles, ties, the < / >= boundary, and the
vectorised sweep against a brute-force loop."""

from __future__ import annotations

import numpy as np
import pytest

from router_tools.thresholds import (
    CalibrationError,
    apply_temperature,
    by_accuracy,
    by_accuracy_drop,
    by_escalation,
    choose,
    escalation_rate,
    nice_threshold,
    sweep,
    sweep_scores,
)


def brute(conf, e_ok, c_ok, t):
    esc = conf < t
    return int(esc.sum()), int(np.where(esc, c_ok, e_ok).sum())


# ----------------------------------------------------------------------------- known quantiles


def test_target_escalation_is_the_quantile_on_unique_scores():
    conf = (np.arange(100) + 0.5) / 100  # 0.005, 0.015, ..., 0.995
    ok = np.ones(100, bool)
    s = sweep_scores(conf, ok, ok)
    assert len(s.thresholds) == 101  # 100 unique + "above the largest" (escalate everything)
    for target, expected in [(0.25, 0.25), (0.1, 0.1), (0.5, 0.5), (0.0, 0.0), (1.0, 1.0), (0.333, 0.33)]:
        c = by_escalation(s, target)
        assert c.threshold == expected, (target, c)
        assert c.point.escalated == round(expected * 100)
        assert escalation_rate(conf, c.threshold) == pytest.approx(expected)


def test_target_escalation_between_candidates_takes_the_nearest():
    conf = np.array([0.1, 0.2, 0.3, 0.4])
    s = sweep_scores(conf, np.ones(4, bool), np.ones(4, bool))
    assert list(s.escalated) == [0, 1, 2, 3, 4]
    c = by_escalation(s, 0.3)  # 0.25 (1 of 4) is nearer than 0.5
    assert (c.point.escalated, c.threshold) == (1, 0.2)
    c = by_escalation(s, 0.375)  # exactly between 0.25 and 0.5: the lower escalation
    assert c.point.escalated == 1


def test_ties_escalate_together_and_the_boundary_is_strict():
    conf = np.array([0.5] * 50 + [0.9] * 50)
    ok = np.ones(100, bool)
    s = sweep_scores(conf, ok, ok)
    assert list(s.thresholds) == [0.5, 0.9, 1.0]
    assert list(s.escalated) == [0, 50, 100]
    # A threshold equal to a confidence does not escalate it: the router escalates on c < t.
    assert s.at(0.5).escalated == 0 and escalation_rate(conf, 0.5) == 0.0
    assert s.at(0.5000001).escalated == 50
    # 25 % is unreachable: 0 % and 50 % are equally far -> the lower escalation, threshold 0.
    c = by_escalation(s, 0.25)
    assert (c.threshold, c.point.escalated) == (0.0, 0)
    # 30 %: the nearest is 50 %, any t in (0.5, 0.9] does it; the shortest decimal nearest the middle.
    c = by_escalation(s, 0.3)
    assert (c.threshold, c.point.escalated, c.interval) == (0.7, 50, (0.5, 0.9))
    assert escalation_rate(conf, c.threshold) == 0.5
    c = by_escalation(s, 0.8)
    assert (c.threshold, c.point.escalated) == (1.0, 100)


def test_saturated_confidences_cannot_all_escalate():
    conf = np.array([1.0] * 10 + [0.6] * 10)
    ok = np.ones(20, bool)
    s = sweep_scores(conf, ok, ok)
    # No threshold <= 1 escalates a confidence of exactly 1.0 (the policy caps thresholds at 1).
    assert list(s.thresholds) == [0.6, 1.0] and list(s.escalated) == [0, 10]
    c = by_escalation(s, 1.0)
    assert (c.threshold, c.point.escalated) == (0.8, 10)  # any t in (0.6, 1.0]


# ----------------------------------------------------------------------------- accuracy rules


def cascade_case():
    # conf 0.1 .. 1.0; the edge is right from 0.5 up; the cloud is right except on the 0.7 one.
    conf = np.round(np.arange(1, 11) / 10, 1)
    e_ok = conf >= 0.5
    c_ok = conf != 0.7
    return conf, e_ok, c_ok


def test_sweep_counts_on_a_hand_worked_cascade():
    conf, e_ok, c_ok = cascade_case()
    s = sweep_scores(conf, e_ok, c_ok)
    assert s.edge_correct == 6 and s.cloud_correct == 9
    assert list(s.thresholds) == list(conf)  # max is 1.0: no "escalate all" candidate
    # t = 0.1: edge only (6); each escalated edge-wrong item (0.1..0.4) adds one; 0.5, 0.6 add 0;
    # escalating 0.7 loses one; 0.8, 0.9 add 0.
    assert list(s.escalated) == list(range(10))
    assert list(s.correct) == [6, 7, 8, 9, 10, 10, 10, 9, 9, 9]
    assert s.accuracy[4] == 1.0 and s.escalation[4] == 0.4


def test_target_accuracy_takes_the_lowest_escalation_reaching_it():
    conf, e_ok, c_ok = cascade_case()
    s = sweep_scores(conf, e_ok, c_ok)
    c = by_accuracy(s, 0.9)
    assert (c.point.escalated, c.point.correct, c.threshold) == (3, 9, 0.4)
    c = by_accuracy(s, 1.0)
    assert (c.point.escalated, c.threshold) == (4, 0.5)
    assert by_accuracy(s, 0.6).threshold == 0.0  # the edge alone suffices: never escalate


def test_max_accuracy_drop_is_in_points_below_cloud_only():
    conf, e_ok, c_ok = cascade_case()
    s = sweep_scores(conf, e_ok, c_ok)  # cloud-only 0.9
    assert by_accuracy_drop(s, 0.0).point.escalated == 3  # >= 0.9
    assert by_accuracy_drop(s, 10.0).point.escalated == 2  # >= 0.8
    assert by_accuracy_drop(s, 10.01).point.escalated == 2  # >= 0.7999: 8 of 10 correct needed
    assert by_accuracy_drop(s, 20.0).point.escalated == 1  # >= 0.7
    assert by_accuracy_drop(s, 30.0).point.escalated == 0  # >= 0.6: edge only


def test_unreachable_accuracy_is_a_clear_error():
    conf, e_ok, c_ok = cascade_case()
    s = sweep_scores(conf, e_ok, ~np.ones(10, bool))  # the cloud is always wrong
    with pytest.raises(CalibrationError, match=r"no threshold reaches accuracy 0\.9000.*best is 0\.6000"):
        by_accuracy(s, 0.9)


def test_choose_needs_exactly_one_rule():
    s = sweep_scores(np.array([0.2, 0.8]), np.ones(2, bool), np.ones(2, bool))
    with pytest.raises(CalibrationError, match="exactly one"):
        choose(s)
    with pytest.raises(CalibrationError, match="exactly one"):
        choose(s, target_escalation=0.2, target_accuracy=0.9)
    assert choose(s, target_escalation=0.5).point.escalated == 1
    with pytest.raises(CalibrationError, match="within"):
        choose(s, target_escalation=1.5)
    with pytest.raises(CalibrationError, match=">= 0"):
        choose(s, max_accuracy_drop=-1)


# ----------------------------------------------------------------------------- the vectorised sweep


@pytest.mark.parametrize("seed", range(5))
def test_sweep_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 400
    conf = np.round(rng.beta(5, 1, n), 2)  # heavy ties
    conf[:5] = 1.0
    e_ok = rng.random(n) < conf
    c_ok = rng.random(n) < 0.9
    s = sweep_scores(conf, e_ok, c_ok)
    assert np.all(np.diff(s.escalated) > 0)
    for k, t in enumerate(s.thresholds):
        assert (s.escalated[k], s.correct[k]) == brute(conf, e_ok, c_ok, t)
        # any threshold inside the candidate's interval splits the data the same way
        lo = s.lower[k]
        mid = nice_threshold(lo, t)
        assert (lo < mid <= t) and brute(conf, e_ok, c_ok, mid) == (s.escalated[k], s.correct[k])
    for target in np.linspace(0, 1, 21):
        c = by_escalation(s, target)
        best = min(abs(e - target * n) for e in s.escalated)
        assert abs(c.point.escalated - target * n) == pytest.approx(best)
        assert brute(conf, e_ok, c_ok, c.threshold) == (c.point.escalated, c.point.correct)


def test_sweep_from_probabilities():
    probs_edge = np.array([[0.9, 0.1], [0.4, 0.6], [0.55, 0.45]])
    probs_cloud = np.array([[0.8, 0.2], [0.1, 0.9], [0.2, 0.8]])
    labels = np.array([0, 0, 1])
    s = sweep(probs_edge, probs_cloud, labels)
    assert (s.edge_correct, s.cloud_correct) == (1, 2)
    assert list(s.thresholds) == [0.55, 0.6, 0.9, 1.0]
    assert list(s.correct) == [1, 2, 2, 2]
    with pytest.raises(CalibrationError, match="shape"):
        sweep(probs_edge, probs_cloud[:2], labels)
    with pytest.raises(CalibrationError, match="labels"):
        sweep(probs_edge, probs_cloud, labels[:2])
    with pytest.raises(CalibrationError, match="NaN"):
        sweep(np.full((3, 2), np.nan), probs_cloud, labels)


def test_nice_threshold():
    assert nice_threshold(0.245, 0.255) == 0.25
    assert nice_threshold(0.5, 0.9) == 0.7
    assert nice_threshold(float("-inf"), 0.3) == 0.0
    assert nice_threshold(0.1234561, 0.1234569) == 0.1234565
    rng = np.random.default_rng(0)
    for lo in rng.random(200):
        hi = float(np.nextafter(np.float32(lo), np.float32(2)))  # adjacent float32 values
        t = nice_threshold(float(lo), hi)
        assert lo < t <= hi


def test_apply_temperature_matches_softmax():
    logits = np.random.default_rng(0).normal(size=(20, 10)).astype(np.float32) * 4
    p = apply_temperature(logits, 1.5)
    e = np.exp(logits / 1.5 - (logits / 1.5).max(axis=1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(axis=1, keepdims=True), rtol=1e-5)
    assert p.dtype == np.float32
    with pytest.raises(CalibrationError):
        apply_temperature(logits, 0)


# ----------------------------------------------------------------------------- the softmax's one-row path


@pytest.mark.parametrize("temperature", [1.0, 1.05011, 0.37])
def test_one_row_softmax_is_the_batch_formula_bit_for_bit(temperature):
    """calibrated_softmax's batch-1 path (the router's hot path: ufuncs into a 0-d scratch)
    gives each row exactly what the batch path gives it, and the copy what the in-place call gives."""
    from edge_model.calibration import calibrated_softmax

    logits = (np.random.default_rng(3).standard_normal((256, 10)) * 7).astype(np.float32)
    batch = calibrated_softmax(logits, temperature)
    for i in range(len(logits)):
        one = calibrated_softmax(logits[i:i + 1], temperature)
        np.testing.assert_array_equal(one[0], batch[i])
        np.testing.assert_array_equal(calibrated_softmax(logits[i:i + 1].copy(), temperature, inplace=True), one)
        np.testing.assert_array_equal(calibrated_softmax(logits[i], temperature), one)  # a 1-D row
