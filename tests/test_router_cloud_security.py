"""The router's cloud client against real loopback servers that it must not trust or believe:

* TLS: a self-signed https server (stdlib ``ssl`` + ``http.server`` on 127.0.0.1, cert made
  here with ``cryptography``). After a policy reload from http to https the request fails with
  category ``tls`` and the server never sees the API key; ``SSL_CERT_FILE``/``SSL_CERT_DIR`` in
  the environment change nothing; the endpoint's ``ca_bundle`` makes it work.
* Impossible answers from a misbehaving v2 server (router_tools.netsim FaultServer): wrong class
  count, negative probabilities, NaN, rows not summing to 1, a huge body -- each answered from
  the edge with category ``protocol``, counted by the breaker, never a foreign label.
* Failure categories (one table on the error classes) and the jittered breaker (unit tests with
  an injected clock and rng).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import random
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

from router import Router
from router.cloud import CloudClient, check_output, error_from_status, make_ssl_context, response_cap, translate
from router.errors import (
    CLOUD_FAILURE_CATEGORIES,
    CircuitOpen,
    CloudAuthError,
    CloudError,
    CloudGatewayError,
    CloudOverloaded,
    CloudProtocolError,
    CloudRejected,
    CloudServerError,
    CloudTimeout,
    CloudTLSError,
    CloudUnavailable,
    ConfigError,
    PredictionUnavailable,
)
from router.health import BreakerState, CircuitBreaker
from router.policy import BreakerSettings, Endpoint, parse_policy
from router.prediction import CloudFailure, Reason
from router_tools.netsim import FaultServer
from router_tools.netsim.behaviours import Behaviour, infer_ok

KEY_ENV = "TEST_ROUTER_TLS_KEY"
KEY = "s3cret-key-that-must-not-leak"
LABELS = 10
RNG = np.random.default_rng(0)
# An image the shipped edge model is unsure about is not needed: threshold=1.0 escalates anything.
IMAGE = RNG.integers(0, 256, (28, 28), dtype=np.uint8)
NOISE_S = 0.5  # scheduling noise on a loaded 2-core machine (a hang bound, not a speed goal)


# ----------------------------------------------------------------------------- a tiny v2 server


class _V2Handler(BaseHTTPRequestHandler):
    """Answers v2 metadata and inference (10 classes) and records each request's Authorization."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self.server.records.append((self.command, self.path, self.headers.get("Authorization")))
        self._send({"name": "fashion-mnist", "versions": ["1"], "platform": "test",
                    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
                    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, LABELS]}]})

    def do_POST(self) -> None:
        self.server.records.append((self.command, self.path, self.headers.get("Authorization")))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = body["inputs"][0]["shape"][0]
        row = [0.0] * LABELS
        row[3] = 1.0
        self._send({"model_name": "fashion-mnist", "model_version": "tls-test",
                    "outputs": [{"name": "probabilities", "shape": [n, LABELS], "datatype": "FP32", "data": row * n}]})


class V2Server:
    """``ThreadingHTTPServer`` on 127.0.0.1 (an ephemeral port), TLS when given a context."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _V2Handler)
        self.httpd.records = []
        self.httpd.daemon_threads = True
        if tls is not None:
            # The handshake happens on the handler thread's first read, so a failed one never
            # reaches do_GET/do_POST: nothing is recorded, as nothing was received.
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.scheme = "https" if tls else "http"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def records(self) -> list:
        return list(self.httpd.records)

    def __enter__(self) -> "V2Server":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    """(cert.pem, key.pem) for 127.0.0.1 and localhost, made with ``cryptography``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "router-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("tls")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _server_tls(self_signed) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*map(str, self_signed))
    return ctx


def _policy(url: str, **endpoint) -> dict:
    return {
        "default_deadline_ms": 3000,  # this file is about trust and answers, not budgets
        "decision_log": False,
        "cloud": {"endpoints": [{"url": url, "name": "svc", "api_key_env": KEY_ENV, **endpoint}],
                  "retry": {"max_attempts": 1}, "breaker": {"failure_threshold": 100}},
    }


# ----------------------------------------------------------------------------- TLS


