"""``hybrid-router demo`` end to end in a subprocess, in reduced form, as CI runs it (a pipe,
not a terminal): exit 0, every stage shows the condition it is about, the log is compact, and
nothing is left behind.

The demo's stages end on what they observe (or on a time bound they report), never on an image
count, so this holds however fast the machine answers.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(200)

DEADLINE_MS = 1000
SECTIONS = ["1. Streaming shipped test images", "2. Simulated WAN (wan40: 40 ms round trip)",
            "3. Cloud outage mid-stream", "4. Privacy mode (privacy=True)", "5. Recovery",
            "6. Progressive answers (predict_progressive)", "7. Model update (signed release channel)", "Summary"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def demo():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HYBRID_ROUTER_POLICY", None)
    # The time bound per stage only bounds a hang: every stage is expected to see its condition. A
    # generous deadline keeps a loaded machine's slow escalations from being cut off as cloud errors
    # (which would keep the breaker open and hide what the stages are about).
    proc = subprocess.run(
        [sys.executable, "-m", "router_tools.cli", "demo", "--limit", "40", "--scenario-limit", "12",
         "--stage-seconds", "25", "--deadline-ms", str(DEADLINE_MS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    assert "Task was destroyed" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    out = proc.stdout
    positions = [out.find(s) for s in SECTIONS]
    assert -1 not in positions and positions == sorted(positions), (positions, out)
    body = {s: out[p:q] for s, p, q in zip(SECTIONS, positions, positions[1:] + [len(out)])}
    return out, body


def test_every_stage_reports_its_condition_seen(demo):
    out, body = demo
    for s in SECTIONS[:6]:
        assert re.search(r"^  seen after \d+ images \([\d.]+ s\): ", body[s], re.M), (s, body[s])
        assert "NOT seen" not in body[s], body[s]


def test_stream_and_wan_show_edge_answers_and_escalations(demo):
    _, body = demo
    stream, wan = body[SECTIONS[0]], body[SECTIONS[1]]
    assert "first edge/confident" in stream and "first cloud/low_confidence" in stream
    assert re.search(r"^  40 answered,", stream, re.M)
    assert "first cloud/low_confidence" in wan


def test_outage_answers_every_request_locally_and_opens_the_breaker(demo):
    _, body = demo
    outage = body[SECTIONS[2]]
    assert ">>> cloud service killed (SIGKILL" in outage
    assert re.search(r"\(fallback: (unreachable|timeout)\)", outage)  # why the escalation failed
    assert "breaker opened" in outage and "breaker local open" in outage
    n = int(re.search(r"^  (\d+) answered", outage, re.M).group(1))
    assert re.search(rf"in {DEADLINE_MS} ms: \d+/{n}$", outage, re.M)


def test_privacy_mode_sends_nothing(demo):
    _, body = demo
    privacy = body[SECTIONS[3]]
    assert "cloud calls 0, 0 B sent, new connections 0" in privacy
    assert "nothing left the device" in privacy
    assert "first cloud/" not in privacy and "escalated 0," in privacy


def test_recovery_shows_the_half_open_trial_and_escalations_resuming(demo):
    out, body = demo
    recovery = body[SECTIONS[4]]
    assert ">>> cloud service back" in out
    trial = re.search(r"half-open trial: cloud answered in [\d.]+ ms -> breaker closed", recovery)
    assert trial, recovery
    assert "first cloud/low_confidence" in recovery
    assert int(re.search(r"escalated (\d+),", recovery).group(1)) >= 2  # the trial and one after it
    assert "breaker local closed" in recovery[trial.end():]


def test_progressive_stage_shows_a_refinement_and_a_late_one_standing(demo):
    _, body = demo
    progressive = body[SECTIONS[5]]
    assert re.search(r"provisional [\d.]+ ms -> cloud/low_confidence [\d.]+ ms", progressive), progressive
    assert ">>> proxy adds" in progressive
    assert re.search(r"provisional [\d.]+ ms -> edge/refinement_late [\d.]+ ms", progressive), progressive
    m = re.search(r"^  (\d+) answered, (\d+) refined: .*; (\d+) cloud, (\d+) late", progressive, re.M)
    assert m and int(m.group(3)) >= 1 and int(m.group(4)) >= 1, progressive
    n = int(m.group(1))
    assert re.search(rf"final answer in {DEADLINE_MS} ms: \d+/{n};", progressive, re.M)


def test_log_is_compact_and_fits_80_columns(demo):
    out, body = demo
    lines = out.splitlines()
    assert len(lines) < 110, len(lines)  # seven stages, about a dozen lines each, and the summary
    assert max(map(len, lines)) <= 80
    assert "\x1b[" not in out  # no terminal control sequences in a log
    table = body["Summary"]
    for short in ("stream (loopback)", "WAN (40 ms RTT)", "cloud outage", "privacy mode", "recovery", "progressive",
                  "model update"):
        assert re.search(rf"^{re.escape(short)}\s+\d+\s+[\d.]+%", table, re.M), table


def test_nothing_is_left_behind(demo):
    out, _ = demo
    pids = {int(p) for p in re.findall(r"\(pid (\d+)", out)}
    assert len(pids) == 2  # the first service and its restart
    assert not [p for p in pids if alive(p)]
    m = re.search(r"clean exit: service \(pid \d+\) stopped, ports (\d+) and (\d+) closed", out)
    assert m
    for port in map(int, m.groups()):
        with socket.socket() as s:
            s.settimeout(1.0)
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_model_update_stage_rolls_out_swaps_live_and_rolls_a_bad_release_back(demo):
    pytest.importorskip("tuf", reason="the updates extra is not installed")
    _, body = demo
    update = body[SECTIONS[6]]
    assert "skipped" not in update, update
    assert re.search(r"^  seen in [\d.]+ s: staged rollout, live swap, bad release rolled back$", update, re.M), update
    # Staged rollout: the share of a simulated fleet grows, and the router takes 1.1.0 once its cohort is in.
    steps = re.findall(r"^  rollout +(\d+)%: +(\d+)/1000 devices in cohort; router (in|out): answers (\S+)$", update, re.M)
    assert [s[0] for s in steps] == ["5", "25", "100"], update
    counts = [int(s[1]) for s in steps]
    assert 20 <= counts[0] <= 80 and 200 <= counts[1] <= 300 and counts[2] == 1000
    m = re.search(r"cohort position ([\d.]+), answering (\S+)$", update, re.M)
    before, position = m.group(2), float(m.group(1))
    assert 0.05 <= position < 0.25
    assert steps[0][2:] == ("out", before) and steps[1][2:] == ("in", "1.1.0") and steps[2][2:] == ("in", "1.1.0")
    # The live swap: no failed or late answer, both versions answered.
    m = re.search(r"^  3 threads predicting meanwhile: (\d+) answers, (\d+) failed, (\d+) late \(> (\d+) ms\)$",
                  update, re.M)
    assert m and int(m.group(1)) >= 60 and m.group(2) == m.group(3) == "0" and int(m.group(4)) == DEADLINE_MS, update
    assert f"edge versions in those answers: {before} -> 1.1.0" in update
    assert re.search(r"update time: check saw 1.1.0 -> swapped in \d+ ms", update)
    # The bad release: installed (it verifies and validates), caught by its audits, rolled back.
    assert "bad release 1.1.1 (outputs permuted; signed, golden set passes): installed" in update
    m = re.search(r"of 1.1.1: (\d+)/(\d+) agree\n.*upper bound ([\d.]+) < agreement_floor 0.8", update)
    assert m and int(m.group(2)) >= 20 and float(m.group(3)) < 0.8, update
    assert "-> agreement alarm rolled 1.1.1 back to 1.1.0; answering now: 1.1.0" in update
    assert re.search(r"since the bad release: \d+ answers, 0 failed, 0 late; 1.1.1 now refused", update), update
