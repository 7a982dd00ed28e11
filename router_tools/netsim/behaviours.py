"""How the fault server answers one request. Build behaviours with the factories::

    status(503, headers={"Retry-After": "1"})     status(401, {"error": "bad key"})
    garbage("text" | "html" | "invalid_json" | "wrong_schema" | "wrong_shape" | "truncated" | "empty")
    slow(2.0, then=status(200, {...}))            blackhole()       close() / close(reset=True)
    sequence([503, 503], then=proxy_to("127.0.0.1", cloud_port))     # 503 twice, then the real thing
    proxy_to(host, port)                          model_metadata(...)   infer_ok([...])

``then=None`` (for ``slow``/``sequence``) means the route's default: the upstream when the
server has one, else the built-in answer. A behaviour is awaited as ``respond(ctx)`` and returns
whether the connection may be kept alive.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence as Seq

from .errors import NetsimError
from .http1 import HOP_BY_HOP, HttpError, Request, read_response, render_request, render_response
from ._service import abort_writer, connect_loopback, parse_upstream

if TYPE_CHECKING:
    from .faultserver import Context

GARBAGE_KINDS = ("text", "html", "invalid_json", "wrong_schema", "wrong_shape", "truncated", "empty")


class Behaviour:
    """Base class: answer ``ctx.request`` on ``ctx.writer``; return True to keep the connection."""

    async def respond(self, ctx: "Context") -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__.lower()


def _as_behaviour(b: "Behaviour | int | None") -> Optional[Behaviour]:
    if b is None or isinstance(b, Behaviour):
        return b
    if isinstance(b, int) and not isinstance(b, bool):
        return status(b)
    raise NetsimError(f"not a behaviour: {b!r} (use status(), garbage(), slow(), ...)")


# ----------------------------------------------------------------------------- plain answers

@dataclass(frozen=True)
class Status(Behaviour):
    code: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    async def respond(self, ctx: "Context") -> bool:
        return await ctx.send(self.code, self.body, self.headers)

    def describe(self) -> str:
        return f"status {self.code}"


def _encode_body(body: Any, headers: dict[str, str], code: int) -> bytes:
    lower = {k.lower() for k in headers}
    if body is None:
        if code < 400:
            return b""
        body = {"error": f"injected fault: HTTP {code}"}
    if isinstance(body, (dict, list)):
        if "content-type" not in lower:
            headers["Content-Type"] = "application/json"
        return json.dumps(body).encode()
    if isinstance(body, str):
        if "content-type" not in lower:
            headers["Content-Type"] = "text/plain; charset=utf-8"
        return body.encode()
    if isinstance(body, (bytes, bytearray)):
        if "content-type" not in lower:
            headers["Content-Type"] = "application/octet-stream"
        return bytes(body)
    raise NetsimError(f"status body must be dict, list, str, bytes or None, got {type(body).__name__}")


def status(code: int, body: Any = None, headers: Optional[Mapping[str, str]] = None) -> Status:
    """Answer ``code`` with ``body`` (dict/list -> JSON; None -> ``{"error": ...}`` for >= 400)."""
    if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
        raise NetsimError(f"HTTP status must be 100..599, got {code!r}")
    hdrs = dict(headers or {})
    raw = _encode_body(body, hdrs, code)
    return Status(code, raw, tuple((str(k), str(v)) for k, v in hdrs.items()))


@dataclass(frozen=True)
class Garbage(Behaviour):
    kind: str = "text"

    async def respond(self, ctx: "Context") -> bool:
        k = self.kind
        if k == "text":
            return await ctx.send(200, b"this is not JSON", (("Content-Type", "text/plain"),))
        if k == "html":
            return await ctx.send(200, b"<html><body>502 Bad Gateway</body></html>", (("Content-Type", "text/html"),))
        if k == "invalid_json":
            return await ctx.send(200, b'{"model_name": "cloud", "outputs": [', (("Content-Type", "application/json"),))
        if k == "wrong_schema":
            return await ctx.send(200, b'{"result": "ok", "predictions": "not a v2 response"}',
                                  (("Content-Type", "application/json"),))
        if k == "wrong_shape":
            body = {"model_name": "cloud", "model_version": "1", "outputs": [
                {"name": "probabilities", "shape": [1, 10], "datatype": "FP32", "data": [0.5, 0.25, 0.25]}]}
            return await ctx.send(200, json.dumps(body).encode(), (("Content-Type", "application/json"),))
        if k == "empty":
            return await ctx.send(200, b"", (("Content-Type", "application/json"),))
        # truncated: promise more than is sent, then close
        part = b'{"model_name": "cloud", "outputs": [{"name": "probabilities"'
        ctx.writer.write(render_response(200, part, (("Content-Type", "application/json"),),
                                         keep_alive=False, content_length=len(part) + 200))
        await ctx.writer.drain()
        ctx.writer.close()
        return False

    def describe(self) -> str:
        return f"garbage {self.kind}"


def garbage(kind: str = "text") -> Garbage:
    if kind not in GARBAGE_KINDS:
        raise NetsimError(f"unknown garbage kind {kind!r} (known: {', '.join(GARBAGE_KINDS)})")
    return Garbage(kind)


# ----------------------------------------------------------------------------- connection-level faults

@dataclass(frozen=True)
class Slow(Behaviour):
    seconds: float
    then: Optional[Behaviour] = None

    async def respond(self, ctx: "Context") -> bool:
        await asyncio.sleep(self.seconds)
        return await (self.then or ctx.fallback).respond(ctx)

    def describe(self) -> str:
        return f"slow {self.seconds:g}s then {(self.then.describe() if self.then else 'default')}"


def slow(seconds: float, then: "Behaviour | int | None" = None) -> Slow:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise NetsimError(f"slow(): seconds must be >= 0, got {seconds!r}")
    return Slow(float(seconds), _as_behaviour(then))


class Blackhole(Behaviour):
    """Read the request (and anything after it), never answer; hold the connection open."""

    async def respond(self, ctx: "Context") -> bool:
        try:
            while await ctx.reader.read(65536):
                pass
        except (ConnectionError, OSError):
            pass
        return False


def blackhole() -> Blackhole:
    return Blackhole()


@dataclass(frozen=True)
class Close(Behaviour):
    """Close the connection without answering (FIN; or RST with ``reset=True``)."""

    reset: bool = False

    async def respond(self, ctx: "Context") -> bool:
        if self.reset:
            abort_writer(ctx.writer)
        else:
            ctx.writer.close()
        return False

    def describe(self) -> str:
        return "reset" if self.reset else "close"


def close(reset: bool = False) -> Close:
    return Close(reset)


class Sequence(Behaviour):
    """The i-th request answered by ``steps[i]``; once they are used up, by ``then`` forever."""

    def __init__(self, steps: Iterable["Behaviour | int"], then: "Behaviour | int | None" = None) -> None:
        self.steps: tuple[Behaviour, ...] = tuple(_as_behaviour(s) for s in steps)  # type: ignore[misc]
        if any(s is None for s in self.steps):
            raise NetsimError("sequence(): steps must be behaviours or status codes")
        self.then = _as_behaviour(then)
        self.calls = 0  # only touched on the server's loop

    async def respond(self, ctx: "Context") -> bool:
        i = self.calls
        self.calls += 1
        step = self.steps[i] if i < len(self.steps) else (self.then or ctx.fallback)
        return await step.respond(ctx)

    def describe(self) -> str:
        then = self.then.describe() if self.then else "default"
        return f"sequence [{', '.join(s.describe() for s in self.steps)}] then {then}"


def sequence(steps: Seq["Behaviour | int"], then: "Behaviour | int | None" = None) -> Sequence:
    return Sequence(steps, then)


# ----------------------------------------------------------------------------- healthy answers

@dataclass(frozen=True)
class ProxyTo(Behaviour):
    """Forward the request to a real loopback HTTP server and relay its answer (502/504 when it
    cannot be reached / does not answer in ``timeout`` seconds)."""

    host: str
    port: int
    timeout: float = 30.0

    async def respond(self, ctx: "Context") -> bool:
        req = ctx.request
        try:
            reader, writer = await connect_loopback(self.host, self.port, self.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            return await ctx.send(502, json.dumps({"error": f"upstream unavailable: {exc!r}"}).encode(),
                                  (("Content-Type", "application/json"),))
        try:
            writer.write(render_request(req.method, req.target, f"{self.host}:{self.port}", req.headers, req.body))
            resp = await asyncio.wait_for(read_response(reader, ctx.max_body, method=req.method), self.timeout)
        except asyncio.TimeoutError:
            return await ctx.send(504, b'{"error": "upstream timed out"}', (("Content-Type", "application/json"),))
        except (HttpError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError) as exc:
            return await ctx.send(502, json.dumps({"error": f"bad upstream answer: {exc!r}"}).encode(),
                                  (("Content-Type", "application/json"),))
        finally:
            writer.close()
        headers = tuple((k, v) for k, v in resp.headers if k.lower() not in HOP_BY_HOP)
        return await ctx.send(resp.status, resp.body, headers)

    def describe(self) -> str:
        return f"proxy to {self.host}:{self.port}"


def proxy_to(host: "str | tuple[str, int]", port: Optional[int] = None, timeout: float = 30.0) -> ProxyTo:
    h, p = parse_upstream((host, port) if port is not None else host)  # type: ignore[arg-type]
    return ProxyTo(h, p, timeout)


DEFAULT_INPUTS = ({"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]},)
DEFAULT_OUTPUTS = ({"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},)


@dataclass(frozen=True)
class ModelMetadata(Behaviour):
    """A v2 model-metadata answer; the model name is taken from the request path."""

    inputs: tuple = DEFAULT_INPUTS
    outputs: tuple = DEFAULT_OUTPUTS
    platform: str = "onnx_onnxv1"
    versions: tuple = ("1",)

    async def respond(self, ctx: "Context") -> bool:
        name = ctx.model or "model"
        body = {"name": name, "versions": list(self.versions), "platform": self.platform,
                "inputs": [dict(t) for t in self.inputs], "outputs": [dict(t) for t in self.outputs]}
        return await ctx.send(200, json.dumps(body).encode(), (("Content-Type", "application/json"),))


def model_metadata(inputs: Optional[Seq[Mapping[str, Any]]] = None, outputs: Optional[Seq[Mapping[str, Any]]] = None,
                   platform: str = "onnx_onnxv1", versions: Seq[str] = ("1",)) -> ModelMetadata:
    return ModelMetadata(tuple(dict(t) for t in (inputs or DEFAULT_INPUTS)),
                         tuple(dict(t) for t in (outputs or DEFAULT_OUTPUTS)), platform, tuple(versions))


@dataclass(frozen=True)
class InferOk(Behaviour):
    """A well-formed v2 inference answer: ``probabilities`` for every item of the request's batch
    (batch size from the first input's shape). For tests that need a healthy cloud without one."""

    probabilities: tuple[float, ...]
    output_name: str = "probabilities"
    model_version: str = "fault-server"

    async def respond(self, ctx: "Context") -> bool:
        try:
            payload = json.loads(ctx.request.body or b"{}")
            shape = payload["inputs"][0]["shape"]
            batch = int(shape[0]) if shape else 1
        except (ValueError, KeyError, IndexError, TypeError):
            return await ctx.send(400, b'{"error": "not a v2 inference request"}', (("Content-Type", "application/json"),))
        body: dict[str, Any] = {"model_name": ctx.model or "model", "model_version": self.model_version,
                                "outputs": [{"name": self.output_name, "shape": [batch, len(self.probabilities)],
                                             "datatype": "FP32", "data": list(self.probabilities) * batch}]}
        if isinstance(payload.get("id"), str):
            body["id"] = payload["id"]
        return await ctx.send(200, json.dumps(body).encode(), (("Content-Type", "application/json"),))


def infer_ok(probabilities: Optional[Seq[float]] = None, output_name: str = "probabilities") -> InferOk:
    probs = tuple(float(p) for p in (probabilities if probabilities is not None else [1.0] + [0.0] * 9))
    if not probs:
        raise NetsimError("infer_ok(): probabilities must not be empty")
    return InferOk(probs, output_name)