def test_reload_from_http_to_untrusted_https_never_sends_the_key(self_signed, monkeypatch, caplog):
    cert, _ = self_signed
    monkeypatch.setenv(KEY_ENV, KEY)
    # The environment names the self-signed cert as trusted: the policy alone decides, so this must not help.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("SSL_CERT_DIR", str(cert.parent))
    with V2Server() as plain, V2Server(_server_tls(self_signed)) as tls, \
            Router(parse_policy(_policy(plain.url))) as r:
        p = r.predict(IMAGE, threshold=1.0)
        assert (p.source, p.endpoint, p.cloud_failure) == ("cloud", "svc", None)
        assert plain.records[-1][2] == f"Bearer {KEY}"  # loopback http may carry the key

        r.reload_policy(parse_policy(_policy(tls.url)))
        t0 = time.monotonic()
        p = r.predict(IMAGE, threshold=1.0)
        assert time.monotonic() - t0 < 3.0 + NOISE_S
        assert (p.source, p.reason, p.fallback) == ("edge", Reason.CLOUD_ERROR, True)
        assert p.cloud_failure is not None and p.cloud_failure.category == "tls", p.cloud_failure
        assert p.cloud_failure.endpoint == "svc" and "certificate" in p.cloud_failure.message.lower()
        assert tls.records == []  # the handshake failed: no request, no header, no key
        assert r.stats()["cloud_failures"]["tls"] == 1

        # ca_bundle names the cert: trusted, and only now does the key travel (over TLS).
        r.reload_policy(parse_policy(_policy(tls.url, ca_bundle=str(cert))))
        p = r.predict(IMAGE, threshold=1.0)
        assert (p.source, p.model_version, p.cloud_failure) == ("cloud", "tls-test", None)
        assert tls.records and all(auth == f"Bearer {KEY}" for _, _, auth in tls.records)

        # Back to no bundle: trust is rebuilt from the policy, not remembered from the pooled client.
        n = len(tls.records)
        r.reload_policy(parse_policy(_policy(tls.url)))
        p = r.predict(IMAGE, threshold=1.0)
        assert p.cloud_failure is not None and p.cloud_failure.category == "tls"
        assert len(tls.records) == n

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="router.cloud"):
            r.reload_policy(parse_policy(_policy(tls.url, tls_verify=False)))
        assert any("TLS VERIFICATION IS OFF" in rec.getMessage() and "svc" in rec.getMessage() for rec in caplog.records)
        assert r.predict(IMAGE, threshold=1.0).source == "cloud"


def test_ssl_context_ignores_ssl_cert_file(self_signed, monkeypatch):
    """Unit-level twin of the test above: the context the client builds does not load the env's bundle."""
    cert, _ = self_signed
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("SSL_CERT_DIR", str(cert.parent))
    subjects = lambda ctx: {tuple(x[0] for x in c["subject"]) for c in ctx.get_ca_certs()}  # noqa: E731
    mine = (("commonName", "router-test"),)
    assert mine not in subjects(make_ssl_context())
    assert subjects(make_ssl_context(ca_bundle=str(cert))) == {mine}
    assert mine in subjects(ssl.create_default_context())  # what the env would have done


def test_api_key_over_plain_http_to_another_host_is_refused_at_load(tmp_path):
    for url in ("http://10.1.2.3:8000", "http://cloud.example.com"):
        with pytest.raises(ConfigError, match="'far'.*plain http"):
            parse_policy({"cloud": {"endpoints": [{"url": url, "name": "far", "api_key_env": "K"}]}}, "p.yaml")
        parse_policy({"cloud": {"endpoints": [{"url": url, "api_key_env": "K", "allow_insecure_http": True}]}})
        parse_policy({"cloud": {"endpoints": [{"url": url}]}})  # no key: nothing to leak
    for url in ("http://127.0.0.1:1", "http://127.9.9.9:1", "http://[::1]:1", "http://localhost:1", "https://x.example"):
        parse_policy({"cloud": {"endpoints": [{"url": url, "api_key_env": "K"}]}})
    with pytest.raises(ConfigError, match="ca_bundle"):
        parse_policy({"cloud": {"endpoints": [{"url": "https://x.example", "ca_bundle": str(tmp_path / "none.pem")}]}})


