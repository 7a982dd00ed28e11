"""The loopback network-fault machinery (router_tools.netsim) on real sockets.

Upstreams are stdlib servers started here (a TCP echo server, a small HTTP server) or the
FaultServer itself; nothing depends on the cloud service. Timing assertions are lower bounds
only (a delay that should be there is there); never an upper bound on speed.
"""

from __future__ import annotations

import argparse
import ast
import http.client
import http.server
import json
import math
import os
import random
import selectors
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path

import pytest

from router_tools.netsim import (PROFILES, FaultServer, closed_port, Link, LoopbackOnlyError, Mode, NetsimError, NetworkProfile,
                           NetworkProxy, ProfileError, ServiceStateError, add_network_arguments, blackhole, classify,
                           close, garbage, infer_ok, model_metadata, parse_loss, profile_from_args,
                           profile_from_namespace, proxy_to, sequence, slow, status)

pytestmark = pytest.mark.timeout(30)

NETSIM_DIR = Path(__file__).resolve().parents[1] / "router" / "netsim"


# ----------------------------------------------------------------------------- real upstreams

class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        srv = self.server
        with srv.lock:  # type: ignore[attr-defined]
            srv.accepted += 1  # type: ignore[attr-defined]
            srv.active += 1  # type: ignore[attr-defined]
        try:
            while True:
                data = self.request.recv(65536)
                if not data:
                    break
                self.request.sendall(data)
        except OSError:
            pass
        finally:
            with srv.lock:  # type: ignore[attr-defined]
                srv.active -= 1  # type: ignore[attr-defined]


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.lock = threading.Lock()
        self.accepted = 0
        self.active = 0


@pytest.fixture(scope="module")
def echo():
    srv = EchoServer()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


