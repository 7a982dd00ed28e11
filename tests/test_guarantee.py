"""The threshold with a stated guarantee (router_tools.guarantee, ``calibrate --guarantee-*``).

The promise is checked the way it is made: many random calibration samples drawn from the
validation split, a threshold chosen on each, the promise checked on the held-out test split; the
share of broken promises must be compatible with "at most delta" (a one-sided binomial test at
1 %, not an exact count: 200 draws are a finite sample of the draw-to-draw randomness)."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from edge_model import EdgeModel
from router_tools.cli import main
from router_tools.datasets import load_test, load_validation
from router_tools.guarantee import (GRID, binom_cdf, binom_cdf_many, binom_sf, certify, clopper_pearson_lower,
                                    clopper_pearson_upper)
from router_tools.scoring import model_probs
from router_tools.thresholds import CalibrationError

DRAWS, SUBSET = 200, 1000


def exact_cdf(k: int, n: int, p: Fraction) -> float:
    return float(sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k + 1)))


# ----------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("k,n,p", [(0, 1, "1/2"), (3, 10, "3/10"), (7, 40, "1/20"), (30, 1000, "3/100"),
                                   (250, 1000, "1/4"), (0, 500, "1/1000"), (99, 100, "99/100")])
def test_binomial_cdf_matches_exact_rational_sums(k, n, p):
    assert binom_cdf(k, n, float(Fraction(p))) == pytest.approx(exact_cdf(k, n, Fraction(p)), rel=1e-9, abs=1e-300)


def test_binomial_edges_and_vectorised_form():
    assert binom_cdf(-1, 10, 0.3) == 0.0 and binom_cdf(10, 10, 0.3) == 1.0 and binom_cdf(12, 10, 0.3) == 1.0
    assert binom_cdf(3, 10, 0.0) == 1.0 and binom_cdf(3, 10, 1.0) == 0.0
    assert binom_sf(0, 10, 0.3) == 1.0 and binom_sf(4, 10, 0.3) == pytest.approx(1 - binom_cdf(3, 10, 0.3))
    k, n = np.array([0, 5, 17, 40, 3]), np.array([10, 50, 400, 40, 2])
    many = binom_cdf_many(k, n, 0.04)
    np.testing.assert_allclose(many, [binom_cdf(a, b, 0.04) for a, b in zip(k, n)], rtol=1e-12)
    with pytest.raises(CalibrationError):
        binom_cdf(1, 10, 1.5)


def test_clopper_pearson_closed_forms_and_definition():
    for n in (1, 20, 1000):
        assert clopper_pearson_upper(0, n, 0.05) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9)
        assert clopper_pearson_upper(n, n, 0.05) == 1.0
        assert clopper_pearson_lower(n, n, 0.05) == pytest.approx(0.05 ** (1 / n), rel=1e-9)
    ub = clopper_pearson_upper(30, 1000, 0.05)
    assert binom_cdf(30, 1000, ub) == pytest.approx(0.05, rel=1e-6)  # the defining equation
    assert 0.03 < ub < 0.045
    assert clopper_pearson_upper(30, 1000, 0.001) > ub  # a smaller alpha, a wider bound
    with pytest.raises(CalibrationError):
        clopper_pearson_upper(1, 10, 0.0)


def test_clopper_pearson_covers_at_least_its_level():
    rng = np.random.default_rng(7)
    p, n, alpha, trials = 0.03, 300, 0.1, 2000
    misses = sum(clopper_pearson_upper(int(k), n, alpha) < p for k in rng.binomial(n, p, trials))
    assert binom_sf(misses, trials, alpha) > 0.01, misses  # compatible with a miss rate <= alpha


# ----------------------------------------------------------------------------- choosing, synthetic


def synthetic(n=4000, seed=1):
    """Confidences crowded near 1 like a softmax's (10 % at or above 0.9999); the edge is right
    with probability c (perfectly calibrated)."""
    rng = np.random.default_rng(seed)
    c = 1.0 - 0.9 * rng.uniform(size=n) ** 4
    return c, rng.uniform(size=n) < c


def test_certify_chooses_a_grid_threshold_and_reports_it():
    c, ok = synthetic()
    g = certify(c, ok, accuracy=0.95, delta=0.05)
    assert g.threshold in GRID
    assert g.error_bound <= 0.05 and g.edge_accuracy >= 0.95
    assert g.answered == int((c >= g.threshold).sum()) and g.escalated == g.n - g.answered
    text = g.statement()
    assert "with probability >= 95% over the calibration sample (n=4000)" in text
    assert "edge-answered accuracy >= 95.0%" in text and f"escalation {g.escalation_share:.1%}" in text
    # a stricter promise needs a higher threshold
    assert certify(c, ok, accuracy=0.97, delta=0.05).threshold > g.threshold
    assert certify(c, ok, accuracy=0.95, delta=0.001).threshold >= g.threshold


def test_escalation_promise_and_both_split_delta():
    c, ok = synthetic()
    g = certify(c, ok, escalation=0.5, delta=0.05)
    assert g.escalation_bound <= 0.5 and g.escalation_share < 0.5
    both = certify(c, ok, accuracy=0.9, escalation=0.6, delta=0.05)
    assert both.threshold == certify(c, ok, accuracy=0.9, delta=0.025).threshold  # delta/2 each
    assert "and escalation <= 60.0%" in both.statement()


def test_impossible_and_conflicting_promises_are_refused_in_one_line():
    c, ok = synthetic(n=300)
    with pytest.raises(CalibrationError, match="no threshold guarantees edge-answered accuracy >= 99.90%"):
        certify(c, ok, accuracy=0.999)
    c, ok = synthetic()
    with pytest.raises(CalibrationError, match="the promises conflict"):
        certify(c, ok, accuracy=0.97, escalation=0.2)
    with pytest.raises(CalibrationError, match="give an accuracy or an escalation"):
        certify(c, ok)
    with pytest.raises(CalibrationError, match="delta"):
        certify(c, ok, accuracy=0.9, delta=1.0)


# ----------------------------------------------------------------------------- the promise, on real data


@pytest.fixture(scope="module")
def scores():
    edge = EdgeModel()
    val, test = load_validation(), load_test()
    pv, pt = model_probs(edge, val.images), model_probs(edge, test.images)
    return (pv.max(axis=1), pv.argmax(axis=1) == val.labels, pt.max(axis=1), pt.argmax(axis=1) == test.labels)


def broken_promises(scores, delta, **promise):
    cv, okv, ct, okt = scores
    rng = np.random.default_rng(2026)
    broken, escalation = 0, []
    for _ in range(DRAWS):
        idx = rng.choice(len(cv), SUBSET, replace=False)
        g = certify(cv[idx], okv[idx], delta=delta, **promise)
        answered = ct >= g.threshold
        escalation.append(1 - answered.mean())
        if "accuracy" in promise and okt[answered].mean() < promise["accuracy"]:
            broken += 1
        elif "escalation" in promise and 1 - answered.mean() > promise["escalation"]:
            broken += 1
    return broken, float(np.median(escalation))


@pytest.mark.parametrize("accuracy,delta", [(0.98, 0.1), (0.97, 0.2)])
def test_accuracy_promise_holds_on_the_test_split(scores, accuracy, delta):
    broken, median_escalation = broken_promises(scores, delta, accuracy=accuracy)
    # P(Binomial(200, delta) >= broken) > 1 %: as few broken promises as "at most delta" allows
    assert binom_sf(broken, DRAWS, delta) > 0.01, (broken, DRAWS, delta)
    assert median_escalation < 0.4  # not a vacuous promise (escalating everything keeps any promise)


def test_escalation_promise_holds_on_the_test_split(scores):
    broken, median_escalation = broken_promises(scores, 0.1, escalation=0.25)
    assert binom_sf(broken, DRAWS, 0.1) > 0.01, broken
    assert median_escalation > 0.15  # and it uses the budget: not a threshold of 0


# ----------------------------------------------------------------------------- the command


def test_calibrate_guarantee_writes_the_promise_into_the_policy(tmp_path, capsys):
    policy = tmp_path / "policy.yaml"
    policy.write_text("# mine\nconfidence_threshold: 0.5  # keep\n")
    out = tmp_path / "cal.json"
    assert main(["calibrate", "--guarantee-accuracy", "0.97", "--delta", "0.05", "--write", str(policy),
                 "--json", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "guarantee: with probability >= 95% over the calibration sample (n=5000), edge-answered accuracy >= 97.0%" in printed
    result = json.loads(out.read_text())
    assert result["threshold"] in GRID and result["guarantee"]["error_bound"] <= 0.03
    text = policy.read_text()
    assert "# Chosen by `hybrid-router calibrate --guarantee-accuracy 0.97 --delta 0.05`" in text
    assert "Guarantee: with probability >= 95% over the calibration sample" in text
    assert f"confidence_threshold: {result['threshold']!r}  # keep" in text and text.startswith("# mine\n")


def test_calibrate_needs_exactly_one_kind_of_target(capsys):
    assert main(["calibrate", "--limit", "10"]) == 2
    assert main(["calibrate", "--target-escalation", "0.2", "--guarantee-accuracy", "0.9", "--limit", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("give one of --target-escalation" in line for line in err)
    assert main(["calibrate", "--guarantee-accuracy", "0.9999", "--limit", "200"]) == 2
    assert "no threshold guarantees" in capsys.readouterr().err


def test_the_walk_restarts_below_a_top_threshold_with_too_few_examples():
    # No confidence reaches 0.9999, so a plain fixed sequence from the top certifies nothing; the
    # fallback procedure enters again at 0.999 with delta / 4 and certifies a threshold below it.
    c, ok = synthetic(n=4000)
    c = np.minimum(c, 0.9995)
    g = certify(c, ok, accuracy=0.95, delta=0.05)
    assert g.threshold < 0.999 and g.error_bound <= 0.05
    with pytest.raises(CalibrationError, match="most conservative threshold 0.9999 the edge answers 0"):
        certify(c, ok, accuracy=0.95, delta=0.05, entries=(0.9999,))  # a plain fixed sequence
