"""``hybrid-router predict`` and ``--help`` through the installed console entry point."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "router_tools.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_every_command():
    out = _cli("--help")
    assert out.returncode == 0
    for cmd in ("demo", "predict", "serve", "eval", "calibrate", "train"):
        assert cmd in out.stdout


def test_predict_shipped_samples_privately_as_json():
    from router_tools.datasets import SAMPLES_DIR

    out = _cli("predict", "--privacy", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == len(list(SAMPLES_DIR.glob("*.png")) + list(SAMPLES_DIR.glob("*.jpg")))
    assert {r["source"] for r in rows} == {"edge"} and {r["reason"] for r in rows} == {"privacy"}
    assert all(len(r["probabilities"]) == 10 and r["timings"]["total_ms"] > 0 for r in rows)


def test_predict_reports_bad_files_and_keeps_going(tmp_path):
    from router_tools.datasets import SAMPLES_DIR

    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"hello")
    good = sorted(SAMPLES_DIR.glob("*.png"))[0]
    out = _cli("predict", "--privacy", str(bad), str(good), str(tmp_path / "missing.png"))
    assert out.returncode == 1
    # answers on stdout, one line per failed image on stderr (named, with the typed error)
    lines, errors = out.stdout.splitlines(), out.stderr.splitlines()
    assert len(lines) == 1 and "privacy" in lines[0]
    assert len(errors) == 2 and all(e.startswith("hybrid-router predict: ") and "InvalidInput" in e for e in errors)
    assert "not-an-image.png" in errors[0] and "missing.png" in errors[1] and "Traceback" not in out.stderr
