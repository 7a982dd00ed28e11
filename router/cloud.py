"""The router's Open Inference Protocol v2 client (httpx, async, pooled, keep-alive).

Message building and parsing are pure functions over :mod:`oip.protocol` (the one
wire-protocol module); :class:`CloudClient` is the thin I/O shell around them. It works with any
conforming v2 server -- ours, Triton, KServe, MLServer:

* reads model metadata to learn the input name, datatype and shape; sends the compact UINT8 raw
  pixels when the model takes them, else normalised FP32;
* judges health by status code only (bodies differ across servers), tolerates ``null`` optional
  fields and extra fields;
* carries the request's remaining budget as ``parameters.timeout`` (microseconds, as Triton);
* bounds every attempt by its share of the deadline with ``asyncio.timeout`` (httpx's own
  timeouts are per phase, so they alone could add up past the deadline);
* translates httpx errors and HTTP statuses into the :mod:`router.errors` tree where they enter.

``trust_env=False``: proxy variables in the environment must not reroute requests; the router
talks only to the endpoints its policy names.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from dataclasses import dataclass
from typing import Optional

import httpx
import numpy as np
from pydantic import ValidationError

from edge_model.calibration import calibrated_softmax
from oip.protocol import (
    InferenceResponse,
    ModelMetadataResponse,
    ProtocolError,
    budget_parameters,
    decode_tensor,
    model_path,
)
from router.decision import CloudCall, CloudReply
from router.errors import (
    CloudAuthError,
    CloudError,
    CloudProtocolError,
    CloudRejected,
    CloudServerError,
    CloudTimeout,
    CloudUnavailable,
)
from router.health import EndpointState
from router.policy import CloudSettings, Endpoint

RETRYABLE_STATUS = {502, 503, 504}
# Our service also takes raw UINT8 pixels for its FP32 input; it says so in the model metadata.
UINT8_PARAMETER = "accepts_uint8_pixels"


@dataclass(frozen=True)
class ModelInfo:
    input_name: str
    datatype: str  # what this client will send: "UINT8" or "FP32"
    shape: tuple[int, ...]  # the model's input shape, -1 for the batch dimension
    versions: tuple[str, ...] = ()
    platform: str = ""


# ----------------------------------------------------------------------------- pure parts


def parse_metadata(body: bytes, endpoint: Endpoint) -> ModelInfo:
    try:
        raw = json.loads(body)
        meta = ModelMetadataResponse.model_validate(raw)
    except (ValueError, ValidationError) as exc:
        raise CloudProtocolError(f"model metadata is not valid v2 JSON: {exc}", endpoint=endpoint.label) from None
    if not meta.inputs:
        raise CloudProtocolError("model metadata lists no inputs", endpoint=endpoint.label)
    inp = meta.inputs[0]
    params = raw.get("parameters") or {}
    accepts_uint8 = inp.datatype == "UINT8" or bool(params.get(UINT8_PARAMETER))
    if endpoint.input_datatype == "auto":
        datatype = "UINT8" if accepts_uint8 else "FP32"
    else:
        datatype = endpoint.input_datatype
    if datatype not in ("UINT8", "FP32"):
        raise CloudProtocolError(f"unsupported input datatype {inp.datatype!r}", endpoint=endpoint.label)
    return ModelInfo(inp.name, datatype, tuple(inp.shape), tuple(meta.versions or ()), meta.platform)


def build_infer_body(info: ModelInfo, endpoint: Endpoint, x: np.ndarray, pixels: Optional[np.ndarray],
                     budget_s: float, request_id: str) -> bytes:
    """The v2 request for ``x`` (normalised ``[N,1,H,W]``) or its raw ``pixels`` (``[N,H,W]``)."""
    n = len(x)
    if info.datatype == "UINT8" and pixels is not None:
        data = pixels.reshape(-1).tolist()
        datatype = "UINT8"
    else:
        data = x.reshape(-1).tolist()
        datatype = "FP32"
    tail = [d for d in info.shape[1:]] or [1, 28, 28]
    if int(np.prod(tail)) * n != len(data):  # a model that wants e.g. [N, 784] or [N, 28, 28]
        tail = [int(d) for d in x.shape[1:]]
    body = {
        "id": request_id,
        "parameters": budget_parameters(budget_s),
        "inputs": [{"name": info.input_name, "shape": [n, *tail], "datatype": datatype, "data": data}],
        "outputs": [{"name": endpoint.output_name}],
    }
    return json.dumps(body, separators=(",", ":")).encode()


def parse_infer_response(content: bytes, endpoint: Endpoint, rows: int) -> tuple[np.ndarray, str]:
    try:
        resp = InferenceResponse.model_validate_json(content)
    except ValidationError as exc:
        raise CloudProtocolError(f"response is not a v2 inference response: {_first_error(exc)}", endpoint=endpoint.label) from None
    out = next((o for o in resp.outputs if o.name == endpoint.output_name), None)
    if out is None:
        names = [o.name for o in resp.outputs]
        raise CloudProtocolError(f"response has no output {endpoint.output_name!r} (got {names})", endpoint=endpoint.label)
    try:
        arr = decode_tensor(out).astype(np.float32, copy=False)
    except ProtocolError as exc:
        raise CloudProtocolError(str(exc), endpoint=endpoint.label) from None
    if arr.ndim != 2 or arr.shape[0] != rows:
        raise CloudProtocolError(f"output shape {list(arr.shape)} does not match {rows} rows", endpoint=endpoint.label)
    if not np.isfinite(arr).all():
        raise CloudProtocolError("output contains NaN or infinite values", endpoint=endpoint.label)
    if endpoint.output_kind == "logits":
        arr = calibrated_softmax(arr)
    return arr, resp.model_version or ""


def error_from_status(status: int, headers: httpx.Headers, content: bytes, endpoint: Endpoint) -> CloudError:
    msg = _error_message(content)
    text = f"HTTP {status} from {endpoint.label}" + (f": {msg}" if msg else "")
    if status in (401, 403):
        return CloudAuthError(text, endpoint=endpoint.label, status=status)
    if status in RETRYABLE_STATUS:
        return CloudUnavailable(text, endpoint=endpoint.label, status=status, retry_after=_retry_after(headers))
    if 400 <= status < 500:
        return CloudRejected(text, endpoint=endpoint.label, status=status)
    return CloudServerError(text, endpoint=endpoint.label, status=status)


def translate(exc: BaseException, endpoint: Endpoint) -> CloudError:
    """httpx / asyncio exceptions -> the router's tree."""
    label = endpoint.label
    if isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException)):
        return CloudTimeout(f"{label}: timed out ({type(exc).__name__})", endpoint=label)
    if isinstance(exc, (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError,
                        httpx.CloseError, OSError)):
        return CloudUnavailable(f"{label}: {type(exc).__name__}: {exc or 'connection failed'}", endpoint=label)
    if isinstance(exc, httpx.HTTPError):
        return CloudUnavailable(f"{label}: {type(exc).__name__}: {exc}", endpoint=label)
    return CloudError(f"{label}: unexpected {type(exc).__name__}: {exc}", endpoint=label)


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date: too coarse to plan a sub-second budget around


