"""A real, misbehaving HTTP/1.1 server on 127.0.0.1 for testing clients of an Open Inference
Protocol v2 service (stdlib asyncio in a background thread; keep-alive aware).

::

    with FaultServer(upstream=("127.0.0.1", cloud_port)) as fs:      # everything proxied by default
        fs.set(infer=sequence([status(503, headers={"Retry-After": "1"}), 503]))  # 503 twice, then real
        ... point the client at fs.url ...
        assert fs.count(route="infer") == 3 and fs.connections >= 1

    with FaultServer(infer=status(401, {"error": "bad key"})) as fs: # no upstream: built-in health
        ...                                                           # and metadata answers

Requests are classified into routes -- ``live`` (GET /v2/health/live), ``ready``
(/v2/health/ready), ``server`` (GET /v2), ``metadata`` (GET /v2/models/{m}[/versions/{v}]),
``model_ready`` (.../ready), ``infer`` (POST .../infer), ``other`` -- and each route answers
with its behaviour: an explicit one from :meth:`FaultServer.set`, else ``default=`` if set, else
the built-in one (the upstream if configured; otherwise 200 for health, v2 metadata for a
28x28 FP32 image model, 503 for infer, 404 for other paths).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Optional

from .behaviours import Behaviour, ProxyTo, _as_behaviour, model_metadata, status
from .errors import NetsimError
from .http1 import MAX_HEAD, HttpError, Request, read_request, render_response
from ._service import LoopService, abort_writer, parse_upstream

ROUTES = ("live", "ready", "server", "metadata", "model_ready", "infer", "other")
_MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?"
_PATTERNS = [
    ("live", re.compile(r"/v2/health/live/?")),
    ("ready", re.compile(r"/v2/health/ready/?")),
    ("server", re.compile(r"/v2/?")),
    ("model_ready", re.compile(_MODEL + r"/ready/?")),
    ("infer", re.compile(_MODEL + r"/infer/?")),
    ("metadata", re.compile(_MODEL + r"/?")),
]


def classify(path: str) -> tuple[str, Optional[str]]:
    """(route, model name or None) of a request path."""
    for route, pattern in _PATTERNS:
        m = pattern.fullmatch(path)
        if m:
            return route, m.groupdict().get("model")
    return "other", None


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    route: str
    model: Optional[str]
    body_bytes: int
    time: float  # time.monotonic() when the request was fully read


class Context:
    """What a behaviour sees: the request, the streams, and the route's fallback behaviour."""

    def __init__(self, server: "FaultServer", request: Request, route: str, model: Optional[str],
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fallback: Behaviour) -> None:
        self.server = server
        self.request = request
        self.route = route
        self.model = model
        self.reader = reader
        self.writer = writer
        self.fallback = fallback
        self.max_body = server.max_body

    async def send(self, code: int, body: bytes = b"", headers: "tuple | list" = ()) -> bool:
        """Write a whole response; returns whether the connection stays open."""
        keep = self.request.keep_alive and not self.server.stopping
        self.writer.write(render_response(code, body, headers, keep_alive=keep))
        await self.writer.drain()
        return keep


class FaultServer(LoopService):
    """See the module docstring. Route behaviours are keyword arguments (``infer=...``,
    ``ready=...``, ``default=...``) here and in :meth:`set`; ints are shorthand for ``status(code)``."""

    _thread_prefix = "netsim-fault"

    def __init__(self, upstream: "tuple[str, int] | str | None" = None, *, max_body: int = 64 * 1024 * 1024,
                 **routes: "Behaviour | int | None") -> None:
        super().__init__()
        self.upstream = parse_upstream(upstream) if upstream is not None else None
        self.max_body = max_body
        self._lock = threading.Lock()
        self._overrides: dict[str, Behaviour] = {}
        self._records: list[RequestRecord] = []
        self._connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        if self.upstream is not None:
            up = ProxyTo(*self.upstream)
            self._builtin: dict[str, Behaviour] = {r: up for r in ROUTES}
        else:
            self._builtin = {
                "live": status(200), "ready": status(200), "model_ready": status(200),
                "server": status(200, {"name": "netsim-fault-server", "version": "0", "extensions": []}),
                "metadata": model_metadata(),
                "infer": status(503, {"error": "fault server has no upstream for inference"}),
                "other": status(404, {"error": "not found"}),
            }
        self.set(**routes)

    # ----------------------------------------------------------------- configuration (any thread)
    def set(self, **routes: "Behaviour | int | None") -> None:
        """Change route behaviours at runtime; ``None`` restores a route's default."""
        checked: dict[str, Optional[Behaviour]] = {}
        for route, b in routes.items():
            if route not in ROUTES and route != "default":
                raise NetsimError(f"unknown route {route!r} (known: {', '.join(ROUTES)}, default)")
            checked[route] = _as_behaviour(b)
        with self._lock:
            for route, b in checked.items():
                if b is None:
                    self._overrides.pop(route, None)
                else:
                    self._overrides[route] = b

    def clear(self) -> None:
        """Forget every override (back to the defaults)."""
        with self._lock:
            self._overrides.clear()

    def behaviour_for(self, route: str) -> tuple[Behaviour, Behaviour]:
        """(behaviour, fallback) of a route."""
        with self._lock:
            fallback = self._overrides.get("default") or self._builtin[route]
            return self._overrides.get(route) or fallback, fallback

    # ----------------------------------------------------------------- observation (any thread)
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url_for(self, scheme: str = "http") -> str:
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections accepted since start (or the last :meth:`reset_counts`)."""
        with self._lock:
            return self._connections

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def count(self, path: Optional[str] = None, *, route: Optional[str] = None, method: Optional[str] = None) -> int:
        """Requests received, optionally only those with this path / route / method."""
        with self._lock:
            return sum(1 for r in self._records
                       if (path is None or r.path == path) and (route is None or r.route == route)
                       and (method is None or r.method == method.upper()))

    def reset_counts(self) -> None:
        with self._lock:
            self._records.clear()
            self._connections = 0

    def wait_for_count(self, n: int, *, path: Optional[str] = None, route: Optional[str] = None,
                       timeout: float = 5.0) -> bool:
        """Wait until at least ``n`` matching requests arrived; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.count(path, route=route) < n:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def __repr__(self) -> str:
        port = self._listener.port if self._listener else None
        up = f" -> {self.upstream[0]}:{self.upstream[1]}" if self.upstream else ""
        return f"FaultServer(127.0.0.1:{port}{up})"

    # ----------------------------------------------------------------- serving (loop thread)
    async def _teardown(self) -> None:
        for w in list(self._writers):
            abort_writer(w)

    async def _on_connection(self, csock: socket.socket) -> None:
        with self._lock:
            self._connections += 1
        reader, writer = await asyncio.open_connection(sock=csock, limit=MAX_HEAD)
        self._writers.add(writer)
        try:
            while True:
                try:
                    req = await read_request(reader, self.max_body)
                except HttpError as exc:
                    writer.write(render_response(exc.status, json.dumps({"error": str(exc)}).encode(),
                                                 (("Content-Type", "application/json"),), keep_alive=False))
                    await writer.drain()
                    return
                if req is None:
                    return
                route, model = classify(req.path)
                with self._lock:
                    self._records.append(RequestRecord(req.method, req.path, route, model, len(req.body),
                                                       time.monotonic()))
                behaviour, fallback = self.behaviour_for(route)
                ctx = Context(self, req, route, model, reader, writer, fallback)
                if not await behaviour.respond(ctx):
                    return
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()