# ----------------------------------------------------------------------------- impossible answers


@dataclass
class HugeAnswer(Behaviour):
    """A 200 whose body is a v2 response with ``floats`` values, written lazily in 64 KiB chunks
    until done or the client goes away; ``declare`` sends a Content-Length, else read-to-close."""

    floats: int
    declare: bool = False
    sent: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    async def respond(self, ctx) -> bool:
        head = b'{"model_name":"m","outputs":[{"name":"probabilities","shape":[1,%d],"datatype":"FP32","data":[' % self.floats
        value, tail = b"0.00000002,", b"0]}]}"
        total = len(head) + len(value) * (self.floats - 1) + len(tail)
        lines = [b"HTTP/1.1 200 OK", b"Content-Type: application/json", b"Connection: close"]
        if self.declare:
            lines.append(b"Content-Length: %d" % total)
        try:
            ctx.writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + head)
            chunk = value * (65536 // len(value))
            left = self.floats - 1
            while left > 0:
                n = min(left, 65536 // len(value))
                ctx.writer.write(chunk[:n * len(value)])
                await ctx.writer.drain()
                self.sent += n * len(value)
                left -= n
            ctx.writer.write(tail)
            await ctx.writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.done.set()
        return False


def _row(values):
    return infer_ok([float(v) for v in values])


IMPOSSIBLE = [
    pytest.param(_row(np.full(11, 1 / 11)), "11 classes", id="11-classes"),
    pytest.param(_row([0.2, 0.3, 0.5]), "3 classes", id="3-classes"),
    pytest.param(_row([-0.2, 1.2] + [0.0] * 8), "[0, 1]", id="negative-probability"),
    pytest.param(_row([float("nan")] + [0.1] * 9), "", id="nan"),
    pytest.param(_row([0.5] * 10), "sum to 1", id="rows-not-summing-to-1"),
]


@pytest.mark.parametrize("behaviour, why", IMPOSSIBLE)
def test_impossible_answers_fall_back_and_count_against_the_breaker(behaviour, why):
    with FaultServer(infer=behaviour) as fs:
        policy = _policy(fs.url)
        policy["cloud"]["breaker"] = {"failure_threshold": 2, "open_duration_s": 60}
        policy["cloud"]["endpoints"][0].pop("api_key_env")
        with Router(parse_policy(policy)) as r:
            labels = r.edge_model.labels
            for _ in range(2):
                p = r.predict(IMAGE, threshold=1.0)
                assert (p.source, p.reason, p.fallback, p.attempts) == ("edge", Reason.CLOUD_ERROR, True, 1)
                assert p.cloud_failure.category == "protocol" and why in p.cloud_failure.message
                assert 0 <= p.class_index < len(labels) and p.label == labels[p.class_index]
                assert len(p.probabilities) == len(labels)
            s = r.stats()
            assert s["endpoints"]["svc"]["breaker"] == "open" and s["cloud_failures"]["protocol"] == 2
            p = r.predict(IMAGE, threshold=1.0)  # the breaker keeps further requests local, at once
            assert (p.reason, p.attempts) == (Reason.BREAKER_OPEN, 0)
        assert fs.count(route="infer") == 2


@pytest.mark.parametrize("declare", [False, True], ids=["read-to-close", "content-length"])
def test_huge_answer_is_cut_at_the_cap_without_waiting_for_it(declare):
    huge = HugeAnswer(5_000_000, declare=declare)  # ~55 MB of JSON
    with FaultServer(infer=huge) as fs:
        policy = _policy(fs.url)
        policy["cloud"]["endpoints"][0].pop("api_key_env")
        with Router(parse_policy(policy)) as r:
            t0 = time.monotonic()
            p = r.predict(IMAGE, threshold=1.0)
            elapsed = time.monotonic() - t0
        assert (p.source, p.fallback) == ("edge", True)
        assert p.cloud_failure.category == "protocol" and "cap" in p.cloud_failure.message
        assert elapsed < 3.0 + NOISE_S
        assert huge.done.wait(10.0)
        # The client stopped reading: the server got rid of a small part (socket buffers), not 55 MB.
        assert huge.sent < 16 * 1024 * 1024


def test_max_response_bytes_per_endpoint():
    ep = Endpoint(url="http://127.0.0.1:1")
    assert response_cap(ep, 1, 10) == 64 * 1024  # the floor
    assert response_cap(ep, 1000, 10) == 1000 * 10 * 32 + 16 * 1024
    assert response_cap(Endpoint(url="http://127.0.0.1:1", max_response_bytes=4096), 1000, 10) == 4096
    with pytest.raises(Exception):
        Endpoint(url="http://127.0.0.1:1", max_response_bytes=10)


def test_output_kinds_are_checked():
    probs = np.array([[0.1, 0.2, 0.7]], np.float32)
    ep = Endpoint(url="http://127.0.0.1:1")
    assert np.allclose(check_output(probs, ep, 3), probs)
    logp = Endpoint(url="http://127.0.0.1:1", output_kind="log_probabilities")
    assert np.allclose(check_output(np.log(probs), logp, 3), probs, atol=1e-6)
    with pytest.raises(CloudProtocolError, match="<= 0"):
        check_output(np.array([[0.5, -1.0, -2.0]], np.float32), logp, 3)
    with pytest.raises(CloudProtocolError, match="sum to 1"):
        check_output(np.log(np.array([[0.2, 0.2, 0.2]], np.float32)), logp, 3)
    logits = Endpoint(url="http://127.0.0.1:1", output_kind="logits")
    assert check_output(np.array([[5.0, -3.0, 40.0]], np.float32), logits, 3).sum() == pytest.approx(1.0)
    with pytest.raises(CloudProtocolError, match="NaN or infinite"):
        check_output(np.array([[np.inf, 0, 0]], np.float32), logits, 3)
    with pytest.raises(CloudProtocolError, match="classes"):
        check_output(probs, ep, 10)
    assert check_output(probs, ep, None).shape == (1, 3)  # count unknown: the rest is still checked


# ----------------------------------------------------------------------------- categories


def test_every_error_class_has_a_category_from_the_one_table():
    ep = Endpoint(url="http://127.0.0.1:1", name="e")
    h = httpx.Headers()
    by_status = {401: "auth", 403: "auth", 400: "rejected", 404: "rejected", 413: "rejected", 429: "overloaded",
                 503: "overloaded", 500: "server_error", 502: "server_error", 504: "server_error"}
    for status, category in by_status.items():
        assert error_from_status(status, h, b"", ep).category == category, status
    assert translate(httpx.ConnectError("refused"), ep).category == "unreachable"
    assert translate(httpx.ReadTimeout("slow"), ep).category == "timeout"
    try:
        raise httpx.ConnectError("handshake") from ssl.SSLCertVerificationError(1, "certificate verify failed")
    except httpx.ConnectError as exc:
        err = translate(exc, ep)
    assert isinstance(err, CloudTLSError) and err.category == "tls" and not err.retryable
    for cls in (CloudError, CloudTimeout, CloudUnavailable, CloudOverloaded, CloudGatewayError, CloudTLSError,
                CircuitOpen, CloudRejected, CloudAuthError, CloudServerError, CloudProtocolError):
        assert cls.category in CLOUD_FAILURE_CATEGORIES
    failure = CloudFailure.from_error(CloudOverloaded("HTTP 503 from e: busy", endpoint="e", status=503))
    assert failure == CloudFailure("overloaded", "HTTP 503 from e: busy", "e")


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: connections are refused
    return port


def test_closed_port_is_unreachable_counted_and_logged(caplog):
    policy = _policy(f"http://127.0.0.1:{_closed_port()}")
    policy["cloud"]["endpoints"][0].pop("api_key_env")
    policy["decision_log"] = True
    with Router(parse_policy(policy)) as r:
        with caplog.at_level(logging.INFO, logger="router.decision"):
            p = r.predict(IMAGE, threshold=1.0)
        assert p.cloud_failure.category == "unreachable" and p.fallback
        assert p.model_dump(mode="json")["cloud_failure"]["category"] == "unreachable"
        lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "router.decision"]
        assert lines[-1]["cloud_failure"] == "unreachable"
        with pytest.raises(PredictionUnavailable) as info:  # cloud_only: no side answers; the category still counts
            r.predict(IMAGE, mode="cloud_only")
        assert info.value.cloud_error.category == "unreachable"
        assert r.stats()["cloud_failures"] == {"unreachable": 2}


def test_cli_predict_shows_why_the_escalation_failed(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    img = tmp_path / "noise.png"
    Image.fromarray(IMAGE).save(img)
    cfg = tmp_path / "policy.yaml"
    cfg.write_text(json.dumps({"confidence_threshold": 1.0, "default_deadline_ms": 3000, "decision_log": False,
                               "cloud": {"endpoints": [{"url": f"http://127.0.0.1:{_closed_port()}", "name": "svc"}],
                                         "retry": {"max_attempts": 1}}}))  # JSON is YAML
    out = subprocess.run([sys.executable, "-m", "router_tools.cli", "predict", "--config", str(cfg), str(img)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(fallback)" in out.stdout and "cloud failed (unreachable): svc:" in out.stdout


# ----------------------------------------------------------------------------- breaker jitter


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class ScriptedRng(random.Random):
    """``uniform(a, b)`` returns ``a + f * (b - a)`` for the next scripted fraction ``f``."""

    def __init__(self, fractions) -> None:
        super().__init__(0)
        self.fractions = list(fractions)
        self.calls = []

    def uniform(self, a, b):
        self.calls.append((a, b))
        return a + self.fractions.pop(0) * (b - a)


def test_breaker_open_periods_are_jittered_by_the_injected_rng():
    clock, rng = FakeClock(), ScriptedRng([0.0, 1.0, 0.5])
    b = CircuitBreaker(BreakerSettings(failure_threshold=1, open_duration_s=10.0, open_jitter=0.2), clock, rng)
    b.record_failure()  # opens for 10 x 0.8
    assert rng.calls == [(0.8, 1.2)] and b.open_for_s == pytest.approx(8.0)
    clock.t = 7.99
    assert b.state is BreakerState.OPEN
    clock.t = 8.0
    assert b.state is BreakerState.HALF_OPEN and b.acquire()
    b.record_failure()  # the trial failed: open again, for 10 x 1.2 this time
    clock.t = 8.0 + 11.99
    assert b.state is BreakerState.OPEN
    clock.t = 8.0 + 12.0
    assert b.state is BreakerState.HALF_OPEN and b.acquire()
    b.record_failure()
    assert b.open_for_s == pytest.approx(10.0)


def test_jitter_breaks_phase_lock_with_a_periodic_fault():
    """A fault that is down for the first 5 s of every 10 s: with a fixed 10 s open period every
    trial lands in the down phase and the breaker never closes; jittered periods drift out of it."""
    settings = dict(failure_threshold=1, open_duration_s=10.0, half_open_max_calls=1)

    def closes_within(jitter: float, horizon: float = 600.0) -> bool:
        clock = FakeClock()
        b = CircuitBreaker(BreakerSettings(**settings, open_jitter=jitter), clock, random.Random(7))
        b.record_failure()  # at t = 0, down phase
        while clock.t < horizon:
            clock.t += 0.01
            if b.acquire():
                if clock.t % 10.0 < 5.0:
                    b.record_failure()
                else:
                    b.record_success()
                    return True
        return False

    assert not closes_within(0.0)
    assert closes_within(0.2)


def test_jittered_periods_stay_within_the_band():
    clock = FakeClock()
    b = CircuitBreaker(BreakerSettings(failure_threshold=1, open_duration_s=4.0), clock, random.Random(1))
    periods = []
    for _ in range(200):
        b.record_failure()
        periods.append(b.open_for_s)
        clock.t += b.open_for_s + 1e-9  # float rounding of the sum
        assert b.acquire()
    assert min(periods) >= 4.0 * 0.8 and max(periods) <= 4.0 * 1.2 and len(set(periods)) > 100


def test_cloud_client_aclose_without_any_request():
    client = CloudClient(parse_policy(_policy("http://127.0.0.1:1")).cloud, classes=LABELS)
    asyncio.run(client.aclose())
