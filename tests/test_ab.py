"""A/B tests of routing policies (router/ab.py, hybrid-router ab): deterministic assignment that
matches the shares, per-arm overrides, per-arm statistics, interval math against published values,
and the "not yet significant" wording. Fake clock; no network."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from router import Reason, Router
from router.ab import ExperimentSettings, ExperimentStats, _percentiles, assign, bucket, compare, newcombe, wilson
from router.errors import ConfigError
from router.policy import DEFAULT_POLICY_PATH, parse_policy
from router_tools.cli import main as cli_main
from tests.test_decision import FakeClock, drive, local, make_request, reply
from router.decision import route

ARMS = [{"name": "a", "share": 0.3, "overrides": {"confidence_threshold": 0.0}},
        {"name": "b", "share": 0.7, "overrides": {"mode": "edge_only", "default_deadline_ms": 40,
                                                  "budget": {"rate_per_s": 1}}}]


def experiment(**kw) -> dict:
    return {"name": "thr-test", "key": "caller", "arms": ARMS, **kw}


def router_with(exp: dict, **policy) -> Router:
    return Router(parse_policy({"experiments": exp, "decision_log": False, "cloud": {"endpoints": []}, **policy}),
                  clock=FakeClock())


@pytest.fixture(scope="module")
def image():
    from router_tools.datasets import load_test

    return load_test().images[0]


# ----------------------------------------------------------------------------- assignment


def test_assignment_is_a_stable_hash():
    # blake2b(name \0 key), 8 bytes big-endian / 2^64: the same on every machine and release
    assert bucket("exp", "user-42") == pytest.approx(0.6921643770693562, abs=1e-15)
    s = ExperimentSettings.model_validate(experiment())
    first = [assign(s, f"user-{i}").name for i in range(200)]
    again = [assign(ExperimentSettings.model_validate(experiment()), f"user-{i}").name for i in range(200)]
    assert first == again
    # another experiment name reshuffles
    other = ExperimentSettings.model_validate(experiment(name="thr-test-2"))
    assert [assign(other, f"user-{i}").name for i in range(200)] != first


@pytest.mark.parametrize("shares", [(0.3, 0.7), (0.5, 0.5), (0.1, 0.2, 0.7)])
def test_assignment_matches_the_shares_within_binomial_tolerance(shares):
    arms = [{"name": f"arm{i}", "share": s} for i, s in enumerate(shares)]
    s = ExperimentSettings.model_validate({"name": "shares", "arms": arms})
    n = 20_000
    counts = {a["name"]: 0 for a in arms}
    for i in range(n):
        counts[assign(s, f"device-{i}").name] += 1
    for a in arms:
        sigma = math.sqrt(n * a["share"] * (1 - a["share"]))
        assert abs(counts[a["name"]] - n * a["share"]) < 4.5 * sigma, counts


def test_schema_refuses_bad_experiments():
    with pytest.raises(ConfigError, match="add up to 1"):
        parse_policy({"experiments": {"name": "x", "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}]}})
    with pytest.raises(ConfigError, match="unique"):
        parse_policy({"experiments": {"name": "x", "arms": [{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}]}})
    with pytest.raises(ConfigError, match="arms"):
        parse_policy({"experiments": {"name": "x", "arms": [{"name": "a", "share": 1.0}]}})
    with pytest.raises(ConfigError, match="treshold"):
        parse_policy({"experiments": {"name": "x", "arms": [
            {"name": "a", "share": 0.5, "overrides": {"confidence_treshold": 0.9}}, {"name": "b", "share": 0.5}]}})


def test_the_documented_example_parses():
    text = DEFAULT_POLICY_PATH.read_text()
    block = text[text.index("#   experiments:"):text.index("experiments: null")]
    example = "\n".join(line[2:] for line in block.splitlines())
    p = parse_policy({"experiments": yaml.safe_load(example)["experiments"]})
    assert [a.overrides.confidence_threshold for a in p.experiments.arms] == [0.85, 0.92]


# ----------------------------------------------------------------------------- through the router


def test_per_arm_overrides_are_applied(image):
    with router_with(experiment()) as r:
        by_arm = {}
        for i in range(40):
            key = f"user-{i}"
            req = r._begin((image,), None, None, None, None, None, ab_key=key)
            by_arm.setdefault(req.arm, req)
            assert req.arm == assign(r.policy.experiments, key).name
        a, b = by_arm["a"], by_arm["b"]
        assert (a.mode.value, a.thresholds[0], a.deadline - a.started) == ("prefer_edge", 0.0, pytest.approx(0.150))
        assert (b.mode.value, b.deadline - b.started) == ("edge_only", pytest.approx(0.040))
        assert a.budget is None and b.budget is not None  # b has its own escalation budget
        # explicit arguments of the call beat the arm
        req = r._begin((image,), 99, None, "prefer_edge", None, 0.5, ab_key=b.request_id and "user-x")
        assert req.mode.value == "prefer_edge" and req.thresholds[0] == 0.5 and req.deadline - req.started == pytest.approx(0.099)

        p = r.predict(image, ab_key="user-7")
        arm = assign(r.policy.experiments, "user-7").name
        assert p.arm == arm and p.reason == {"a": Reason.CONFIDENT, "b": Reason.MODE}[arm]
        assert {r.predict(image, ab_key="user-7").arm for _ in range(5)} == {arm}
        stats = r.stats()
    assert stats["experiments"]["arms"][arm]["requests"] == 6
    assert "b" in stats["escalation_budget"]["arms"]


def test_per_request_assignment_without_a_key(image):
    with router_with(experiment()) as r:
        arms = [r.predict(image).arm for _ in range(60)]
    assert set(arms) == {"a", "b"}  # 0.3^60 and 0.7^60 are nil
    with router_with(experiment(key="request")) as r:
        # key: request ignores ab_key: one user's requests spread over both arms
        assert {r.predict(image, ab_key="user-7").arm for _ in range(60)} == {"a", "b"}


def test_record_outcome_gives_per_arm_accuracy(image):
    with router_with(experiment()) as r:
        answered = [r.predict(image, ab_key=f"u{i}") for i in range(20)]
        for p in answered[:10]:
            assert r.record_outcome(p.request_id, p.label) is True
        for p in answered[10:15]:
            assert r.record_outcome(p.request_id, (p.class_index + 1) % 10) is True  # wrong, as an index
        assert r.record_outcome(answered[0].request_id, "T-shirt/top") is False  # already reported
        assert r.record_outcome("no-such-request", 0) is False
        arms = r.stats()["experiments"]["arms"]
    assert sum(a["labeled"] for a in arms.values()) == 15 and sum(a["correct"] for a in arms.values()) == 10
    for a in arms.values():
        if a["labeled"]:
            lo, hi = a["accuracy_ci"]
            assert lo <= a["accuracy"] <= hi


def test_flow_answers_carry_the_arm():
    clock = FakeClock()
    req = make_request(clock)
    req.arm = "b"
    out, _ = drive(route(req, clock), [local(0.5), reply()], clock)
    assert out.predictions[0].arm == "b" and out.predictions[0].source == "cloud"
    out, _ = drive(route(make_request(clock), clock), [local(0.95)], clock)
    assert out.predictions[0].arm is None


def test_experiment_counts_survive_a_reload_of_the_same_experiment(image):
    with router_with(experiment()) as r:
        for i in range(6):
            r.predict(image, ab_key=f"u{i}")
        r.reload_policy(r.policy.model_copy(update={"confidence_threshold": 0.5}))
        r.predict(image, ab_key="u0")
        assert sum(a["requests"] for a in r.stats()["experiments"]["arms"].values()) == 7
        renamed = parse_policy({"experiments": experiment(name="next"), "cloud": {"endpoints": []}})
        r.reload_policy(renamed)
        assert sum(a["requests"] for a in r.stats()["experiments"]["arms"].values()) == 0


# ----------------------------------------------------------------------------- the math


def test_wilson_against_published_values():
    # Newcombe (1998a), "Two-sided confidence intervals for the single proportion", example 81/263
    lo, hi = wilson(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    lo, hi = wilson(0, 10)  # same paper: 0/10 -> 0 to 0.2775
    assert lo == pytest.approx(0.0, abs=1e-12) and round(hi, 4) == 0.2775
    assert wilson(10, 10)[1] == pytest.approx(1.0)
    assert wilson(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(
    "counts, interval",
    [  # Newcombe (1998b), "Interval estimation for the difference between independent proportions", method 10
        ((56, 70, 48, 80), (0.0524, 0.3339)),
        ((9, 10, 3, 10), (0.1705, 0.8090)),
        ((5, 56, 0, 29), (-0.0381, 0.1926)),
    ],
)
def test_newcombe_against_published_values(counts, interval):
    d, lo, hi = newcombe(*counts)
    assert (round(lo, 4), round(hi, 4)) == interval


def test_percentiles_nearest_rank():
    assert _percentiles(list(range(1, 101))) == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert _percentiles([]) == {"p50": 0.0, "p95": 0.0, "p99": 0.0}


def _stats(a_correct, a_labeled, b_correct, b_labeled, a_esc=(30, 100), b_esc=(30, 100)) -> dict:
    def arm(correct, labeled, esc, share):
        return {"share": share, "requests": esc[1], "escalated": esc[0], "labeled": labeled, "correct": correct,
                "latency_ms": {"p50": 1.0, "p95": 20.0, "p99": 40.0}}

    return {"name": "t", "key": "caller", "arms": {"a": arm(a_correct, a_labeled, a_esc, 0.5),
                                                   "b": arm(b_correct, b_labeled, b_esc, 0.5)}}


def test_comparison_says_not_yet_significant_then_significant():
    small = compare(_stats(45, 50, 47, 50))
    assert small[0].startswith("b vs a: accuracy +4.0 pt (95% Newcombe interval")
    assert "not yet significant (the interval contains 0; collect more labeled requests)" in small[0]
    assert "escalation share +0.0 pt" in small[1] and "not yet significant" in small[1]
    large = compare(_stats(9000, 10000, 9400, 10000, b_esc=(2000, 10000), a_esc=(3000, 10000)))
    assert large[0].endswith("significant at 95%") and "not yet" not in large[0]
    assert "escalation share -10.0 pt" in large[1] and large[1].endswith("significant at 95%")
    assert "no data yet" in compare(_stats(0, 0, 0, 0))[0]


def test_stats_snapshot_feeds_the_comparison():
    s = ExperimentStats(ExperimentSettings.model_validate(experiment()))
    snap = s.snapshot()
    assert set(snap["arms"]) == {"a", "b"} and snap["arms"]["a"]["accuracy"] is None
    assert compare(snap)[0] == "b vs a: accuracy: no data yet (labeled: 0 vs 0)"


# ----------------------------------------------------------------------------- the command


def test_ab_command_prints_the_comparison(tmp_path, capsys, image):
    with router_with(experiment()) as r:
        for i in range(30):
            p = r.predict(image, ab_key=f"u{i}")
            r.record_outcome(p.request_id, p.label)
        path = tmp_path / "stats.json"
        path.write_text(json.dumps(r.stats()))
    assert cli_main(["ab", "--stats", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("experiment thr-test (assignment by caller; 95% intervals)")
    assert "p50/p95/p99 ms" in out and "b vs a: accuracy" in out and "not yet significant" in out
    # the experiments entry alone works too, and another confidence level
    only = tmp_path / "exp.json"
    only.write_text(json.dumps(json.loads(path.read_text())["experiments"]))
    assert cli_main(["ab", "--stats", str(only), "--confidence", "0.9"]) == 0
    assert "90% Newcombe interval" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not readable JSON"),
    (json.dumps({"requests": 3}), "no experiment in this file"),
])
def test_ab_command_errors_are_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    assert cli_main(["ab", "--stats", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("hybrid-router ab:")
