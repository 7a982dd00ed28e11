"""bench/cloud_throughput.py still runs end to end (tiny runs; no speed is asserted)."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "cloud_throughput.py"
KSERVE_PYTHON = BENCH.parent / ".venvs" / "kserve" / "bin" / "python"

pytestmark = [pytest.mark.timeout(180), pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed")]


def test_bench_smoke(tmp_path, capsys):
    main = runpy.run_path(str(BENCH))["main"]
    out = tmp_path / "bench.json"
    assert main(["--targets", "ac", "--duration", "1", "--warmup", "0", "--rounds", "1", "--connections", "1,4",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["targets"]) == {"a", "c"}
    for key in ("a", "c"):
        rounds = r["targets"][key]["rounds"]
        assert sorted(m["connections"] for m in rounds) == [1, 4]
        for m in rounds:
            assert m["requests"] > 0 and m["p50_ms"] > 0 and not m["errors"], m
    assert r["targets"]["a"]["server_stats"]["images"] > 0
    (ceiling,) = r["ceiling_images_per_s"]
    assert set(r["ceiling_images_per_cpu_s"][0]) == {"1", "32"}
    assert set(ceiling) == {"1", "32"}
    assert set(r["ratios"]) >= {"a_over_c@1", "a_over_c@4", "a_over_ceiling@4", "a_over_ceiling_per_cpu@4"}
    printed = capsys.readouterr().out
    assert "(a) / naive FastAPI" in printed and "ONNX batch ceiling" in printed and "load generator: wrk" in printed


@pytest.mark.skipif(not KSERVE_PYTHON.exists(), reason="KServe environment not created (the bench creates it on first run)")
def test_bench_kserve_peer_answers_like_the_service(tmp_path):
    """KServe serves the same model and answers the same body with the same probabilities (the bench checks)."""
    main = runpy.run_path(str(BENCH))["main"]
    out = tmp_path / "bench.json"
    assert main(["--targets", "ak", "--duration", "1", "--warmup", "0", "--rounds", "1", "--connections", "2",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["targets"]["k"]["note"] == ""  # not "WRONG ANSWER" nor "unavailable"
    (m,) = r["targets"]["k"]["rounds"]
    assert m["requests"] > 0 and not m["errors"], m
    assert "a_over_k@2" in r["ratios"]


def test_bench_refuses_bad_levels(capsys):
    main = runpy.run_path(str(BENCH))["main"]
    with pytest.raises(SystemExit) as exc:
        main(["--connections", "1,x"])
    assert exc.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err
