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


class DripServer:
    """A real loopback server that answers every request with a status line and then one header
    byte every ``every_s`` for ever: each socket read succeeds in time, so only a deadline on the
    whole exchange (not per read) ends the attempt."""

    def __init__(self, every_s: float = 0.005) -> None:
        import socket
        import threading

        self.every_s = every_s
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self.served = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn) -> None:
        try:
            conn.recv(65536)
            self.served += 1
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Drip: ")
            while not self._stop.wait(self.every_s):
                conn.sendall(b"a")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def test_a_server_dripping_bytes_cannot_hold_an_attempt_past_its_deadline():
    """Sync predict's attempts run in the caller's thread with every socket operation cut to the
    attempt's absolute end (not httpx's per-read timeout); apredict's under asyncio.timeout."""
    import asyncio
    import time

    import numpy as np

    from router import Router
    from router.policy import parse_policy

    server = DripServer()
    try:
        policy = parse_policy({"confidence_threshold": 1.0, "decision_log": False,
                               "cloud": {"endpoints": [{"url": server.url, "initial_latency_ms": 1}],
                                         "retry": {"max_attempts": 1}, "health_probe_interval_s": 0}})
        img = np.zeros((28, 28), np.uint8)
        with Router(policy) as router:
            for _ in range(3):
                t0 = time.monotonic()
                p = router.predict(img, deadline_ms=150)
                assert time.monotonic() - t0 < 0.150 + HANG_MS / 1000.0
                assert p.source == "edge" and p.reason.value == "cloud_error"

            async def one():
                t0 = time.monotonic()
                p = await router.apredict(img, deadline_ms=150)
                return time.monotonic() - t0, p

            took, p = asyncio.run(one())
            assert took < 0.150 + HANG_MS / 1000.0
            assert p.source == "edge" and p.reason.value == "cloud_error"
        assert server.served >= 1  # the attempts really reached the server and were dripped on
    finally:
        server.close()


class FullBacklogServer:
    """A real loopback listener whose accept queue is full and never drained: the kernel drops
    new SYNs, so a connect to it neither succeeds nor fails -- it hangs until the client gives up."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.fillers = []
        for _ in range(4):  # more than the queue holds; the extra ones just wait themselves
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(self.sock.getsockname())
            self.fillers.append(s)

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.sock.close()


def test_connecting_is_bounded_by_connect_timeout_not_the_attempt_sync_and_async():
    """connect_timeout_ms bounds a connect that hangs, for predict and apredict alike: the attempt
    (per_try 3 s) fails in ~0.1 s and the edge answers long before the 5 s deadline."""
    import asyncio
    import time

    import numpy as np

    from router import Router
    from router.policy import parse_policy

    server = FullBacklogServer()
    try:
        policy = parse_policy({"confidence_threshold": 1.0, "decision_log": False,
                               "cloud": {"endpoints": [{"url": server.url, "initial_latency_ms": 1}],
                                         "connect_timeout_ms": 100, "per_try_timeout_ms": 3000,
                                         "retry": {"max_attempts": 1}, "health_probe_interval_s": 0,
                                         "breaker": {"failure_threshold": 100}}})
        img = np.zeros((28, 28), np.uint8)
        with Router(policy) as router:
            t0 = time.monotonic()
            p = router.predict(img, deadline_ms=5000)
            took_sync = time.monotonic() - t0

            async def one():
                t0 = time.monotonic()
                return await router.apredict(img, deadline_ms=5000), time.monotonic() - t0

            q, took_async = asyncio.run(one())
        for answer, took in ((p, took_sync), (q, took_async)):
            assert answer.source == "edge" and answer.reason.value == "cloud_error", answer
            assert answer.cloud_failure.category == "timeout" and "Connect" in answer.cloud_failure.message
            assert took < 1.5, took  # a hang bound: bounded by the attempt it would take 3 s
    finally:
        server.close()


import math  # noqa: E402

import pytest  # noqa: E402


@pytest.mark.parametrize("left_ms", [0.2, 0.999, 1.0, 1.0004, 1.7, 12.0, 12.3, 49.9999, 95.0, 1000.0])
def test_a_socket_wait_cut_to_the_attempt_end_wakes_by_that_end_despite_polls_rounding_up(left_ms):
    """CPython rounds a socket timeout up to whole milliseconds for poll(): the timeout handed to
    the socket, rounded so, lands at or before the end (or, under a millisecond, poll's shortest
    wait: at most 1 ms after it)."""
    from router.cloud import _poll_timeout

    left = left_ms / 1000.0
    t = _poll_timeout(left)
    assert t > 0
    # socketmodule.c: seconds -> nanoseconds (rounded up), then -> milliseconds (rounded up)
    waits_ms = math.ceil(math.ceil(t * 1e9) / 1e6)
    if left_ms >= 1.0:
        assert waits_ms <= left_ms and left_ms - waits_ms < 1.0
    else:
        assert waits_ms == 1


def test_every_sync_socket_operation_gets_the_rounded_timeout():
    import time

    from router import cloud

    for extra_ms in (0.3, 7.77, 12.3, 30.0):
        before = time.monotonic()
        cloud._deadline.at = before + extra_ms / 1000.0
        try:
            t = cloud._left(None)
            assert before + math.ceil(math.ceil(t * 1e9) / 1e6) / 1000.0 <= cloud._deadline.at + (extra_ms < 1) * 1e-3
            assert cloud._left(0.002) == 0.002 or extra_ms < 2  # an operation's own shorter timeout stands
        finally:
            cloud._deadline.at = None


def test_a_failed_escalation_leaves_nothing_for_the_cycle_collector():
    """The attempt's error is returned without its traceback: kept, the error, the frame that
    caught it and that frame's locals (the request's body and arrays) formed a cycle per failed
    attempt, freed only by the collector's pauses. With the collector off, nothing of a failed
    sync attempt may be left unreachable."""
    import gc
    import types

    import numpy as np

    from router import Router
    from router.errors import CloudError
    from router.policy import parse_policy

    img = np.zeros((28, 28), np.uint8)
    with BENCH["SilentServer"]() as server, Router(parse_policy({
            "confidence_threshold": 1.0, "decision_log": False, "reload_check_interval_s": 0,
            "cloud": {"endpoints": [{"url": server.url}], "retry": {"max_attempts": 1},
                      "health_probe_interval_s": 0}})) as router:
        router.predict(img, deadline_ms=40)  # one-off set-up outside the count
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                assert router.predict(img, deadline_ms=40).reason.value == "cloud_error"
            gc.collect()
            ours = [o for o in gc.garbage if isinstance(o, CloudError)
                    or (isinstance(o, types.FrameType) and o.f_code.co_filename.endswith(("router/cloud.py", "router/api.py")))]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert ours == [], f"{len(ours)} objects of failed attempts were left to the cycle collector"
