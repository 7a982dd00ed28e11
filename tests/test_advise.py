"""``hybrid-router advise``: measurements against the real service on loopback, the checklist's
verdicts (pure, on given measurements), and the policy patch it writes."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from router.policy import load_policy
from router_tools.cli import main
from router_tools.commands import advise

NUMBER = re.compile(r"\d+(\.\d+)?\s*(ms|MB|%|pt|images/s|/day|updates/month|requests/day)?")


def test_advise_measures_the_real_service_and_writes_a_valid_policy(tmp_path, capsys):
    policy = tmp_path / "policy.yaml"
    policy.write_text("# operator's file\nmode: edge_only  # mine\nconfidence_threshold: 0.5\n")
    out = tmp_path / "advice.json"
    # no --cloud-url: advise starts the real service on loopback itself
    assert main(["advise", "--limit", "300", "--rounds", "20", "--requests-per-day", "50000",
                 "--price-per-1k-calls", "0.4", "--write", str(policy), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    m = json.loads(out.read_text())["measured"]
    e, c, d = m["edge"], m["cloud"], m["data"]
    assert e["size_mb"] > 0 and e["load_ms"] > 0 and e["p95_ms"] >= e["p50_ms"] > 0 and e["calls"] == 20
    assert c["local"] and c["calls"] == 20 and c["p95_ms"] >= c["p50_ms"] > 0 and c["throughput_ips"] > 0
    assert d["n"] == 300 and 0.5 < d["edge_accuracy"] <= 1 and 0.5 < d["cloud_accuracy"] <= 1
    assert [p["escalation"] for p in d["curve"]] == sorted(p["escalation"] for p in d["curve"])

    # every checklist line and every line of the recommendation cites a figure
    checklist = text.split("checklist\n")[1].split("recommendation:")[0].strip().splitlines()
    assert len(checklist) == 7
    why = [line for line in text.split("recommendation:")[1].split("policy patch:")[0].splitlines() if line.startswith("  - ")]
    assert why
    for line in checklist[:1] + checklist[3:6] + why:
        assert re.search(r"\d", line), line
    assert f"edge p95 {e['p95_ms']:.2f} ms" in checklist[0] and f"{e['size_mb']:.2f} MB" in checklist[3]
    assert f"cloud model {c['size_mb']:.2f} MB" in checklist[3]
    assert "per 1k requests" in text and "cost" in text

    # the patch it wrote: the operator's comments stay, the policy loads, the values are the advice
    advice = json.loads(out.read_text())
    loaded = load_policy(policy)
    assert loaded.mode.value == advice["patch"]["mode"]
    written = policy.read_text()
    assert written.startswith("# operator's file\n") and "  # mine" in written and "# Chosen by `hybrid-router advise`" in written
    if "confidence_threshold" in advice["patch"]:
        assert loaded.confidence_threshold == advice["patch"]["confidence_threshold"]
    if "default_deadline_ms" in advice["patch"]:
        assert loaded.default_deadline_ms == advice["patch"]["default_deadline_ms"]


# ----------------------------------------------------------------------------- the verdicts (pure)


MEASURED = {
    "edge": {"size_mb": 0.02, "load_ms": 13.0, "rss_mb": 10.0, "p50_ms": 0.2, "p95_ms": 0.5},
    "cloud": {"p50_ms": 20.0, "p95_ms": 40.0},
    "data": {"name": "validation", "n": 5000, "edge_accuracy": 0.9156, "cloud_accuracy": 0.9492,
             "hybrid": {"threshold": 0.82, "escalation": 0.18, "accuracy": 0.9442}},
}


def flags(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    advise.add_arguments(p)
    return p.parse_args(list(argv))


def test_privacy_hard_is_edge_only_with_privacy_mode():
    rec = advise.recommend(MEASURED, flags("--privacy-hard", "--updates-per-month", "10", "--early-development"))
    assert rec["verdict"] == "edge-only" and rec["changes"] == {("mode",): "edge_only", ("privacy_mode",): True}
    assert rec["cost_per_1k"] == 0.0


def test_server_leaning_answers_give_cloud_only_and_prefer_cloud_when_offline():
    argv = ["--updates-per-month", "8", "--early-development", "--requests-per-day", "1000", "--price-per-1k-calls", "2"]
    rec = advise.recommend(MEASURED, flags(*argv))
    assert rec["verdict"] == "cloud-only" and rec["mode"] == "cloud_only" and rec["server"] >= rec["device"] + 2
    assert rec["cost_per_1k"] == pytest.approx(2.0)
    offline = advise.recommend(MEASURED, flags(*argv, "--offline"))
    assert offline["mode"] in ("prefer_cloud", "prefer_edge")  # offline never gives a cloud-only mode


def test_device_leaning_answers_keep_the_cascade_when_the_edge_alone_is_too_inaccurate():
    argv = ["--offline", "--requests-per-day", "10000000", "--assume-network-ms", "150"]
    rec = advise.recommend(MEASURED, flags(*argv))  # latency, offline, size, volume: all device
    assert rec["device"] >= 4 and rec["verdict"] == "hybrid" and rec["threshold"] == 0.82
    assert any("3.36 pt below the cloud" in line for line in rec["why"])
    assert rec["deadline_ms"] == 100.0  # 0.5 + 2 x 190 + 3 ms > the 100 ms target: capped
    lenient = advise.recommend(MEASURED, flags(*argv, "--max-accuracy-drop", "5"))
    assert lenient["verdict"] == "edge-only" and lenient["deadline_ms"] is None


def test_split_answers_give_the_hybrid_with_cost_and_latency_per_1k():
    rec = advise.recommend(MEASURED, flags("--requests-per-day", "50000", "--price-per-1k-calls", "0.4"))
    assert rec["verdict"] == "hybrid" and rec["mode"] == "prefer_edge"
    assert rec["cost_per_1k"] == pytest.approx(0.18 * 0.4)
    assert rec["mean_latency_ms"] == pytest.approx(0.2 + 0.18 * 20.0)
    assert rec["deadline_ms"] == 90.0  # 0.5 + 2 x 40 + 3 = 83.5, rounded up to 10 ms
    assert advise.patch_yaml(rec["changes"]) == 'mode: "prefer_edge"\nconfidence_threshold: 0.82\ndefault_deadline_ms: 90.0\n'