def _error_message(content: bytes) -> str:
    try:
        body = json.loads(content)
        return str(body.get("error") or body.get("detail") or "")[:300] if isinstance(body, dict) else ""
    except ValueError:
        return content[:200].decode("utf-8", "replace").strip()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


# ----------------------------------------------------------------------------- I/O shell


def _preload_async_stack() -> None:
    """httpx imports its async backend (anyio, h11, httpcore's connection pool) on the first
    request -- ~0.2 s that would land, GIL held, inside the first escalation's deadline and
    block the caller's event loop. Importing opens nothing; it just moves that cost here."""
    import anyio  # noqa: F401
    import h11  # noqa: F401
    import httpcore._async.connection_pool  # noqa: F401
    import httpcore._backends.anyio  # noqa: F401


class CloudClient:
    """Async v2 client over all endpoints of a policy. One pooled ``httpx.AsyncClient`` per event
    loop (the router's own I/O thread, and any loop that calls ``apredict``)."""

    def __init__(self, settings: CloudSettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self._transport = transport
        self._ssl = None
        self.prepare(settings)
        self._clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient]" = weakref.WeakKeyDictionary()

    def prepare(self, settings: CloudSettings) -> None:
        """Adopt (new) settings. Building a verifying SSL context loads the CA bundle -- hundreds of
        milliseconds on a busy machine -- so it happens here, off every request's path, and only
        when an endpoint is https."""
        self.settings = settings
        if settings.endpoints:
            _preload_async_stack()
        if self._ssl is None and any(ep.url.startswith("https://") for ep in settings.endpoints):
            import ssl

            self._ssl = ssl.create_default_context()

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None or client.is_closed:
            s = self.settings
            client = httpx.AsyncClient(
                timeout=httpx.Timeout(s.per_try_timeout_ms / 1000.0, connect=s.connect_timeout_ms / 1000.0),
                limits=httpx.Limits(max_connections=s.max_connections, max_keepalive_connections=s.max_connections),
                transport=self._transport,
                verify=self._ssl if self._ssl is not None else False,  # False: no https endpoint, no TLS at all
                trust_env=False,
                follow_redirects=False,
            )
            self._clients[loop] = client
        return client

    @staticmethod
    def _headers(endpoint: Endpoint) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        key = endpoint.api_key()
        if key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    async def fetch_metadata(self, state: EndpointState, timeout_s: float) -> ModelInfo:
        ep = state.endpoint
        try:
            async with asyncio.timeout(timeout_s):
                r = await self._client().get(
                    ep.url + model_path(ep.model, ep.version), headers=self._headers(ep), timeout=timeout_s
                )
        except Exception as exc:  # noqa: BLE001 -- translated right here
            raise translate(exc, ep) from exc
        if r.status_code != 200:
            raise error_from_status(r.status_code, r.headers, r.content, ep)
        state.meta = parse_metadata(r.content, ep)
        return state.meta

    async def ready(self, state: EndpointState, timeout_s: float) -> bool:
        """``GET /v2/health/ready`` judged by status code only, as the protocol advises."""
        ep = state.endpoint
        try:
            async with asyncio.timeout(timeout_s):
                r = await self._client().get(ep.url + "/v2/health/ready", timeout=timeout_s)
            return r.status_code == 200
        except Exception:  # noqa: BLE001 -- any failure means "not ready"
            return False

    async def infer(self, call: CloudCall) -> CloudReply | CloudError:
        """One attempt; returns the reply or the translated error (never raises a foreign error).
        Rows beyond the endpoint's ``max_batch_size`` go as concurrent requests of that size."""
        ep = call.state.endpoint
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(call.timeout_s):
                info = call.state.meta or await self.fetch_metadata(call.state, call.timeout_s)
                t_post = time.monotonic()  # the latency estimate is of inference calls, not the metadata read
                size = ep.max_batch_size or len(call.x)
                parts = await asyncio.gather(*(
                    self._post(info, ep, call.x[i:i + size], None if call.pixels is None else call.pixels[i:i + size],
                               call.budget_s, call.request_id if size >= len(call.x) else f"{call.request_id}.{i // size}",
                               call.timeout_s)
                    for i in range(0, len(call.x), size)
                ))
            probs = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
            version = parts[0][1] or (info.versions[0] if info.versions else ep.version or "")
            return CloudReply(probs, version, time.monotonic() - t_post, sum(p[2] for p in parts))
        except CloudError as exc:
            err = exc
        except Exception as exc:  # noqa: BLE001 -- httpx, OSError, TimeoutError: translated here
            err = translate(exc, ep)
        err.elapsed_s = time.monotonic() - t0
        return err

    async def _post(self, info: ModelInfo, ep: Endpoint, x, pixels, budget_s: float, request_id: str,
                    timeout_s: float) -> tuple[np.ndarray, str, int]:
        body = build_infer_body(info, ep, x, pixels, budget_s, request_id)
        r = await self._client().post(
            ep.url + model_path(ep.model, ep.version) + "/infer",
            content=body, headers=self._headers(ep), timeout=timeout_s,
        )
        if r.status_code != 200:
            raise error_from_status(r.status_code, r.headers, r.content, ep)
        probs, version = parse_infer_response(r.content, ep, len(x))
        return probs, version, len(body)

    async def aclose(self) -> None:
        for client in list(self._clients.values()):
            await client.aclose()
        self._clients.clear()
