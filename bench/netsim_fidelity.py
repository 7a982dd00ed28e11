"""How faithful is the simulated network? Round trips of a small message, and bulk throughput,
measured side by side: direct to a stdlib echo server vs through ``NetworkProxy`` with the named
profiles.

    .venv/bin/python bench/netsim_fidelity.py             # ~5 s
    .venv/bin/python bench/netsim_fidelity.py --rounds 60 --json out.json

Reported per variant: median / p95 / max round trip (ms), the configured RTT, the proxy's own
overhead (median minus configured RTT minus the direct median), and loss-stalled chunks.
``rttN`` variants have no jitter, so their overhead is the simulation error; ``rttN/stock`` run
the same proxy on the stock asyncio loop, whose timers round up to whole milliseconds.
Rounds interleave the variants (one echo each per round, in a fresh random order) so drift hits
all alike. Benchmarks are not tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import socketserver
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from router_tools.netsim import PROFILES, NetworkProfile, NetworkProxy, profile_from_args  # noqa: E402


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(1 << 20):
                self.request.sendall(data)
        except OSError:
            pass


def _echo_server() -> socketserver.ThreadingTCPServer:
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


def _connect(addr: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(addr, timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _echo(s: socket.socket, payload: bytes) -> float:
    t0 = time.perf_counter()
    s.sendall(payload)
    got = 0
    while got < len(payload):
        got += len(s.recv(1 << 20))
    return (time.perf_counter() - t0) * 1000.0


def _throughput(addr: tuple[str, int], size: int) -> float:
    """MB/s of an echo of ``size`` bytes (send and receive overlapped)."""
    with _connect(addr) as s:
        t0 = time.perf_counter()
        sender = threading.Thread(target=s.sendall, args=(b"\0" * size,))
        sender.start()
        got = 0
        while got < size:
            got += len(s.recv(1 << 20))
        sender.join()
        return size / (time.perf_counter() - t0) / 1e6


def _profile(name: str) -> NetworkProfile:
    base = name.removesuffix("/stock")
    if base.startswith("rtt"):
        return profile_from_args(rtt_ms=float(base[3:]))
    return PROFILES[base]


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--profiles", default="loopback,rtt1,rtt1/stock,rtt10,rtt10/stock,rtt40,rtt40/stock,wifi,wan40,4g",
                    help="named profiles and/or rttN (N ms, no jitter); '/stock' = stock event-loop timers")
    ap.add_argument("--payload", type=int, default=512, help="bytes per echo (a small request)")
    ap.add_argument("--bulk-mb", type=float, default=4.0, help="bulk echo size for throughput")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    srv = _echo_server()
    names = [n.strip() for n in args.profiles.split(",") if n.strip()]
    profiles = {n: _profile(n) for n in names}
    proxies = {n: NetworkProxy(srv.server_address, profiles[n], seed=1,
                               fine_timers=not n.endswith("/stock")).start() for n in names}
    try:
        socks = {"direct": _connect(srv.server_address)}
        socks.update({n: _connect(p.address) for n, p in proxies.items()})
        payload = b"x" * args.payload
        for s in socks.values():
            _echo(s, payload)  # warm up (and pay the simulated handshake)
        samples: dict[str, list[float]] = {k: [] for k in socks}
        rng = random.Random(0)
        for _ in range(args.rounds):
            order = list(socks)
            rng.shuffle(order)
            for k in order:
                samples[k].append(_echo(socks[k], payload))
        bulk = int(args.bulk_mb * 1e6)
        tput = {"direct": _throughput(srv.server_address, bulk),
                "loopback": _throughput(proxies["loopback"].address, bulk) if "loopback" in proxies else None}
        for s in socks.values():
            s.close()
        stats = {n: p.stats() for n, p in proxies.items()}
    finally:
        for p in proxies.values():
            p.stop()
        srv.shutdown()
        srv.server_close()

    direct_med = statistics.median(samples["direct"])
    rows = []
    print(f"{'variant':12s} {'rtt cfg':>8s} {'median':>8s} {'p95':>8s} {'max':>8s} {'overhead':>9s} {'lossy':>6s}  (ms)")
    for k, v in samples.items():
        prof: NetworkProfile | None = profiles.get(k)
        cfg = prof.rtt_ms if prof else 0.0
        med = statistics.median(v)
        overhead = med - cfg - direct_med if prof else 0.0
        lossy = stats[k].chunks_delayed_by_loss if prof else 0
        rows.append({"variant": k, "rtt_ms": cfg, "median_ms": med, "p95_ms": _pct(v, 0.95), "max_ms": max(v),
                     "overhead_ms": overhead, "chunks_delayed_by_loss": lossy})
        print(f"{k:12s} {cfg:8.1f} {med:8.3f} {_pct(v, 0.95):8.3f} {max(v):8.3f} {overhead:9.3f} {lossy:6d}")
    print(f"bulk echo of {args.bulk_mb:g} MB: direct {tput['direct']:.0f} MB/s"
          + (f", through the loopback-profile proxy {tput['loopback']:.0f} MB/s" if tput["loopback"] else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": args.rounds, "payload": args.payload, "rows": rows,
                                               "throughput_mb_s": tput}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
