"""Deadlines hold when the cloud never answers, from the very first requests of a fresh process.

A real loopback server accepts and stays silent; a fresh interpreter (bench/deadlines.py's
worker) fires 8 sync ``predict`` threads and 8 ``apredict`` tasks at a new router together.
Every answer must arrive before deadline + 25 ms -- a hang bound, not a speed claim (a router
that waited on the network would be a whole attempt late) -- plus the scheduler noise the worker
measured alongside (on a loaded machine a runnable thread can wait that long for a CPU).
The overrun distribution is reported by ``bench/deadlines.py``.
"""

from __future__ import annotations

import runpy
from pathlib import Path

BENCH = runpy.run_path(str(Path(__file__).resolve().parent.parent / "bench" / "deadlines.py"))
HANG_MS = 25.0


def test_first_and_later_waves_answer_by_the_deadline_against_a_silent_server():
    with BENCH["SilentServer"]() as server:
        r = BENCH["run_worker"](server.url, n_sync=8, n_async=8, deadline_ms=50.0, waves=3)
    for phase in ("first", "steady"):
        wave = r[phase]
        assert set(wave["reasons"]) <= {"cloud_error", "budget"}  # edge answers: the cloud never did
        bound = HANG_MS + wave["noise_ms"]
        assert max(wave["sync"]) < bound, (phase, wave)
        assert max(wave["async"]) < bound, (phase, wave)
    assert server.held  # the router really connected and waited
