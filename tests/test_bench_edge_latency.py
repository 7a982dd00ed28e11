"""bench/edge_latency.py still runs end to end (a tiny run; no speed is asserted)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "edge_latency.py"


def test_bench_smoke(tmp_path, capsys):
    main = runpy.run_path(str(BENCH))["main"]
    out = tmp_path / "bench.json"
    args = ["--rounds", "2", "--per-round", "3", "--images", "4", "--accuracy-limit", "200", "--no-cloud-accuracy"]
    assert main([*args, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["latency"]) == {"int8", "fp32", "int8-floor", "fp32-floor"}
    assert all(s["calls"] == 6 and s["median_us"] > 0 for s in r["latency"].values())
    assert r["accuracy"]["int8"]["images"] == 200 and 0 <= r["accuracy"]["int8"]["accuracy"] <= 1
    assert r["sizes"]["int8_bytes"] > 0 and r["flops"]["edge"] > 0
    printed = capsys.readouterr().out
    assert "int8 / fp32" in printed and "int8 / int8-floor" in printed
