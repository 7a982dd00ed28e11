"""A TCP proxy on 127.0.0.1 that makes a loopback path behave like a real network.

::

    with NetworkProxy(("127.0.0.1", cloud_port), "wan40", seed=1) as proxy:
        url = proxy.url_for("http")          # give this to the client instead of the real URL
        ...
        proxy.set_mode("refuse")             # outage: new connects refused, live ones reset
        proxy.set_mode("normal")             # recovery

Per connection the proxy forwards both directions through a :class:`~router_tools.netsim.link.Link`
(delay, jitter, bandwidth, TCP-style loss; byte order preserved). Modes, switchable at runtime
from any thread (the call returns once the switch is in effect):

========== ============================================ ==========================================
mode       new connections                              live connections at the switch
========== ============================================ ==========================================
normal     forwarded through the profile                keep going (blackholed ones are reset:
                                                        the peer gave up on them long ago)
refuse     not listening: ``ECONNREFUSED``              reset (RST), as when the server goes away
blackhole  accepted and read, never answered            go silent both ways (nothing delivered)
reset      accepted, then RST                           reset
slow       forwarded, plus ``slow_ms`` per round trip   get the extra delay from the next chunk
========== ============================================ ==========================================

``reset_probability`` of the profile resets a connection when the client sends a chunk (about
once per HTTP request), so pooled keep-alive connections fail as often as fresh ones. The
chunk that triggers it is not forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from dataclasses import dataclass, field
from typing import Iterator, Optional
from urllib.parse import urlsplit, urlunsplit

from .errors import ProfileError
from .link import Link
from .profiles import Mode, NetworkProfile, get_profile
from ._service import LoopService, abort_writer, connect_loopback, parse_upstream, rst_socket

CHUNK = 64 * 1024
QUEUE_CHUNKS = 64  # per direction: bounds memory, back-pressures the sender like a TCP window


@dataclass(frozen=True)
class ProxyStats:
    mode: str
    profile: str
    connections_accepted: int
    connections_active: int
    upstream_connect_failures: int
    resets_injected: int
    losses_injected: int          # lost segments, incl. lost retransmissions
    chunks_delayed_by_loss: int
    chunks_forwarded: int
    bytes_to_upstream: int
    bytes_to_client: int


@dataclass
class _Counters:
    accepted: int = 0
    upstream_failures: int = 0
    resets: int = 0
    losses: int = 0
    lossy_chunks: int = 0
    chunks: int = 0
    up_bytes: int = 0
    down_bytes: int = 0


@dataclass(eq=False)
class _Conn:
    cid: int
    csock: socket.socket
    rng: random.Random
    client_w: Optional[asyncio.StreamWriter] = None
    up_w: Optional[asyncio.StreamWriter] = None
    links: list = field(default_factory=list)
    frozen: bool = False   # blackholed: nothing is delivered any more
    closed: bool = False   # aborted
    wrapping: bool = False  # csock is being handed to a transport: only the transport may close it


class NetworkProxy(LoopService):
    """Forward 127.0.0.1:``port`` to a loopback ``upstream`` through a simulated network.

    ``upstream``: ``(host, port)``, ``"host:port"`` or a URL; must be loopback (checked before
    anything is contacted). ``profile``: a :class:`NetworkProfile` or a name from ``PROFILES``.
    ``seed`` makes jitter/loss/reset draws reproducible per connection. ``handshake`` charges the
    first chunk of each connection one extra RTT (the TCP handshake a real connect would pay).
    ``fine_timers=False`` uses the stock epoll loop, whose timers round up to whole milliseconds
    (up to +1 ms per direction; kept for comparison in ``bench/netsim_fidelity.py``).
    """

    _thread_prefix = "netsim-proxy"

    def __init__(self, upstream: "tuple[str, int] | str", profile: "NetworkProfile | str" = "loopback", *,
                 seed: int = 0, handshake: bool = True, connect_timeout: float = 5.0,
                 fine_timers: bool = True) -> None:
        super().__init__()
        self.fine_timers = fine_timers
        self.upstream: tuple[str, int] = parse_upstream(upstream)
        self._profile = get_profile(profile)
        self._mode = self._profile.mode
        self._slow_ms = self._profile.slow_ms
        self._seed = seed
        self._handshake = handshake
        self._connect_timeout = connect_timeout
        self._conns: set[_Conn] = set()
        self._next_cid = 0
        self._n = _Counters()

    # ----------------------------------------------------------------- public API
    @property
    def profile(self) -> NetworkProfile:
        return self._profile

    @property
    def mode(self) -> Mode:
        return self._mode

    def url_for(self, scheme: str = "http") -> str:
        """``scheme://127.0.0.1:PORT`` -- the address clients should use instead of the upstream's."""
        return f"{scheme}://{self.host}:{self.port}"

    def proxied_url(self, upstream_url: str) -> str:
        """The same URL (scheme, path, query) with its host:port replaced by the proxy's."""
        parts = urlsplit(upstream_url)
        return urlunsplit((parts.scheme, f"{self.host}:{self.port}", parts.path, parts.query, parts.fragment))

    def set_mode(self, mode: "Mode | str", *, slow_ms: Optional[float] = None) -> None:
        """Switch mode (thread-safe); returns once the switch is in effect."""
        new = Mode.parse(mode)
        if slow_ms is not None:
            self._profile.replace(slow_ms=slow_ms)  # validates
        if new is Mode.SLOW and not (slow_ms if slow_ms is not None else self._slow_ms):
            raise ProfileError("slow mode needs slow_ms > 0 (the extra round-trip delay)")
        if self._loop is None:
            self._mode = new
            if slow_ms is not None:
                self._slow_ms = float(slow_ms)
            return
        self._call(self._apply_mode(new, slow_ms))

    @contextlib.contextmanager
    def outage(self, mode: "Mode | str" = Mode.REFUSE) -> Iterator["NetworkProxy"]:
        """``with proxy.outage(): ...`` -- switch to ``mode`` (refuse/blackhole/reset), then back."""
        previous, slow = self._mode, self._slow_ms
        self.set_mode(mode)
        try:
            yield self
        finally:
            if self.running:
                self.set_mode(previous, slow_ms=slow)

    def set_profile(self, profile: "NetworkProfile | str") -> None:
        """Apply another profile to new and live connections; its ``mode`` becomes the mode."""
        p = get_profile(profile)
        if self._loop is None:
            self._profile, self._mode, self._slow_ms = p, p.mode, p.slow_ms
            return
        self._call(self._apply_profile(p))

    def stats(self) -> ProxyStats:
        def snapshot() -> ProxyStats:
            n = self._n
            return ProxyStats(mode=self._mode.value, profile=self._profile.name,
                              connections_accepted=n.accepted,
                              connections_active=sum(1 for c in self._conns if not c.closed),
                              upstream_connect_failures=n.upstream_failures, resets_injected=n.resets,
                              losses_injected=n.losses, chunks_delayed_by_loss=n.lossy_chunks,
                              chunks_forwarded=n.chunks,
                              bytes_to_upstream=n.up_bytes, bytes_to_client=n.down_bytes)
        if self.running:
            return self._call(snapshot)
        return snapshot()

    def __repr__(self) -> str:
        port = self._listener.port if self._listener else None
        return (f"NetworkProxy(127.0.0.1:{port} -> {self.upstream[0]}:{self.upstream[1]}, "
                f"{self._profile.name}, mode={self._mode.value})")

    # ----------------------------------------------------------------- mode switching (loop thread)
    async def _setup(self) -> None:
        if self._mode is not Mode.REFUSE:
            self._start_accepting()

    async def _apply_mode(self, new: Mode, slow_ms: Optional[float]) -> None:
        # No await in here: a switch is atomic on the loop thread.
        if new is Mode.REFUSE:
            self._stop_accepting()
        self._switch_mode(new, slow_ms)

    def _switch_mode(self, new: Mode, slow_ms: Optional[float]) -> None:
        old, self._mode = self._mode, new
        if slow_ms is not None:
            self._slow_ms = float(slow_ms)
        if old is Mode.REFUSE and new is not Mode.REFUSE:
            self._start_accepting()
        if new in (Mode.REFUSE, Mode.RESET):
            for conn in list(self._conns):
                self._abort(conn)
        elif new is Mode.BLACKHOLE:
            for conn in list(self._conns):
                self._freeze(conn)
        elif old is Mode.BLACKHOLE:
            for conn in list(self._conns):
                if conn.frozen:
                    self._abort(conn)

    async def _apply_profile(self, p: NetworkProfile) -> None:
        self._profile = p
        for conn in self._conns:
            for link in conn.links:
                link.profile = p
        await self._apply_mode(p.mode, p.slow_ms)

    # ----------------------------------------------------------------- connections (loop thread)
    def _abort(self, conn: _Conn) -> None:
        """RST both sides now."""
        if conn.closed:
            return
        conn.closed = True
        if conn.client_w is None:
            rst_socket(conn.csock)
            if not conn.wrapping:  # else _on_connection aborts the transport once it exists
                conn.csock.close()
        abort_writer(conn.client_w)
        abort_writer(conn.up_w)

    def _freeze(self, conn: _Conn) -> None:
        """Blackhole a live connection: the client hears nothing more; the upstream is let go."""
        if conn.closed:
            return
        conn.frozen = True
        abort_writer(conn.up_w)

    async def _teardown(self) -> None:
        for conn in list(self._conns):
            self._abort(conn)

    async def _on_connection(self, csock: socket.socket) -> None:
        cid = self._next_cid
        self._next_cid += 1
        self._n.accepted += 1
        conn = _Conn(cid, csock, random.Random(f"{self._seed}:{cid}:conn"))
        if self._mode in (Mode.RESET, Mode.REFUSE):  # REFUSE: accepted just before the switch
            self._abort(conn)
            return
        self._conns.add(conn)
        try:
            conn.wrapping = True
            reader, conn.client_w = await asyncio.open_connection(sock=csock, limit=CHUNK)
            if conn.closed:  # aborted while the transport was being made
                abort_writer(conn.client_w)
                return
            if self._mode is Mode.BLACKHOLE:
                conn.frozen = True
                await self._swallow(conn, reader)
                return
            up = await self._connect_upstream(conn)
            if up is None:
                return
            up_reader, conn.up_w = up
            if conn.frozen or self._mode is Mode.BLACKHOLE:  # switched while connecting
                self._freeze(conn)
            c2s = Link(self._profile, random.Random(f"{self._seed}:{cid}:c2s"), handshake=self._handshake)
            s2c = Link(self._profile, random.Random(f"{self._seed}:{cid}:s2c"))
            conn.links = [c2s, s2c]
            await asyncio.gather(
                self._pipe(conn, c2s, reader, conn.up_w, upstream_bound=True),
                self._pipe(conn, s2c, up_reader, conn.client_w, upstream_bound=False),
            )
        except (ConnectionError, OSError):
            self._abort(conn)
        finally:
            self._conns.discard(conn)
            if not conn.closed:
                for w in (conn.client_w, conn.up_w):
                    if w is not None:
                        w.close()
            if conn.client_w is None:
                conn.csock.close()  # never wrapped, or the transport failed to be made

    async def _connect_upstream(self, conn: _Conn) -> Optional[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        try:
            up = await connect_loopback(*self.upstream, self._connect_timeout, limit=CHUNK)
        except (OSError, asyncio.TimeoutError):
            self._n.upstream_failures += 1
            self._abort(conn)  # the client sees a reset, as from a gateway whose backend is gone
            return None
        if conn.closed:  # the mode changed while connecting
            abort_writer(up[1])
            return None
        return up

    async def _swallow(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        """Read and discard until the client gives up (blackhole)."""
        try:
            while not conn.closed and await reader.read(CHUNK):
                pass
        except (ConnectionError, OSError):
            pass

    async def _pipe(self, conn: _Conn, link: Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    *, upstream_bound: bool) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)
        deliver = asyncio.ensure_future(self._deliver(conn, queue, dst, upstream_bound))
        try:
            while not conn.closed:
                try:
                    data = await src.read(CHUNK)
                except (ConnectionError, OSError):
                    if not conn.frozen:
                        self._abort(conn)  # a reset on one side is passed on to the other
                    break
                if conn.closed:
                    break
                if conn.frozen:
                    if not data:
                        break
                    continue
                extra = self._slow_ms / 2000.0 if self._mode is Mode.SLOW else 0.0
                if not data:
                    await queue.put((link.schedule(0, loop.time(), extra).at, None))
                    break
                p = self._profile
                if upstream_bound and p.reset_probability and conn.rng.random() < p.reset_probability:
                    self._n.resets += 1
                    self._abort(conn)
                    break
                d = link.schedule(len(data), loop.time(), extra)
                if d.losses:
                    self._n.losses += d.losses
                    self._n.lossy_chunks += 1
                await queue.put((d.at, data))
            if not (conn.closed or conn.frozen):
                await deliver  # the remaining chunks and the FIN, on schedule
        finally:
            if not deliver.done():
                deliver.cancel()
                await asyncio.gather(deliver, return_exceptions=True)

    async def _deliver(self, conn: _Conn, queue: asyncio.Queue, dst: asyncio.StreamWriter,
                       upstream_bound: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            at, data = await queue.get()
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if conn.closed:
                return
            if conn.frozen:
                if data is None:
                    return
                continue
            try:
                if data is None:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                dst.write(data)
                await dst.drain()
            except (ConnectionError, OSError):
                if not conn.frozen:
                    self._abort(conn)
                return
            self._n.chunks += 1
            if upstream_bound:
                self._n.up_bytes += len(data)
            else:
                self._n.down_bytes += len(data)
