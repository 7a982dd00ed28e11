"""The FastAPI app: Open Inference Protocol v2 REST, ``/v1/classify``, ``/metrics``.

``create_app(settings)`` builds everything per call (data plane, metrics registry, auth keys);
nothing happens at import time. The lifespan loads and warms up the model before uvicorn
starts serving, so ``/v2/health/ready`` is 200 only after that; on shutdown uvicorn lets
in-flight requests finish (``server.graceful_timeout_s``) and the batcher drains.

The edge of the service is here and only here:

* ``STATUS_BY_ERROR`` maps the data plane's typed errors to HTTP statuses (one table);
  every error answer is ``{"error": "..."}`` -- never FastAPI's default 422 or HTML.
* ``_EdgeMiddleware`` (pure ASGI) counts and times requests by route template, records the
  arrival time (the budget in ``parameters.timeout`` counts from it) and enforces
  ``limits.max_body_bytes`` from ``Content-Length`` *and* while the body streams in.
* Bearer-key auth is a dependency of every route except the health endpoints (and
  ``/metrics`` if ``auth.public_metrics``); keys are compared in constant time.

Nothing here logs request bodies, tensors or keys.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time
from contextlib import asynccontextmanager
from typing import Mapping, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

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
from cloud_service.metrics import ServiceMetrics
from cloud_service.protocol import ProtocolError, budget_from_parameters
from cloud_service.settings import SETTINGS_JSON_ENV, ServiceSettings, load_settings

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
    if status >= 500:
        log.warning("%d %s: %s", status, type(exc).__name__, exc.message)
    else:
        log.debug("%d %s: %s", status, type(exc).__name__, exc.message)
    return JSONResponse({"error": exc.message}, status_code=status, headers=headers)


def create_app(settings: Optional[ServiceSettings] = None, env: Optional[Mapping[str, str]] = None) -> FastAPI:
    """The service as an ASGI app. ``env`` (default ``os.environ``) supplies ``auth.api_keys_env``."""
    settings = settings if settings is not None else ServiceSettings()
    keys = settings.auth.resolve_keys(os.environ if env is None else env)  # SettingsError: fail closed
    metrics = ServiceMetrics()
    dataplane = DataPlane(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await dataplane.start()
        try:
            yield
        finally:
            await dataplane.stop(settings.server.graceful_timeout_s)

    app = FastAPI(
        title="hybrid-router cloud service",
        description="Open Inference Protocol v2 (REST) serving the full-precision Fashion-MNIST classifier.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.dataplane = dataplane
    app.state.metrics = metrics
    app.add_middleware(_EdgeMiddleware, metrics=metrics, max_body_bytes=settings.limits.max_body_bytes)
    _install_error_handlers(app)

    auth = [Depends(_bearer_auth(keys))] if keys else []

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

    async def _infer(request: Request, model_name: str, model_version: Optional[str]) -> Response:
        arrived = request.scope.get("state", {}).get("arrived", time.monotonic())
        dataplane.model(model_name, model_version)  # 404 before reading a body for an unknown model
        body = await request.body()
        header_length = request.headers.get(wire.HEADER_LENGTH)
        if len(body) > 256 * 1024:  # big JSON parses off the loop
            req = await asyncio.to_thread(wire.parse_request, body, header_length)
        else:
            req = wire.parse_request(body, header_length)
        try:
            budget = budget_from_parameters(req.parameters)
        except ProtocolError as exc:
            raise InvalidRequest(str(exc)) from None
        response = await dataplane.infer(model_name, model_version, req, dataplane.deadline_for(budget, arrived))
        binary = wire.binary_outputs(req)
        rows = response.outputs[0].shape[0] if response.outputs else 0
        if rows > 256:
            content, headers = await asyncio.to_thread(wire.render_response, response, binary)
        else:
            content, headers = wire.render_response(response, binary)
        media_type = headers.pop("content-type")
        return Response(content, media_type=media_type, headers=headers)

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

    @api.post("/v2/models/{model_name}/infer")
    async def infer(request: Request, model_name: str) -> Response:
        return await _infer(request, model_name, None)

    @api.post("/v2/models/{model_name}/versions/{model_version}/infer")
    async def infer_version(request: Request, model_name: str, model_version: str) -> Response:
        return await _infer(request, model_name, model_version)

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

    app.include_router(api)

    metrics_router = APIRouter(dependencies=[] if settings.auth.public_metrics else auth)

    @metrics_router.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    app.include_router(metrics_router)
    return app


def create_app_from_environment() -> FastAPI:
    """Factory for uvicorn worker processes: settings from ``$HYBRID_CLOUD_SETTINGS_JSON`` (else defaults + env)."""
    text = os.environ.get(SETTINGS_JSON_ENV)
    settings = ServiceSettings.from_json(text) if text else load_settings()
    return create_app(settings)


# ----------------------------------------------------------------------------- auth

def _bearer_auth(keys: tuple[bytes, ...]):
    async def check(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        candidate = token.encode()
        ok = False
        for key in keys:  # no early exit: time does not depend on which key matched
            ok |= hmac.compare_digest(candidate, key)
        if not ok:
            raise Unauthorized("invalid API key")

    return check


# ----------------------------------------------------------------------------- errors

def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc)

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

class _EdgeMiddleware:
    """Request metrics by route template, arrival time, and the streaming body-size limit."""

    def __init__(self, app, metrics: ServiceMetrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        scope.setdefault("state", {})["arrived"] = started
        limit = self.max_body
        declared: Optional[int] = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                break
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
        try:
            await self.app(scope, limited_receive, send_status)
        finally:
            m.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            m.requests.labels(endpoint, str(status)).inc()
            m.request_latency.labels(endpoint).observe(time.monotonic() - started)
