"""The FastAPI app: Open Inference Protocol v2 REST, ``/v1/classify``, ``/metrics``.

``create_app(settings)`` builds everything per call (data plane, metrics registry, auth keys);
nothing happens at import time. The lifespan loads and warms up the model before uvicorn
starts serving, so ``/v2/health/ready`` is 200 only after that; on shutdown uvicorn lets
in-flight requests finish (``server.graceful_timeout_s``) and the batcher drains.

The edge of the service is here and only here:

* ``STATUS_BY_ERROR`` maps the data plane's typed errors to HTTP statuses (one table);
  every error answer is ``{"error": "..."}`` -- never FastAPI's default 422 or HTML.
* ``_EdgeMiddleware`` (pure ASGI) counts and times requests by route template, passes on the
  arrival time (the budget in ``parameters.timeout`` counts from it: when
  ``HardenedHttpProtocol`` read the request's first bytes, else now) and enforces
  ``limits.max_body_bytes`` from ``Content-Length`` *and* while the body streams in. It also
  serves the infer endpoint itself (``_InferEndpoint``), skipping FastAPI's per-request
  layers on the hot path; every other endpoint is an ordinary FastAPI route.
* Bearer-key auth is a dependency of every route except the health endpoints (and
  ``/metrics`` if ``auth.public_metrics``); keys are compared in constant time. When keys are
  configured, ``/v1/classify`` needs one too. A request with more than one ``Authorization``
  header is refused (400) on every route, before any route or key is looked at.
* ``HardenedHttpProtocol`` (the uvicorn HTTP protocol the CLI runs) bounds what one connection
  may cost before the app sees it: header bytes (431), time to send the headers and pauses in
  the body (408), open connections (503), all answered as ``{"error": ...}`` JSON.

Nothing here logs request bodies, tensors or keys.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Mapping, Optional

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

try:
    import resource
except ImportError:  # not POSIX: no descriptor limit to respect
    resource = None  # type: ignore[assignment]

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cloud_service import wire
from cloud_service.dataplane import DataPlane
from cloud_service.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
    Unavailable,
)
from cloud_service.metrics import FleetMetrics, ServiceMetrics
from cloud_service.settings import ServiceSettings
from edge_model.errors import DecodeBusy
from edge_model.preprocess import configure_decode_budget

log = logging.getLogger("cloud_service.app")

# The one place where typed errors become HTTP statuses (most specific class first).
STATUS_BY_ERROR: tuple[tuple[type[ServiceError], int], ...] = (
    (InvalidRequest, 400),
    (Unauthorized, 401),
    (ModelNotFound, 404),
    (PayloadTooLarge, 413),
    (Overloaded, 503),
    (Unavailable, 503),
    (DeadlineExceeded, 504),
    (InferenceFailed, 500),
)

OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")


def status_for(exc: ServiceError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(exc: ServiceError) -> JSONResponse:
    status = status_for(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, Unavailable):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="hybrid-router-cloud"'
    # Messages are payload-free by construction (see cloud_service.errors), so they may be logged.
    # 503/504 are load management (counted in /metrics), not faults: debug, like the 4xx.
    if status == 500:
        log.warning("%d %s: %s", status, type(exc).__name__, exc.message)
    else:
        log.debug("%d %s: %s", status, type(exc).__name__, exc.message)
    return JSONResponse({"error": exc.message}, status_code=status, headers=headers)


def create_app(settings: Optional[ServiceSettings] = None, env: Optional[Mapping[str, str]] = None) -> FastAPI:
    """The service as an ASGI app. ``env`` (default ``os.environ``) supplies ``auth.api_keys_env``."""
    settings = settings if settings is not None else ServiceSettings()
    keys = settings.auth.resolve_keys(os.environ if env is None else env)  # SettingsError: fail closed
    limits = settings.limits
    # Decoded-image memory is a process-wide resource: the budget is too (edge_model.preprocess).
    configure_decode_budget(limits.decode_budget_bytes, limits.max_decoded_bytes, limits.decode_wait_s)
    configure_http(settings)
    metrics = ServiceMetrics()
    dataplane = DataPlane(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await dataplane.start()
        try:
            yield
        finally:
            await dataplane.stop(settings.server.graceful_timeout_s)

    app = _ServiceApp(
        title="hybrid-router cloud service",
        description="Open Inference Protocol v2 (REST) serving the full-precision Fashion-MNIST classifier.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # FastAPI's native OpenTelemetry (newer versions; older ones ignore the keyword): off. Our
        # metrics are Prometheus; an exporter configured from the environment must not send
        # anything anywhere, and its per-request checks cost event-loop time.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.dataplane = dataplane
    app.state.metrics = metrics
    _install_error_handlers(app)
    auth = [Depends(_bearer_auth(keys))] if keys else []
    # The v2 infer endpoint -- the hot path -- is served by the edge middleware itself (see _InferEndpoint),
    # in front of Starlette's middleware stack (see _ServiceApp).
    infer = _InferEndpoint(dataplane, keys)
    app.add_middleware(_EdgeMiddleware, metrics=metrics, max_body_bytes=settings.limits.max_body_bytes, infer=infer)
    app.infer_edge = _EdgeMiddleware(None, metrics=metrics, max_body_bytes=settings.limits.max_body_bytes, infer=infer)

    # ------------------------------------------------------------------ health (always open)
    @app.get("/v2/health/live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if dataplane.ready:
            return JSONResponse({"ready": True})
        raise Unavailable("not ready: the model is loading or the server is shutting down")

    # ------------------------------------------------------------------ protected API
    api = APIRouter(dependencies=auth)

    @api.get("/v2")
    async def server_metadata() -> Response:
        return JSONResponse(dataplane.server_metadata().model_dump())

    def _metadata(model_name: str, model_version: Optional[str]) -> Response:
        return JSONResponse(dataplane.model(model_name, model_version).metadata_dict())

    def _model_ready(model_name: str, model_version: Optional[str]) -> Response:
        model = dataplane.model(model_name, model_version)
        if not dataplane.model_ready(model_name, model_version):
            raise Unavailable(f"model {model.name!r} is not ready")
        return JSONResponse({"name": model.name, "ready": True})

    # Separate routes with and without a version (no optional path segments in FastAPI).
    @api.get("/v2/models/{model_name}")
    async def model_metadata(model_name: str) -> Response:
        return _metadata(model_name, None)

    @api.get("/v2/models/{model_name}/versions/{model_version}")
    async def model_version_metadata(model_name: str, model_version: str) -> Response:
        return _metadata(model_name, model_version)

    @api.get("/v2/models/{model_name}/ready")
    async def model_ready(model_name: str) -> Response:
        return _model_ready(model_name, None)

    @api.get("/v2/models/{model_name}/versions/{model_version}/ready")
    async def model_version_ready(model_name: str, model_version: str) -> Response:
        return _model_ready(model_name, model_version)

    @api.post("/v1/classify")
    async def classify(request: Request) -> Response:
        arrived = request.scope.get("state", {}).get("arrived", time.monotonic())
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            limit = settings.limits.max_body_bytes
            async with request.form(max_files=1, max_fields=16, max_part_size=limit) as form:
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    raise InvalidRequest("multipart form must carry the image in a file field named 'file'")
                image = await upload.read()
        else:
            image = await request.body()
        if not image:
            raise InvalidRequest("empty body: send the image bytes, or a multipart form with a 'file' field")
        result = await dataplane.classify(image, dataplane.deadline_for(None, arrived))
        return JSONResponse({
            "label": result.label,
            "class_index": result.class_index,
            "confidence": result.confidence,
            "probabilities": result.probabilities,
            "model_name": result.model_name,
            "model_version": result.model_version,
        })

    fleet = FleetMetrics(metrics.registry)
    app.state.fleet = fleet

    @api.post("/v1/fleet/report")
    async def fleet_report(request: Request) -> Response:
        # Aggregate counts per edge version from a device (router/audit.py); never inputs.
        body = await request.body()
        fleet.record(parse_fleet_report(body))
        return JSONResponse({"accepted": True})

    app.include_router(api)

    metrics_router = APIRouter(dependencies=[] if settings.auth.public_metrics else auth)

    @metrics_router.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    app.include_router(metrics_router)
    return app


# ----------------------------------------------------------------------------- fleet report

FLEET_REPORT_MAX_BYTES = 16 * 1024
FLEET_REPORT_MAX_VERSIONS = 16
_FLEET_COUNT_MAX = 10**12


def parse_fleet_report(body: bytes) -> dict[str, dict[str, int]]:
    """``{"versions": {"<edge version>": {"answers": n, ...}}}`` checked by hand (a dozen lines:
    the shape is flat) -- InvalidRequest / PayloadTooLarge with one line saying what was wrong."""
    import re

    if len(body) > FLEET_REPORT_MAX_BYTES:
        raise PayloadTooLarge(f"fleet report of {len(body)} bytes exceeds {FLEET_REPORT_MAX_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("fleet report: body is not JSON; send {\"versions\": {\"<version>\": {counts}}}") from None
    versions = data.get("versions") if isinstance(data, dict) else None
    if not isinstance(versions, dict) or set(data) != {"versions"}:
        raise InvalidRequest("fleet report: expected exactly one key, 'versions', mapping edge versions to counts")
    if len(versions) > FLEET_REPORT_MAX_VERSIONS:
        raise InvalidRequest(f"fleet report: {len(versions)} versions, at most {FLEET_REPORT_MAX_VERSIONS}")
    out: dict[str, dict[str, int]] = {}
    for version, counts in versions.items():
        if not re.fullmatch(r"[A-Za-z0-9._+-]{1,64}", version):
            raise InvalidRequest("fleet report: a version must be 1-64 characters of letters, digits and ._+-")
        if not isinstance(counts, dict) or not set(counts) <= set(FleetMetrics.FIELDS):
            raise InvalidRequest(f"fleet report: counts of {version!r} must be an object with keys among "
                                 f"{', '.join(FleetMetrics.FIELDS)}")
        for k, n in counts.items():
            if type(n) is not int or not 0 <= n <= _FLEET_COUNT_MAX:
                raise InvalidRequest(f"fleet report: {version}.{k} must be an integer in [0, {_FLEET_COUNT_MAX}]")
        c = {k: counts.get(k, 0) for k in FleetMetrics.FIELDS}
        if c["agreed"] > c["audited"] or c["escalated"] > c["answers"] or c["unsure"] > c["edge_ran"]:
            raise InvalidRequest(f"fleet report: counts of {version!r} are inconsistent (agreed > audited, "
                                 "escalated > answers or unsure > edge_ran)")
        out[version] = c
    return out


# ----------------------------------------------------------------------------- auth

def check_bearer(header: Optional[str], keys: tuple[bytes, ...]) -> None:
    """Raise :class:`Unauthorized` unless ``header`` is ``Bearer <one of keys>`` (constant-time compare)."""
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    candidate = token.encode()
    ok = False
    for key in keys:  # no early exit: time does not depend on which key matched
        ok |= hmac.compare_digest(candidate, key)
    if not ok:
        raise Unauthorized("invalid API key")


def _bearer_auth(keys: tuple[bytes, ...]):
    async def check(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), keys)

    return check


# ----------------------------------------------------------------------------- errors

def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client left (or the body timeout gave up on it) mid-body: nobody to answer, not a fault.
        log.debug("client disconnected before its body arrived on %s %s", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(DecodeBusy)
    async def _decode_busy(request: Request, exc: DecodeBusy) -> Response:
        # Not the client's fault: other large images hold the decode memory budget (503 + Retry-After).
        return error_response(Overloaded(str(exc), retry_after=1.0))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        # Never FastAPI's 422; the message names the field only.
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return JSONResponse({"error": f"{loc}: {first.get('msg', 'invalid request')}"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return JSONResponse({"error": "internal server error"}, status_code=500)


# ----------------------------------------------------------------------------- ASGI edge

class _ServiceApp(FastAPI):
    """FastAPI whose v2 infer requests skip Starlette's middleware stack.

    py-spy at 64 connections: the layers Starlette/FastAPI wrap around every request
    (``ServerErrorMiddleware``, FastAPI's telemetry and body-limit middlewares, the exception
    middleware, and a ``send`` wrapper per layer) took ~15 % of the event loop's time per infer
    request, doing nothing for it: the infer endpoint answers its own errors (the same table).
    So an infer request goes to ``infer_edge`` (an :class:`_EdgeMiddleware` with the same
    metrics and limits) directly; everything else takes the stack, the edge inside it as before.
    Middleware added after ``create_app`` (Ray Serve adds one) must see every request: then
    infer takes the stack too.
    """

    infer_edge: Optional["_EdgeMiddleware"] = None

    async def __call__(self, scope, receive, send) -> None:
        edge = self.infer_edge
        if (edge is not None and scope["type"] == "http" and len(self.user_middleware) == 1
                and not self.root_path and match_infer(scope["path"]) is not None):
            await edge(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


INFER_ROUTE = "/v2/models/{model_name}/infer"
INFER_VERSION_ROUTE = "/v2/models/{model_name}/versions/{model_version}/infer"


def match_infer(path: str) -> Optional[tuple[str, Optional[str], str]]:
    """``(model, version, route template)`` if ``path`` is a v2 infer path, else ``None``."""
    if not path.startswith("/v2/models/") or not path.endswith("/infer"):
        return None
    parts = path.split("/")  # "", "v2", "models", name, [versions, v,] "infer"
    if len(parts) == 5 and parts[3]:
        return parts[3], None, INFER_ROUTE
    if len(parts) == 7 and parts[3] and parts[4] == "versions" and parts[5]:
        return parts[3], parts[5], INFER_VERSION_ROUTE
    return None


class _EdgeMiddleware:
    """Request metrics by route template, arrival time, the streaming body-size limit, and the infer hot path."""

    def __init__(self, app, metrics: ServiceMetrics, max_body_bytes: int, infer: "_InferEndpoint") -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.infer = infer
        self._cache: dict[tuple[str, int], tuple] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        # A request's budget runs from when its first bytes were read (HardenedHttpProtocol), not
        # from here: under load the loop reaches this call late, and the client's clock is running.
        scope.setdefault("state", {}).setdefault("arrived", started)
        limit = self.max_body
        declared: Optional[int] = None
        authorizations = 0
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and declared is None:
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
            elif name == b"authorization":
                authorizations += 1
        received = 0
        status = 500

        async def limited_receive():
            nonlocal received
            if declared is not None and declared > limit:
                raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        m = self.metrics
        m.in_flight.inc()
        infer = match_infer(scope["path"])
        try:
            if authorizations > 1:
                # Routes disagreed on which one counts (first vs last): refuse the ambiguity everywhere.
                await error_response(InvalidRequest(
                    f"{authorizations} Authorization headers: send exactly one 'Authorization: Bearer <key>'"
                ))(scope, receive, send_status)
            elif infer is not None:
                await self.infer(scope, limited_receive, send_status, infer[0], infer[1])
            else:
                await self.app(scope, limited_receive, send_status)
        finally:
            m.in_flight.dec()
            if infer is not None:
                endpoint = infer[2]
            else:
                route = scope.get("route")
                endpoint = getattr(route, "path", None) or "unmatched"
            counter, latency = self._children(endpoint, status)
            counter.inc()
            latency.observe(time.monotonic() - started)

    def _children(self, endpoint: str, status: int):
        """Label children cached per (route template, status): a bounded set, looked up on every request."""
        key = (endpoint, status)
        children = self._cache.get(key)
        if children is None:
            children = (self.metrics.requests.labels(endpoint, str(status)), self.metrics.request_latency.labels(endpoint))
            self._cache[key] = children
        return children


class _InferEndpoint:
    """``POST /v2/models/{model}[/versions/{v}]/infer`` as a plain ASGI handler.

    The hot path skips FastAPI's routing, dependency and response layers (profiling showed
    them costing more event-loop time than the request's own parsing and encoding); it applies
    the same auth, limits, error table and metrics as every other endpoint.
    """

    def __init__(self, dataplane: DataPlane, keys: tuple[bytes, ...]) -> None:
        self.dataplane = dataplane
        self.keys = keys

    async def __call__(self, scope, receive, send, model_name: str, model_version: Optional[str]) -> None:
        try:
            if scope["method"] != "POST":
                await JSONResponse({"error": "method not allowed: use POST"}, status_code=405,
                                   headers={"Allow": "POST"})(scope, receive, send)
                return
            headers: dict[bytes, bytes] = {}
            for k, v in scope["headers"]:  # the first of each (duplicate Authorization is refused upstream)
                if k in (b"authorization", HEADER_LENGTH_BYTES) and k not in headers:
                    headers[k] = v
            if self.keys:
                auth = headers.get(b"authorization")
                check_bearer(auth.decode("latin-1") if auth is not None else None, self.keys)
            content, extra = await self._infer(scope, receive, model_name, model_version, headers)
        except ServiceError as exc:
            await error_response(exc)(scope, receive, send)
            return
        except _ClientGone:
            return
        except Exception as exc:  # a bug: answer 500 JSON, log the type only (messages may carry data)
            log.error("unhandled %s in infer", type(exc).__name__, exc_info=log.isEnabledFor(logging.DEBUG))
            await JSONResponse({"error": "internal server error"}, status_code=500)(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()),
            (b"content-length", str(len(content)).encode()),
        ]})
        await send({"type": "http.response.body", "body": content})

    async def _infer(self, scope, receive, model_name, model_version, headers) -> tuple[bytes, dict[str, str]]:
        dataplane = self.dataplane
        arrived = scope["state"]["arrived"]
        dataplane.model(model_name, model_version)  # 404 before reading the body of an unknown model
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        raw_length = headers.get(HEADER_LENGTH_BYTES)
        header_length = raw_length.decode("latin-1") if raw_length is not None else None
        if len(body) > 256 * 1024:  # big JSON parses off the loop
            req = await asyncio.to_thread(wire.parse_request, body, header_length)
        else:
            req = wire.parse_request(body, header_length)
        budget = wire.budget_seconds(req)  # finite, positive, at most a day (NaN broke call_later: a 500)
        response = await dataplane.infer(model_name, model_version, req, dataplane.deadline_for(budget, arrived))
        binary = wire.binary_outputs(req)
        rows = response.outputs[0].shape[0] if response.outputs else 0
        if rows > 256:
            return await asyncio.to_thread(wire.render_response, response, binary)
        return wire.render_response(response, binary)


HEADER_LENGTH_BYTES = wire.HEADER_LENGTH.encode()


class _ClientGone(Exception):
    """The client disconnected before sending its whole body: nobody to answer."""


# ----------------------------------------------------------------------------- HTTP protocol

@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 512


HTTP_LIMITS = HttpLimits()
_FD_RESERVE = 64  # descriptors kept for the listening socket, logs, model files, worker threads


def configure_http(settings: ServiceSettings) -> HttpLimits:
    """Set the limits :class:`HardenedHttpProtocol` enforces in this process (``create_app`` calls it).

    A process-wide setting because uvicorn builds protocol instances from its own config, and each
    worker process builds its app (hence these limits) before it accepts a connection. The
    connection cap is kept below the file-descriptor limit: at the limit ``accept()`` fails and
    the service stops answering anyone, health checks included.
    """
    global HTTP_LIMITS
    s = settings.server
    cap = s.limit_concurrency
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if resource is not None else -1
    if soft > 0 and soft != resource.RLIM_INFINITY and cap > soft - _FD_RESERVE:
        log.warning("server.limit_concurrency %d lowered to %d (file-descriptor limit %d)",
                    cap, max(1, soft - _FD_RESERVE), soft)
        cap = max(1, soft - _FD_RESERVE)
    HTTP_LIMITS = HttpLimits(s.max_header_bytes, s.header_timeout_s, s.body_timeout_s, cap)
    return HTTP_LIMITS


def _json_response(status: int, reason: str, message: str, extra: bytes = b"") -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n").encode() + extra + b"\r\n" + body


class HardenedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits uvicorn lacks, enforced per connection.

    uvicorn has a keep-alive timeout but no header-read timeout, no body-read timeout and no
    header size limit for httptools (``h11_max_incomplete_event_size`` applies to h11 only), and
    its ``limit_concurrency`` answers text/plain only after a request's headers arrived, so idle
    sockets still pile up to the file-descriptor limit. This subclass adds, with one
    ``loop.call_later`` timer per phase (the smallest thing that works: no extra task, no
    change to the parsing):

    * header timeout: the request line and headers must arrive within ``header_timeout_s`` of
      the connection (or of the request's first byte on a kept-alive connection) -- slowloris;
    * body timeout: a started body may pause at most ``body_timeout_s`` (a Content-Length larger
      than the body sent no longer hangs the connection forever);
    * header size: more than ``max_header_bytes`` before the end of the headers is answered 431;
    * connection cap: at ``max_connections`` a new connection evicts the connection that has been
      idle longest (no request in progress: waiting for headers, or kept alive after a response),
      which is answered 503 and closed; only if every connection has a request in flight is the
      new one answered 503. Slowloris sockets are thus shed as soon as real clients arrive,
      instead of locking them out until the header timeout;
    * parser errors are answered 400 JSON rather than text.

    Every refusal is ``{"error": ...}`` JSON with ``connection: close``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._limits = HTTP_LIMITS
        self._head_timer: Optional[asyncio.TimerHandle] = None
        self._body_timer: Optional[asyncio.TimerHandle] = None
        self._reading_head = True
        self._head_bytes = 0
        self._heads_seen = 0
        self._refused = False
        self._idle_since: Optional[float] = None  # not None while no request is in progress
        self._received_at = 0.0  # monotonic time of the latest read (data_received)

    # -- connection ----------------------------------------------------------------------
    def connection_made(self, transport) -> None:  # type: ignore[override]
        over = len(self.connections) >= self._limits.max_connections
        super().connection_made(transport)
        self._idle_since = self.loop.time()
        if over and not self._evict_idle():
            self.logger.warning("connection refused: %d connections open, all busy (server.limit_concurrency)",
                                len(self.connections) - 1)
            self._answer(503, "Service Unavailable",
                         "too many open connections; retry shortly", b"retry-after: 1\r\n")
            return
        self._arm_head_timer()

    def _evict_idle(self) -> bool:
        victim: Optional[HardenedHttpProtocol] = None
        for conn in self.connections:
            since = getattr(conn, "_idle_since", None)
            if (conn is not self and since is not None and not conn.transport.is_closing()
                    and (victim is None or since < victim._idle_since)):
                victim = conn
        if victim is None:
            return False
        victim._answer(503, "Service Unavailable", "idle connection closed to make room for another; "
                       "send requests promptly and retry", b"retry-after: 1\r\n")
        return True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.keep_alive and not self.pipeline:
            self._idle_since = self.loop.time()

    def connection_lost(self, exc) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused or self.transport.is_closing():
            return
        self._received_at = time.monotonic()  # a request beginning in this chunk arrived now
        heads = self._heads_seen
        super().data_received(data)
        if heads != self._heads_seen:
            # A head or a message ended inside this chunk: what follows is body or the next head (at
            # most one chunk, so memory stays bounded); the next chunk's bytes count from zero.
            self._head_bytes = 0
        elif self._reading_head and self.parser is not None and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_header_bytes:
                self._answer(431, "Request Header Fields Too Large",
                             f"request line and headers exceed {self._limits.max_header_bytes} bytes")

    def send_400_response(self, msg: str) -> None:
        self._answer(400, "Bad Request", "malformed HTTP request")

    # -- parser callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["state"]["arrived"] = self._received_at
        self._reading_head = True
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._heads_seen += 1
        self._idle_since = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        # Heads that arrived within one read are measured here (data_received sees only unfinished ones).
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self._limits.max_header_bytes:
            self._answer(431, "Request Header Fields Too Large",
                         f"request line and headers exceed {self._limits.max_header_bytes} bytes")
            return
        super().on_headers_complete()
        if self._expects_body():
            self._arm_body_timer()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        super().on_body(body)
        if self._body_timer is not None:
            self._arm_body_timer()

    def on_message_complete(self) -> None:
        if self._refused:
            return
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()
        self._reading_head = True
        self._heads_seen += 1

    # -- internals -----------------------------------------------------------------------
    def _expects_body(self) -> bool:
        for name, value in self.headers:
            if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
                return True
        return False

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._limits.header_timeout_s, self._head_timeout)

    def _arm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self.loop.call_later(self._limits.body_timeout_s, self._body_timeout)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self._answer(408, "Request Timeout",
                         f"request headers not received within {self._limits.header_timeout_s:g}s")
        else:  # a pipelined request's headers are late while a response is still being written
            self.transport.close()

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        started = cycle is not None and cycle.response_started
        if cycle is not None:
            # The app waiting in receive() gets http.disconnect; whatever it sends now is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        if started:
            self.transport.close()
        else:
            self._answer(408, "Request Timeout",
                         f"request body stalled for {self._limits.body_timeout_s:g}s "
                         "(is Content-Length larger than the body?)")

    def _answer(self, status: int, reason: str, message: str, extra: bytes = b"") -> None:
        """Answer at the protocol level and close; nothing more is read from this connection."""
        self._refused = True
        self._cancel_timers()
        if not self.transport.is_closing():
            self.transport.write(_json_response(status, reason, message, extra))
            self.transport.close()
