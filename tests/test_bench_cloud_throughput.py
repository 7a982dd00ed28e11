"""bench/cloud_throughput.py still runs end to end (a tiny run of two targets; no speed is asserted)."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "cloud_throughput.py"

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed")]


def test_bench_smoke(tmp_path, capsys):
    main = runpy.run_path(str(BENCH))["main"]
    out = tmp_path / "bench.json"
    assert main(["--targets", "ac", "--duration", "1", "--warmup", "0", "--connections", "4", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["targets"]) == {"a", "c"}
    for key in ("a", "c"):
        (m,) = r["targets"][key]["rounds"]
        assert m["requests"] > 0 and m["p50_ms"] > 0 and not m["errors"], m
    assert r["targets"]["a"]["server_stats"]["images"] > 0
    assert set(r["ceiling_images_per_s"]) == {"1", "32"}
    printed = capsys.readouterr().out
    assert "(a) / (c)" in printed and "raw ONNX Runtime ceiling" in printed and "load generator: wrk" in printed
