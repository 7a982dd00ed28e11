"""edge_model.heap: glibc's calls, made where glibc is, no-ops elsewhere. Their effect on the
service's memory after a flood is measured by bench/overload.py (BENCHMARKS.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edge_model import heap


@pytest.mark.skipif(heap._MALLOPT is None, reason="glibc only")
def test_glibc_accepts_the_fixed_trim_threshold():
    # Process-wide: in a child. mallopt returns 1 when glibc took the setting.
    code = "from edge_model import heap; print(heap.fix_trim_threshold(), heap.trim())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "True"]


def test_without_glibc_both_calls_are_no_ops(monkeypatch):
    monkeypatch.setattr(heap, "_MALLOPT", None)
    monkeypatch.setattr(heap, "_MALLOC_TRIM", None)
    assert heap.fix_trim_threshold() is False and heap.trim() is False
