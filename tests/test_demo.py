"""``hybrid-router demo`` end to end in a subprocess, in reduced form, as CI runs it (a pipe,
not a terminal): exit 0, every scenario shown, nothing left behind."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(150)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_runs_every_scenario_and_leaves_nothing_behind():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HYBRID_ROUTER_POLICY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "router_tools.cli", "demo", "--limit", "40", "--scenario-limit", "12"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{proc.stderr[-3000:]}"

    sections = ["1. Streaming shipped test images", "2. Simulated WAN (wan40: 40 ms round trip)",
                "3. Cloud outage mid-stream", "4. Privacy mode (privacy=True)", "5. Recovery", "Summary"]
    positions = [out.find(s) for s in sections]
    assert -1 not in positions and positions == sorted(positions), positions
    body = {s: out[p:q] for s, p, q in zip(sections, positions, positions[1:] + [len(out)])}

    # plain lines on a pipe: one per answer, with the table's columns
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s{2}(.{12}) (.{12}) (edge|cloud)\s+(\S+).*?([\d.]+)\s+([✓✗])$", out, re.M)
    assert len(rows) >= 40 + 4 * 12
    assert "\x1b[" not in out  # no terminal control sequences in a log

    stream = body[sections[0]]
    assert "cloud  low_confidence" in stream and "edge   confident" in stream
    assert "summary: 40 answered" in stream
    assert "cloud  low_confidence" in body[sections[1]]

    outage = body[sections[2]]
    assert ">>> cloud service killed (SIGKILL" in outage
    assert re.search(r"\(fallback\)", outage)
    n = int(re.search(r"summary: (\d+) answered", outage).group(1))
    assert re.search(rf"within the 150 ms deadline: \d+/{n};", outage)
    # every answer within its deadline, plus scheduling noise on a loaded machine (a hang bound)
    assert float(re.search(r"max ([\d.]+) ms", outage).group(1)) <= 150 + 250
    assert "breaker local open" in outage

    privacy = body[sections[3]]
    assert "cloud calls 0, bytes sent 0, new connections 0" in privacy
    assert "nothing left the device" in privacy
    assert "cloud  " not in privacy.split("summary:")[0]

    recovery = body[sections[4]]
    assert ">>> cloud service back" in out
    assert "cloud  low_confidence" in recovery and "breaker local closed" in recovery

    # nothing left behind: every service process it started is gone, its ports refuse connections
    pids = {int(p) for p in re.findall(r"\(pid (\d+)", out)}
    assert len(pids) == 2  # the first service and its restart
    assert not [p for p in pids if alive(p)]
    m = re.search(r"clean exit: cloud service \(pid \d+\) stopped, ports (\d+) and (\d+) closed", out)
    assert m
    for port in map(int, m.groups()):
        with socket.socket() as s:
            s.settimeout(1.0)
            assert s.connect_ex(("127.0.0.1", port)) != 0
