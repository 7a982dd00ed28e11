"""Every ``hybrid-router`` command reports the project's typed errors -- a policy typo, a value out
of range, an unknown mode, a missing file, a missing plot extra -- as one line naming the file and
the field, exit status 2, no traceback; and nothing is half-written.

Run through the real entry point in a subprocess, as a user meets them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from router.policy import DEFAULT_POLICY_PATH

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)


def cli(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("HYBRID_ROUTER_POLICY", "HYBRID_ROUTER_DEBUG")}
    full.update({"PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run([sys.executable, "-m", "router_tools.cli", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout)


def policy_with(tmp_path: Path, old: str, new: str) -> Path:
    text = DEFAULT_POLICY_PATH.read_text()
    assert text.count(old) == 1
    path = tmp_path / "policy.yaml"
    path.write_text(text.replace(old, new))
    return path


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, proc.stderr
    return err


CASES = [
    ("typo", "confidence_threshold:", "confidence_treshold:",
     "{path}: confidence_treshold: extra field not permitted — did you mean confidence_threshold?"),
    ("nested typo", "    failure_threshold:", "    failure_treshold:",
     "{path}: cloud.breaker.failure_treshold: extra field not permitted — did you mean failure_threshold?"),
    ("threshold > 1", "confidence_threshold: 0.", "confidence_threshold: 1.",
     "{path}: confidence_threshold: Input should be less than or equal to 1"),
    ("unknown mode", "mode: prefer_edge", "mode: edge_first",
     "{path}: mode: Input should be 'prefer_edge', 'edge_only', 'prefer_cloud' or 'cloud_only'"),
]


COMMANDS = [["predict", "--privacy"], ["calibrate", "--target-escalation", "0.2"], ["eval", "--limit", "5"], ["demo"]]


# each command meets the typo; the other mistakes go to one command each (the handling is one place: cli.main)
@pytest.mark.parametrize("command, case", [(c, CASES[0]) for c in COMMANDS] + list(zip(COMMANDS[1:], CASES[1:])),
                         ids=lambda x: x[0])
def test_policy_mistakes_are_one_line_naming_file_and_field(tmp_path, command, case):
    _, old, new, expected = case
    path = policy_with(tmp_path, old, new)
    err = one_line_error(cli(*command, "--config", str(path)))
    assert err == f"hybrid-router {command[0]}: " + expected.format(path=path)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_missing_policy_file(tmp_path, command):
    missing = tmp_path / "nope.yaml"
    err = one_line_error(cli(*command, "--config", str(missing)))
    assert err == f"hybrid-router {command[0]}: {missing}: policy file not found"


def test_debug_variable_gives_the_traceback(tmp_path):
    proc = cli("predict", "--config", str(tmp_path / "nope.yaml"), env={"HYBRID_ROUTER_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_missing_data_and_manifest_files(tmp_path):
    err = one_line_error(cli("calibrate", "--target-escalation", "0.2", "--data", str(tmp_path / "none")))
    assert f"{tmp_path / 'none'}: no such folder or CSV file" in err
    for command in (["eval", "--limit", "5"], ["demo"]):
        err = one_line_error(cli(*command, "--edge-manifest", str(tmp_path / "e.json")))
        assert err == f"hybrid-router {command[0]}: {tmp_path / 'e.json'}: --edge-manifest: manifest file not found"


# ----------------------------------------------------------------------------- plots without matplotlib


@pytest.fixture()
def no_matplotlib(tmp_path):
    """``PYTHONPATH`` with a ``matplotlib`` package that refuses to import, as in an install without the extra."""
    stub = tmp_path / "stub" / "matplotlib"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ModuleNotFoundError('No module named matplotlib', name='matplotlib')\n")
    return {"PYTHONPATH": f"{stub.parent}{os.pathsep}{ROOT}"}


PLOT_HINT = "plots need matplotlib, which is not installed: pip install 'hybrid-edge-router-tools[plot]'"


def test_calibrate_plot_without_matplotlib_writes_nothing(tmp_path, no_matplotlib):
    policy = tmp_path / "policy.yaml"
    policy.write_text(DEFAULT_POLICY_PATH.read_text())
    before = policy.read_text()
    outputs = [tmp_path / "curve.png", tmp_path / "out.json", tmp_path / "edge"]
    err = one_line_error(cli("calibrate", "--target-escalation", "0.2", "--limit", "200", "--write", str(policy),
                             "--refit-temperature", "--edge-out", str(outputs[2]), "--plot", str(outputs[0]),
                             "--json", str(outputs[1]), env=no_matplotlib))
    assert err == f"hybrid-router calibrate: {PLOT_HINT}"
    assert policy.read_text() == before
    assert not [p for p in outputs if p.exists()]


def test_eval_report_without_matplotlib_writes_nothing(tmp_path, no_matplotlib):
    outputs = [tmp_path / "r.md", tmp_path / "r-curve.png", tmp_path / "r.json"]
    err = one_line_error(cli("eval", "--limit", "20", "--report", str(outputs[0]), "--json", str(outputs[2]),
                             env=no_matplotlib))
    assert err == f"hybrid-router eval: {PLOT_HINT}"
    assert not [p for p in outputs if p.exists()]