class _JsonHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.hits += 1  # type: ignore[attr-defined]
        out = json.dumps({"method": self.command, "path": self.path, "body": body.decode("latin-1")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Upstream", "stdlib")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_upstream():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JsonHandler)
    srv.daemon_threads = True
    srv.hits = 0  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


def echo_once(sock: socket.socket, payload: bytes = b"ping") -> float:
    t0 = time.perf_counter()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        got += chunk
    assert got == payload
    return time.perf_counter() - t0


def connect(addr: tuple[str, int], timeout: float = 3.0) -> socket.socket:
    s = socket.create_connection(addr, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def wait_until(cond, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ----------------------------------------------------------------------------- profiles

def test_named_profiles_match_the_documented_set():
    assert set(PROFILES) == {"loopback", "lan", "wifi", "4g", "wan40", "flaky", "offline"}
    assert PROFILES["lan"].rtt_ms == 1
    assert (PROFILES["wifi"].rtt_ms, PROFILES["wifi"].jitter_ms) == (10, 5)
    assert (PROFILES["4g"].rtt_ms, PROFILES["4g"].jitter_ms, PROFILES["4g"].loss) == (50, 15, 0.005)
    assert (PROFILES["wan40"].rtt_ms, PROFILES["wan40"].jitter_ms) == (40, 2)
    flaky = PROFILES["flaky"]
    assert (flaky.rtt_ms, flaky.jitter_ms, flaky.loss) == (30, 20, 0.03) and flaky.reset_probability > 0
    assert PROFILES["offline"].mode is Mode.REFUSE
    assert all(p.mode is Mode.NORMAL for n, p in PROFILES.items() if n != "offline")


@pytest.mark.parametrize("field,value", [
    ("rtt_ms", -1), ("jitter_ms", float("nan")), ("loss", 1.0), ("loss", -0.1), ("reset_probability", 1.5),
    ("bandwidth_bytes_per_s", 0), ("rto_min_ms", 0), ("rtt_ms", "fast"), ("mode", "sideways"),
])
def test_profile_validation_names_the_field(field, value):
    with pytest.raises(ProfileError) as exc:
        NetworkProfile("bad", **{field: value})
    assert (field in str(exc.value)) or (field == "mode" and "sideways" in str(exc.value))


def test_profile_from_args():
    assert profile_from_args() == PROFILES["loopback"]
    assert profile_from_args("WiFi") == PROFILES["wifi"]
    p = profile_from_args("wifi", rtt_ms=25)
    assert (p.rtt_ms, p.jitter_ms) == (25, 5) and p.name.startswith("wifi")
    q = profile_from_args(rtt_ms=40, jitter_ms=3, loss="0.5%")
    assert (q.rtt_ms, q.jitter_ms, q.loss) == (40, 3, 0.005)
    with pytest.raises(ProfileError, match="known: loopback"):
        profile_from_args("5g")
    with pytest.raises(ProfileError, match="offline"):
        profile_from_args("offline", rtt_ms=10)
    with pytest.raises(ProfileError, match="loss"):
        profile_from_args(loss=2.0)
    assert parse_loss("3%") == pytest.approx(0.03) and parse_loss("0.01") == 0.01


def test_cli_network_arguments():
    parser = argparse.ArgumentParser()
    add_network_arguments(parser)
    assert profile_from_namespace(parser.parse_args([])) is None
    p = profile_from_namespace(parser.parse_args(["--network", "4g", "--loss", "1%"]))
    assert (p.rtt_ms, p.loss) == (50, 0.01)
    p = profile_from_namespace(parser.parse_args(["--rtt-ms", "40", "--jitter-ms", "2"]))
    assert (p.rtt_ms, p.jitter_ms) == (40, 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["--loss", "lots"])


# ----------------------------------------------------------------------------- link model (pure)

def test_link_delay_is_never_negative_and_keeps_byte_order():
    p = NetworkProfile(rtt_ms=10, jitter_ms=30)  # jitter larger than the delay: clamping matters
    link = Link(p, random.Random(7))
    rng = random.Random(8)
    now, last = 0.0, -1.0
    for _ in range(2000):
        now += rng.random() * 0.003
        d = link.schedule(rng.randint(1, 5000), now)
        assert d.at >= now  # never delivered before it was sent
        assert d.at >= last  # FIFO: jitter never reorders a byte stream
        last = d.at
    delays = [link.one_way_delay() for _ in range(2000)]
    assert min(delays) >= 0.0 and max(delays) <= (10 / 2 + 30 / 2) / 1000 + 1e-12


def test_link_jitter_spreads_within_bounds():
    link = Link(NetworkProfile(rtt_ms=20, jitter_ms=10), random.Random(1))
    delays = [link.one_way_delay() * 1000 for _ in range(5000)]
    assert 5.0 <= min(delays) < 5.5 and 14.5 < max(delays) <= 15.0  # rtt/2 ± jitter/2
    assert abs(sum(delays) / len(delays) - 10.0) < 0.2


def test_link_loss_rate_and_retransmission_penalty():
    p = NetworkProfile(rtt_ms=10, loss=0.05, rto_min_ms=200)
    link = Link(p, random.Random(3))
    n = 20000
    results = [link.loss_penalty(100) for _ in range(n)]  # one segment per chunk
    lossy = [pen for pen, _ in results if pen > 0]
    sd = math.sqrt(0.05 * 0.95 / n)
    assert abs(len(lossy) / n - 0.05) < 5 * sd
    assert min(lossy) >= p.rto_s == 0.2  # a lost small message waits for the retransmission timer
    assert any(pen >= 0.2 + 0.2 for pen in lossy)  # lost retransmissions back off
    # a chunk of k segments is hit with probability 1 - (1 - loss)^k
    link = Link(NetworkProfile(rtt_ms=10, loss=0.01), random.Random(4))
    hit = sum(1 for _ in range(n) if link.loss_penalty(10 * 1448)[0] > 0) / n
    assert abs(hit - (1 - 0.99 ** 10)) < 0.015
    # RTO is max(rto_min, 2*rtt)
    assert NetworkProfile(rtt_ms=300).rto_s == pytest.approx(0.6)


def test_link_bandwidth_and_handshake():
    link = Link(NetworkProfile(rtt_ms=0, bandwidth_bytes_per_s=100_000), random.Random(0))
    last = max(link.schedule(10_000, 0.0).at for _ in range(10))
    assert last == pytest.approx(1.0)  # 100 kB through a 100 kB/s link
    hs = Link(NetworkProfile(rtt_ms=40), random.Random(0), handshake=True)
    assert hs.schedule(10, 0.0).at == pytest.approx(0.060)  # one-way + the handshake's round trip
    assert hs.schedule(10, 1.0).at == pytest.approx(1.020)


# ----------------------------------------------------------------------------- proxy on sockets

@pytest.mark.parametrize("upstream", [("10.0.0.1", 80), ("example.com", 80), "http://8.8.8.8:80/v2", "::2:80",
                                      ("127.0.0.1", 0)])
def test_proxy_refuses_non_loopback_upstreams(upstream):
    with pytest.raises(LoopbackOnlyError):
        NetworkProxy(upstream)


def test_proxy_accepts_loopback_spellings():
    assert NetworkProxy("localhost:8000").upstream == ("127.0.0.1", 8000)
    assert NetworkProxy("http://127.0.0.2:9000/v2").upstream == ("127.0.0.2", 9000)
    assert NetworkProxy(("::1", 9000)).upstream == ("::1", 9000)


def test_delay_is_applied(echo):
    rtt = 40.0
    with NetworkProxy(echo.server_address, NetworkProfile(rtt_ms=rtt), seed=1) as proxy:
        direct = connect(echo.server_address)
        via = connect(proxy.address)
        try:
            first = echo_once(via)  # includes the simulated handshake
            d = [echo_once(direct) for _ in range(5)]
            v = [echo_once(via) for _ in range(5)]
        finally:
            direct.close()
            via.close()
    print(f"direct median {sorted(d)[2] * 1e3:.2f} ms, proxied median {sorted(v)[2] * 1e3:.2f} ms")
    assert first >= 0.8 * 2 * rtt / 1000
    assert min(v) >= 0.8 * rtt / 1000


def test_jitter_varies_round_trips(echo):
    with NetworkProxy(echo.server_address, NetworkProfile(rtt_ms=20, jitter_ms=16), seed=2) as proxy:
        with connect(proxy.address) as s:
            echo_once(s)
            rtts = [echo_once(s) * 1000 for _ in range(15)]
    assert min(rtts) >= 0.8 * (20 - 16)
    assert max(rtts) - min(rtts) >= 4.0  # fixed-delay noise alone is far below this


def test_loss_adds_retransmission_delay(echo):
    rto_ms = 40.0
    p = NetworkProfile(rtt_ms=0, loss=0.25, rto_min_ms=rto_ms)
    n = 40
    with NetworkProxy(echo.server_address, p, seed=3, handshake=False) as proxy:
        with connect(proxy.address) as s:
            rtts = [echo_once(s, b"x" * 64) for _ in range(n)]
        stats = proxy.stats()
    lossy = stats.chunks_delayed_by_loss
    delayed = sum(1 for r in rtts if r >= 0.8 * rto_ms / 1000)
    print(f"{lossy} of {2 * n} chunks lost a segment; {delayed} of {n} echoes delayed by >= RTO")
    assert 0.10 <= lossy / (2 * n) <= 0.45  # configured 0.25, seeded
    assert stats.losses_injected >= lossy
    assert delayed >= math.ceil(lossy / 2)  # each lost chunk stalled its echo by at least the RTO


def test_byte_stream_stays_intact(echo):
    data = random.Random(5).randbytes(1 << 20)
    p = NetworkProfile(rtt_ms=4, jitter_ms=4, loss=0.01, rto_min_ms=20)
    with NetworkProxy(echo.server_address, p, seed=4) as proxy:
        with connect(proxy.address, timeout=10) as s:
            sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
            sender.start()
            got = bytearray()
            while chunk := s.recv(1 << 20):
                got += chunk  # until the FIN the echo server sends after ours
            sender.join(5)
        assert proxy.stats().bytes_to_client == len(data)
    assert len(got) == len(data) and bytes(got) == data


def test_bandwidth_limit_is_applied(echo):
    size, bw = 200_000, 1_000_000
    with NetworkProxy(echo.server_address, NetworkProfile(bandwidth_bytes_per_s=bw), seed=6) as proxy:
        with connect(proxy.address, timeout=10) as s:
            t0 = time.perf_counter()
            threading.Thread(target=s.sendall, args=(b"b" * size,), daemon=True).start()
            got = 0
            while got < size:
                got += len(s.recv(1 << 20))
            elapsed = time.perf_counter() - t0
    assert elapsed >= 0.8 * size / bw


def test_refuse_mode_and_recovery_on_the_same_port(echo):
    with NetworkProxy(echo.server_address, seed=7) as proxy:
        port = proxy.port
        proxy.set_mode("refuse")
        assert proxy.mode is Mode.REFUSE
        with pytest.raises(ConnectionRefusedError):
            connect(proxy.address)
        proxy.set_mode(Mode.NORMAL)
        assert proxy.port == port
        with connect(proxy.address) as s:
            echo_once(s)


def test_offline_profile_refuses_from_the_start(echo):
    with NetworkProxy(echo.server_address, "offline") as proxy:
        with pytest.raises(ConnectionRefusedError):
            connect(proxy.address)
        proxy.set_profile("lan")
        with connect(proxy.address) as s:
            assert echo_once(s) >= 0.8 * 1e-3


def test_blackhole_accepts_and_never_answers(echo):
    with NetworkProxy(echo.server_address, seed=8) as proxy:
        proxy.set_mode("blackhole")
        before = echo.accepted
        with connect(proxy.address, timeout=0.3) as s:
            s.sendall(b"hello?")
            with pytest.raises(TimeoutError):
                s.recv(10)
        assert echo.accepted == before  # nothing reached the upstream


def test_reset_mode_resets_connections(echo):
    with NetworkProxy(echo.server_address, seed=9) as proxy:
        proxy.set_mode("reset")
        with pytest.raises(ConnectionResetError):  # from connect() itself when the RST wins the race
            with connect(proxy.address) as s:
                s.sendall(b"x")
                s.recv(10)
        assert proxy.stats().connections_accepted == 1


def test_outage_cuts_live_keepalive_connections(echo):
    with NetworkProxy(echo.server_address, NetworkProfile(rtt_ms=2), seed=10) as proxy:
        live = connect(proxy.address)
        echo_once(live)
        assert wait_until(lambda: echo.active >= 1)
        with proxy.outage("refuse"):
            with pytest.raises(ConnectionResetError):
                live.sendall(b"still there?")
                live.recv(10)
            live.close()
            assert proxy.stats().connections_active == 0
            assert wait_until(lambda: echo.active == 0)  # the upstream side was closed too
        assert proxy.mode is Mode.NORMAL
        with connect(proxy.address) as s:
            echo_once(s)


def test_blackhole_freezes_live_connections_and_recovery_resets_them(echo):
    with NetworkProxy(echo.server_address, seed=11) as proxy:
        live = connect(proxy.address, timeout=0.3)
        echo_once(live)
        proxy.set_mode("blackhole")
        live.sendall(b"anyone?")
        with pytest.raises(TimeoutError):
            live.recv(10)
        proxy.set_mode("normal")
        live.settimeout(2)
        with pytest.raises(ConnectionResetError):
            live.recv(10)  # the stale connection is not silently resumed
        live.close()
        with connect(proxy.address) as s:
            echo_once(s)


def test_slow_mode_and_profile_switch_apply_to_live_connections(echo):
    with NetworkProxy(echo.server_address, seed=12) as proxy:
        with connect(proxy.address) as s:
            echo_once(s)
            proxy.set_mode("slow", slow_ms=100)
            assert echo_once(s) >= 0.08
            proxy.set_mode("normal")
            proxy.set_profile(NetworkProfile(rtt_ms=60))
            assert echo_once(s) >= 0.048
            assert proxy.profile.rtt_ms == 60
            with pytest.raises(ProfileError, match="slow_ms"):
                NetworkProxy(echo.server_address).set_mode("slow")  # slow with no extra delay is a mistake


def test_reset_probability_resets_some_requests(echo):
    p = NetworkProfile(rtt_ms=0, reset_probability=0.5)
    ok = failed = 0
    with NetworkProxy(echo.server_address, p, seed=13) as proxy:
        for _ in range(16):
            with connect(proxy.address) as s:
                try:
                    echo_once(s)
                    ok += 1
                except ConnectionError:
                    failed += 1
        stats = proxy.stats()
    assert ok > 0 and failed > 0
    assert stats.resets_injected == failed


def test_mode_switches_from_many_threads_under_traffic(echo):
    stop = threading.Event()
    outcomes = {"ok": 0, "failed": 0}

    def traffic() -> None:
        while not stop.is_set():
            try:
                with connect(proxy.address, timeout=0.2) as s:
                    echo_once(s)
                outcomes["ok"] += 1
            except OSError:  # refused, reset, timed out: all legitimate mid-switch
                outcomes["failed"] += 1

    def toggle(i: int) -> None:
        for j in range(15):
            proxy.set_mode(random.Random(i * 100 + j).choice(["normal", "slow", "reset", "blackhole", "refuse"]),
                           slow_ms=5)
            time.sleep(0.002)

    with NetworkProxy(echo.server_address, seed=14) as proxy:
        clients = [threading.Thread(target=traffic) for _ in range(2)]
        togglers = [threading.Thread(target=toggle, args=(i,)) for i in range(4)]
        for t in clients + togglers:
            t.start()
        for t in togglers:
            t.join(10)
        stop.set()
        for t in clients:
            t.join(5)
        proxy.set_mode("normal")
        with connect(proxy.address) as s:
            echo_once(s)
        assert proxy.mode is Mode.NORMAL
        assert wait_until(lambda: proxy.stats().connections_active == 0)
        assert proxy.errors == []  # no connection task died of an unexpected exception
    assert outcomes["ok"] + outcomes["failed"] > 0


def test_closed_port_refuses_and_upstream_down_gives_a_reset_not_a_hang():
    with closed_port() as down:
        with pytest.raises(ConnectionRefusedError):
            connect(down)
        with NetworkProxy(down) as proxy:
            with pytest.raises(ConnectionResetError):  # from connect() itself when the RST wins the race
                with connect(proxy.address) as s:
                    s.sendall(b"x")
                    s.recv(10)
            assert proxy.stats().upstream_connect_failures == 1


@pytest.mark.skipif(not hasattr(selectors, "EpollSelector"), reason="epoll only")
def test_fine_timer_selector_waits_the_whole_timeout_and_still_wakes_on_io():
    from router_tools.netsim._service import FineTimerEpollSelector

    sel = FineTimerEpollSelector()
    a, b = socket.socketpair()
    try:
        sel.register(a, selectors.EVENT_READ)
        for timeout in (0.0003, 0.0017, 0.004):  # sub-ms parts are not rounded (nor cut short)
            t0 = time.monotonic()
            assert sel.select(timeout) == []
            assert time.monotonic() - t0 >= timeout
        timer = threading.Timer(0.05, b.send, args=(b"x",))
        timer.start()
        assert sel.select(10.0)  # woken by the socket, not by the timeout
        timer.join()
    finally:
        sel.close()
        a.close()
        b.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_stop_leaves_no_threads_sockets_or_listeners(echo):
    wait_until(lambda: echo.active == 0)
    fds = _fds()
    proxy = NetworkProxy(echo.server_address, NetworkProfile(rtt_ms=1), seed=15).start()
    fs = FaultServer().start()
    names = {proxy._thread.name, fs._thread.name}
    a = connect(proxy.address)
    echo_once(a)
    c = http.client.HTTPConnection(*fs.address, timeout=2)
    c.request("GET", "/v2/health/ready")
    c.getresponse().read()
    fs.set(infer=blackhole())
    b = socket.create_connection(fs.address)
    b.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert fs.wait_for_count(1, route="infer")
    proxy.stop()
    fs.stop()
    proxy.stop()  # idempotent
    assert proxy.errors == [] and fs.errors == []
    assert not {t.name for t in threading.enumerate()} & names
    for addr in (proxy.address, fs.address):
        with pytest.raises(ConnectionRefusedError):
            connect(addr)
    with pytest.raises(ServiceStateError):
        proxy.start()
    for s in (a, b):
        s.close()
    c.close()
    assert wait_until(lambda: _fds() <= fds and echo.active == 0), (fds, _fds())


# ----------------------------------------------------------------------------- fault server

def _get(addr, path, method="GET", body=None, headers=None, timeout=3.0):
    c = http.client.HTTPConnection(*addr, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def test_route_classification():
    assert classify("/v2/health/ready") == ("ready", None)
    assert classify("/v2/health/live") == ("live", None)
    assert classify("/v2") == ("server", None)
    assert classify("/v2/models/cloud") == ("metadata", "cloud")
    assert classify("/v2/models/cloud/versions/3") == ("metadata", "cloud")
    assert classify("/v2/models/cloud/versions/3/infer") == ("infer", "cloud")
    assert classify("/v2/models/cloud/ready") == ("model_ready", "cloud")
    assert classify("/metrics") == ("other", None)


def test_fault_server_defaults_let_a_client_start():
    with FaultServer() as fs:
        assert _get(fs.address, "/v2/health/ready")[0] == 200
        assert _get(fs.address, "/v2/health/live")[0] == 200
        code, _, body = _get(fs.address, "/v2/models/fashion")
        meta = json.loads(body)
        assert code == 200 and meta["name"] == "fashion" and meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
        assert json.loads(_get(fs.address, "/v2")[2])["name"]
        code, _, body = _get(fs.address, "/v2/models/fashion/infer", "POST", b"{}")
        assert code == 503 and "error" in json.loads(body)
        assert _get(fs.address, "/nope")[0] == 404
        assert fs.count() == 6 and fs.count("/v2/models/fashion") == 1 and fs.count(route="infer") == 1
        assert fs.connections == 6


def test_fault_server_status_answers():
    with FaultServer() as fs:
        fs.set(infer=status(503, headers={"Retry-After": "1"}))
        code, headers, body = _get(fs.address, "/v2/models/m/infer", "POST", b"{}")
        assert code == 503 and headers["Retry-After"] == "1" and json.loads(body)["error"]
        fs.set(infer=500)
        assert _get(fs.address, "/v2/models/m/infer", "POST", b"{}")[0] == 500
        fs.set(infer=status(401, {"error": "invalid API key"}))
        code, headers, body = _get(fs.address, "/v2/models/m/infer", "POST", b"{}")
        assert code == 401 and json.loads(body) == {"error": "invalid API key"}
        assert headers["Content-Type"] == "application/json"
        fs.set(ready=status(503), metadata=404)
        assert _get(fs.address, "/v2/health/ready")[0] == 503
        assert _get(fs.address, "/v2/models/m")[0] == 404
        fs.set(ready=None)
        assert _get(fs.address, "/v2/health/ready")[0] == 200


def test_fault_server_garbage():
    with FaultServer() as fs:
        for kind in ("text", "html", "invalid_json"):
            fs.set(infer=garbage(kind))
            code, _, body = _get(fs.address, "/v2/models/m/infer", "POST", b"{}")
            assert code == 200
            with pytest.raises(ValueError):
                json.loads(body)
        fs.set(infer=garbage("wrong_schema"))
        assert "outputs" not in json.loads(_get(fs.address, "/v2/models/m/infer", "POST", b"{}")[2])
        fs.set(infer=garbage("wrong_shape"))
        out = json.loads(_get(fs.address, "/v2/models/m/infer", "POST", b"{}")[2])["outputs"][0]
        assert math.prod(out["shape"]) != len(out["data"])
        fs.set(infer=garbage("empty"))
        assert _get(fs.address, "/v2/models/m/infer", "POST", b"{}")[2] == b""
        fs.set(infer=garbage("truncated"))
        with pytest.raises(http.client.IncompleteRead):
            _get(fs.address, "/v2/models/m/infer", "POST", b"{}")
    with pytest.raises(NetsimError):
        garbage("nonsense")


def test_fault_server_slow_blackhole_close_reset():
    with FaultServer() as fs:
        fs.set(infer=slow(0.3, then=status(200, {"ok": True})))
        t0 = time.perf_counter()
        code, _, body = _get(fs.address, "/v2/models/m/infer", "POST", b"{}")
        assert code == 200 and json.loads(body) == {"ok": True} and time.perf_counter() - t0 >= 0.24
        fs.set(infer=blackhole())
        with pytest.raises(TimeoutError):
            _get(fs.address, "/v2/models/m/infer", "POST", b"{}", timeout=0.3)
        fs.set(infer=close())
        with pytest.raises(http.client.RemoteDisconnected):
            _get(fs.address, "/v2/models/m/infer", "POST", b"{}")
        fs.set(infer=close(reset=True))
        with pytest.raises(ConnectionResetError):
            _get(fs.address, "/v2/models/m/infer", "POST", b"{}")
        assert fs.count(route="infer") == 4  # every request was received before misbehaving


def test_sequence_503_twice_then_real_upstream(http_upstream):
    up = http_upstream.server_address
    hits = http_upstream.hits
    with FaultServer() as fs:
        fs.set(infer=sequence([status(503, headers={"Retry-After": "1"}), 503], then=proxy_to(*up)))
        c = http.client.HTTPConnection(*fs.address, timeout=3)
        codes = []
        for i in range(3):
            c.request("POST", "/v2/models/m/infer?x=1", body=f'{{"n": {i}}}', headers={"X-Req": str(i)})
            r = c.getresponse()
            codes.append(r.status)
            body = r.read()
        c.close()
        assert codes == [503, 503, 200]
        echoed = json.loads(body)
        assert echoed == {"method": "POST", "path": "/v2/models/m/infer?x=1", "body": '{"n": 2}'}
        assert r.getheader("X-Upstream") == "stdlib"
        assert fs.count(route="infer") == 3 and fs.connections == 1  # keep-alive across faults
        assert http_upstream.hits - hits == 1


def test_upstream_passthrough_and_overrides(http_upstream):
    with FaultServer(upstream=http_upstream.server_address) as fs:
        hits = http_upstream.hits
        code, _, body = _get(fs.address, "/v2/models/cloud")
        assert code == 200 and json.loads(body)["path"] == "/v2/models/cloud"
        fs.set(ready=status(503))
        assert _get(fs.address, "/v2/health/ready")[0] == 503
        assert http_upstream.hits - hits == 1  # the override answered without the upstream
        fs.set(infer=sequence([slow(0.05, then=502)]))  # then=None: back to the upstream
        assert _get(fs.address, "/v2/models/cloud/infer", "POST", b"{}")[0] == 502
        assert _get(fs.address, "/v2/models/cloud/infer", "POST", b"{}")[0] == 200
        fs.set(default=status(500))
        assert _get(fs.address, "/v2/health/live")[0] == 500


def test_proxy_to_relays_unframed_and_chunked_upstream_bodies():
    def serve(conn: socket.socket, chunked: bool) -> None:
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(4096)
            if chunked:
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                time.sleep(0.02)
                conn.sendall(b"6\r\n world\r\n0\r\n\r\n")
            else:
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello")
                time.sleep(0.02)  # the rest arrives later: the relay must read up to the close
                conn.sendall(b" world")

    lsock = socket.create_server(("127.0.0.1", 0))
    try:
        with FaultServer(upstream=lsock.getsockname()) as fs:
            for chunked in (False, True):
                t = threading.Thread(target=lambda: serve(lsock.accept()[0], chunked))
                t.start()
                code, headers, body = _get(fs.address, "/v2/models/m")
                t.join(5)
                assert (code, body) == (200, b"hello world")
                assert "Transfer-Encoding" not in headers
    finally:
        lsock.close()


def test_proxy_to_an_unreachable_upstream_is_a_502():
    with closed_port() as (host, port):
        with FaultServer(infer=proxy_to(host, port, timeout=1)) as fs:
            code, _, body = _get(fs.address, "/v2/models/m/infer", "POST", b"{}")
        assert code == 502 and "error" in json.loads(body)


def test_fault_server_http_details():
    with FaultServer(infer=infer_ok([0.1, 0.9]), metadata=model_metadata(outputs=[
            {"name": "logits", "datatype": "FP32", "shape": [-1, 2]}])) as fs:
        c = http.client.HTTPConnection(*fs.address, timeout=3)
        # chunked request body
        req = {"id": "r1", "inputs": [{"name": "input", "shape": [3, 1], "datatype": "FP32", "data": [1, 2, 3]}]}
        c.request("POST", "/v2/models/m/infer", body=iter([json.dumps(req).encode()]), encode_chunked=True)
        out = json.loads(c.getresponse().read())
        assert out["id"] == "r1" and out["outputs"][0]["shape"] == [3, 2] and len(out["outputs"][0]["data"]) == 6
        c.request("GET", "/v2/models/m")
        assert json.loads(c.getresponse().read())["outputs"][0]["name"] == "logits"
        c.request("GET", "/v2/health/ready", headers={"Connection": "close"})
        r = c.getresponse()
        r.read()
        assert r.getheader("Connection") == "close"
        c.close()
        assert fs.connections == 1 and fs.count() == 3
        # a malformed request gets a 400 and the server stays healthy
        with socket.create_connection(fs.address, timeout=3) as s:
            s.sendall(b"NONSENSE\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400")
        assert _get(fs.address, "/v2/health/ready")[0] == 200
        fs.reset_counts()
        assert fs.count() == 0 and fs.connections == 0
        with pytest.raises(NetsimError):
            fs.set(inference=500)
        with pytest.raises(NetsimError):
            status(99)


def test_fault_server_behind_the_proxy_with_httpx():
    httpx = pytest.importorskip("httpx")
    with FaultServer() as fs, NetworkProxy(fs.address, NetworkProfile(rtt_ms=10), seed=16) as proxy:
        with httpx.Client(base_url=proxy.url_for("http"), timeout=2.0) as client:
            t0 = time.perf_counter()
            for _ in range(3):
                assert client.get("/v2/health/ready").status_code == 200
            assert time.perf_counter() - t0 >= 0.8 * 3 * 0.010
            assert fs.connections == 1  # keep-alive through the proxy
            proxy.set_mode("refuse")  # outage: the pooled connection is cut, reconnects refused
            with pytest.raises(httpx.TransportError):
                client.get("/v2/health/ready")
            assert fs.count() == 3
            proxy.set_mode("normal")
            assert client.get("/v2/models/cloud").json()["name"] == "cloud"
            assert proxy.proxied_url("http://127.0.0.1:1/v2/x?y=1") == f"http://127.0.0.1:{proxy.port}/v2/x?y=1"


# ----------------------------------------------------------------------------- layering

def test_netsim_imports_only_the_standard_library():
    stdlib = set(sys.stdlib_module_names)
    for path in sorted(NETSIM_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in stdlib | {"__future__"}, f"{path.name} imports {name}"
