"""The router's Open Inference Protocol v2 client (pooled, keep-alive): async over httpcore's
async pool for ``apredict`` and the I/O thread (httpx's client only for an injected transport
and the readiness probe); synchronous over httpcore's pool in the caller's thread for
``predict`` (:meth:`CloudClient.infer_sync`, no event loop and no thread hop). A request's
headers and body leave in one send.

Message building and parsing are pure functions over :mod:`oip.protocol` (the one
wire-protocol module); :class:`CloudClient` is the thin I/O shell around them. It works with any
conforming v2 server -- ours, Triton, KServe, MLServer:

* reads model metadata to learn the input name, datatype and shape; sends the compact UINT8 raw
  pixels when the model takes them, else normalised FP32; pixels are arranged in the endpoint's
  layout (NCHW/NHWC) and channel order (RGB/BGR, when the server publishes it); for a model of
  another input size or channel count they are made from the caller's images at its size
  (:func:`plan_input`); an FP32-only server of another geometry is refused as incompatible at
  the first contact -- never sent pixels it would read in the wrong order;
* judges health by status code only (bodies differ across servers), tolerates ``null`` optional
  fields and extra fields;
* carries the request's remaining budget as ``parameters.timeout`` (microseconds, as Triton);
* bounds every attempt by its share of the deadline with ``asyncio.timeout`` (httpx's own
  timeouts are per phase, so they alone could add up past the deadline); a sync attempt cuts
  each socket operation (connect, TLS, write, read, pool wait) to the attempt's absolute end;
* translates httpx errors and HTTP statuses into the :mod:`router.errors` tree where they enter;
* compares the labels a server publishes in its model metadata (``parameters.labels_json``,
  ``labels_sha256`` or ``labels``) with the edge's at the first contact: a mismatch makes the
  endpoint :class:`CloudIncompatible` (naming both label sets) until its metadata is read again,
  so no answer is ever given under another model's class names (``labels_check`` in the policy).

* validates every answer against what is possible: the edge's class count, probabilities in
  [0, 1] summing to 1, log-probabilities <= 0, finite logits -- anything else is a
  :class:`CloudProtocolError` (a failure for the breaker), never an answer;
* reads bodies as a stream under a size cap derived from the expected output (or the endpoint's
  ``max_response_bytes``), so an oversized answer costs neither memory nor the deadline.

Trust comes from the policy only. ``trust_env=False`` and an explicit ``ssl.SSLContext`` per
(verify, CA bundle): proxy variables, ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` change nothing (httpx
and OpenSSL's default paths read those when given ``verify=True``; certifi's bundle does not).
Pooled clients are keyed by everything that decides trust (scheme, host, verify, CA bundle and
its file stamp), so a policy reload from http to https, or to another bundle, gets a new client
built with the same guarantees. An API key never goes over plain http to a non-loopback host
(refused at policy load, and checked again here).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import socket
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Optional

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
    CloudGatewayError,
    CloudIncompatible,
    CloudOverloaded,
    CloudProtocolError,
    CloudRejected,
    CloudServerError,
    CloudTimeout,
    CloudTLSError,
    CloudUnavailable,
)
from router.health import EndpointState
from router.policy import CloudSettings, Endpoint, is_loopback_url

log = logging.getLogger("router.cloud")


class _Httpx:
    """The ``httpx`` module, imported at its first use: :meth:`CloudClient.prepare` does that at
    construction when the policy has endpoints (so no request pays for it); a router without
    endpoints, or under privacy, never loads the network stack (httpx pulls in its CLI's
    rich/pygments/click when they are installed: ~0.1 s of a cold start)."""

    def __getattr__(self, name: str):
        return getattr(_import_httpx(), name)


httpx = _Httpx()


def _import_httpx():
    """The ``httpx`` module, without its command-line client. httpx's ``__init__`` imports
    ``httpx._main`` (rich, click, pygments: ~50 ms) whenever those happen to be installed (here
    by the tools and tests; a client-only install lacks them). The router never runs that CLI, so
    while httpx loads a stand-in takes ``httpx._main``'s place whose ``main`` imports the real one
    when called: ``httpx.main()`` still works, and ``import httpx._main`` later loads the real
    module. Nothing changes if httpx was already imported."""
    import sys

    mod = sys.modules.get("httpx")
    if mod is not None:
        return mod
    import types

    def main(*args, **kwargs):  # httpx.main (the httpx console script's target), loaded on call
        from httpx._main import main as cli

        return cli(*args, **kwargs)

    stand_in = types.ModuleType("httpx._main")
    stand_in.main = main
    sys.modules.setdefault("httpx._main", stand_in)
    try:
        import httpx
    finally:
        if sys.modules.get("httpx._main") is stand_in:
            del sys.modules["httpx._main"]
    return httpx

OVERLOADED_STATUS = {429, 503}
GATEWAY_STATUS = {502, 504}
# Response caps: JSON spends at most ~32 bytes on one float ("-1.2345678901234567e-05, "), plus
# room for names, shapes and the id. Unknown class count (a tool that did not say): assume many.
BYTES_PER_VALUE = 32
RESPONSE_SLACK = 16 * 1024
MIN_RESPONSE_CAP = 64 * 1024
CLASSES_IF_UNKNOWN = 1000
METADATA_CAP = 1024 * 1024
ERROR_BODY_CAP = 64 * 1024  # an error body is only read for its message
ASYNC_KEEPALIVE_S = 5.0  # idle pooled connections of the async client are dropped after this (httpx's default)
# A probability row may miss 1 by float32 rounding of JSON decimals (and servers that round to
# 4-6 digits); anything beyond this is not a distribution.
PROB_SUM_TOL = 1e-3
PROB_RANGE_TOL = 1e-6
# Our service also takes raw UINT8 pixels for its FP32 input; it says so in the model metadata.
UINT8_PARAMETER = "accepts_uint8_pixels"


@dataclass(frozen=True)
class ModelInfo:
    input_name: str
    datatype: str  # what this client will send: "UINT8" or "FP32"
    shape: tuple[int, ...]  # the model's input shape, -1 for the batch dimension
    versions: tuple[str, ...] = ()
    platform: str = ""
    labels: Optional[tuple[str, ...]] = None  # what the server published, if anything
    labels_sha256: Optional[str] = None
    incompatible: Optional[str] = None  # why this endpoint's model cannot answer for the edge's labels
    color: Optional[str] = None  # the pixels' channel order the server publishes (L, RGB, BGR), if any
    preprocess: Optional[dict] = None  # how the server resizes (resize, interpolation, crop_fraction, invert)
    axes: Optional[tuple[int, ...]] = None  # transpose of the edge's [N, ...] input into the endpoint's layout
    flip_axis: Optional[int] = None  # reverse this axis (RGB <-> BGR) after ``axes``
    # A model of another input size or channel count: its pixels are made from the caller's images
    # with this config (edge_model.preprocess.PreprocessConfig), sent in this shape (no batch dim).
    pixels_config: Optional[object] = None
    pixels_tail: Optional[tuple[int, ...]] = None


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
    if inp.datatype in ("INT64", "INT32"):
        datatype = inp.datatype  # a tensor model (token ids, ...): sent as the app gave it
    elif endpoint.input_datatype == "auto":
        datatype = "UINT8" if accepts_uint8 else "FP32"
    else:
        datatype = endpoint.input_datatype
    if datatype not in ("UINT8", "FP32", "INT64", "INT32"):
        raise CloudProtocolError(f"unsupported input datatype {inp.datatype!r}", endpoint=endpoint.label)
    labels = None
    if isinstance(params.get("labels_json"), str):
        with contextlib.suppress(ValueError):
            parsed = json.loads(params["labels_json"])
            if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
                labels = tuple(parsed)
    elif isinstance(params.get("labels"), str) and params["labels"]:
        labels = tuple(params["labels"].split(","))  # older servers: comma-joined
    digest = params.get("labels_sha256") if isinstance(params.get("labels_sha256"), str) else None
    color = params.get("color") if params.get("color") in ("L", "RGB", "BGR") else None
    preprocess = None
    if isinstance(params.get("preprocess_json"), str):
        with contextlib.suppress(ValueError):
            parsed = json.loads(params["preprocess_json"])
            preprocess = parsed if isinstance(parsed, dict) else None
    return ModelInfo(inp.name, datatype, tuple(inp.shape), tuple(meta.versions or ()), meta.platform, labels, digest,
                     color=color, preprocess=preprocess)


def plan_input(info: ModelInfo, edge) -> ModelInfo | str:
    """``info`` with how the edge's input is arranged for this endpoint, or why it cannot be.

    ``edge``: the edge's ``PreprocessConfig`` (or a ``(sample_shape, layout, color)`` tuple;
    ``None``: a tensor model, sent as the app gave it). The endpoint's sample shape is its metadata
    shape without the batch dimension (``-1`` matches any size).
    * Same geometry: the edge's pixels as they are.
    * The other layout of the same channels and size: transposed; another channel order (the
      server says RGB or BGR): reversed.
    * Another size or channel count, at an endpoint taking UINT8 pixels: each request's pixels are
      made from the caller's images at the endpoint's size, channels and layout (resize policy as
      the server publishes it, else the edge's) -- the edge's small pixels are never upscaled.
    * Otherwise (an FP32-only server of another geometry: its normalisation is unknown): refused,
      naming both shapes.
    A flat or squeezed tail of the same element count (``[N, 784]`` for a 1-channel 28x28 model)
    is sent in the edge's order, as before."""
    if edge is None or info.datatype in ("INT64", "INT32") or len(info.shape) < 2:
        return info
    cfg = None if isinstance(edge, tuple) else edge
    if cfg is not None:
        if getattr(cfg, "codec", "image") == "tensor":
            return info
        edge = (cfg.sample_shape, cfg.layout, cfg.color)
    (shape, layout, color), tail = edge, tuple(info.shape[1:])
    c = 1 if color == "L" else 3
    h, w = (shape[1], shape[2]) if layout == "NCHW" else (shape[0], shape[1])

    def fits(want: tuple[int, ...]) -> bool:
        return len(want) == len(tail) and all(t in (-1, None) or t == v for t, v in zip(tail, want))

    nchw, nhwc = (c, h, w), (h, w, c)
    if fits(shape):
        axes, channel_axis = None, (1 if layout == "NCHW" else 3)
    elif fits(nhwc if layout == "NCHW" else nchw):
        axes = (0, 2, 3, 1) if layout == "NCHW" else (0, 3, 1, 2)
        channel_axis = 3 if layout == "NCHW" else 1
    elif c == 1 and all(t not in (-1, None) for t in tail) and int(np.prod(tail)) == h * w:
        return info  # [N, H, W], [N, H*W], ...: one channel has one order
    else:
        made = _endpoint_pixels_config(info, tail, cfg) if info.datatype == "UINT8" and cfg is not None else None
        if made is None:
            return (f"it takes input {[-1, *tail]}; the edge model makes {[-1, *shape]} ({layout} {color}): "
                    "serve a cloud model with the edge's input size and channel count, or one that takes "
                    "UINT8 pixels")
        return ModelInfo(**{**info.__dict__, "pixels_config": made[0], "pixels_tail": made[1]})
    flip = channel_axis if c == 3 and info.color in ("RGB", "BGR") and info.color != color else None
    return ModelInfo(**{**info.__dict__, "axes": axes, "flip_axis": flip})


def _endpoint_pixels_config(info: ModelInfo, tail: tuple, edge_cfg):
    """``(PreprocessConfig, tail)`` making an endpoint's UINT8 pixels from the caller's images, or
    None when its input is not an image shape: ``[H, W]``, ``[C, H, W]`` or ``[H, W, C]``, C 1 or 3;
    a dynamic size takes the edge's."""
    from edge_model.preprocess import PreprocessConfig

    dims = [None if t in (-1, None) else int(t) for t in tail]
    if len(dims) == 2:
        c, h, w, layout = 1, dims[0], dims[1], "NCHW"
    elif len(dims) == 3 and dims[0] in (1, 3):
        c, h, w, layout = dims[0], dims[1], dims[2], "NCHW"
    elif len(dims) == 3 and dims[2] in (1, 3):
        h, w, c, layout = dims[0], dims[1], dims[2], "NHWC"
    else:
        return None
    h, w = h or edge_cfg.height, w or edge_cfg.width
    if c == 1:
        color = "L"
    else:
        color = info.color if info.color in ("RGB", "BGR") else (edge_cfg.color if edge_cfg.color != "L" else "RGB")
    published = {k: v for k, v in (info.preprocess or {}).items()
                 if k in ("resize", "interpolation", "crop_fraction", "invert")}
    try:
        made = PreprocessConfig(**{**edge_cfg.__dict__, **published, "height": h, "width": w, "color": color,
                                   "layout": layout, "mean": 0.0, "std": 1.0})
    except (TypeError, ValueError):
        return None
    out = tuple(d if d is not None else v for d, v in zip(dims, (h, w) if len(dims) == 2 else made.sample_shape))
    return made, out


def endpoint_pixels(info: ModelInfo, images, label: str) -> np.ndarray:
    """The UINT8 pixels an endpoint of another input size takes, made from the caller's images."""
    from edge_model.preprocess import to_pixels

    if images is None:
        raise CloudIncompatible(f"{label}: its model takes {[-1, *info.pixels_tail]} pixels, made from the "
                                "caller's images; a normalised float input has none", endpoint=label)
    try:
        return np.stack([to_pixels(im, info.pixels_config) for im in images])
    except Exception as exc:  # noqa: BLE001 -- the edge took this input; say why this endpoint cannot
        raise CloudIncompatible(f"{label}: cannot make its {[-1, *info.pixels_tail]} pixels: {exc}",
                                endpoint=label) from None


def check_labels(info: ModelInfo, endpoint: Endpoint, edge_labels) -> Optional[CloudIncompatible]:
    """The refusal when the server's published labels are not the edge's (``None``: compatible).

    ``labels_check`` (per endpoint): ``off`` checks nothing; ``require`` refuses a server that
    publishes no labels; ``warn`` (and the default for such servers) logs it and goes on. A
    mismatch is always refused unless ``off``: an answer would name the wrong class."""
    mode = getattr(endpoint, "labels_check", None)
    if mode == "off" or edge_labels is None:
        return None
    edge = tuple(edge_labels)
    if info.labels is None and info.labels_sha256 is None:
        if mode == "require":
            return CloudIncompatible(f"{endpoint.label}: the server publishes no labels in its model metadata and "
                                     "labels_check is require; publish them or set labels_check: warn",
                                     endpoint=endpoint.label)
        log.warning("cloud endpoint %r publishes no labels: its answers are taken to use the edge's %d labels "
                    "(labels_check: require to refuse such servers)", endpoint.label, len(edge))
        return None
    if info.labels is not None:
        same = info.labels == edge or (",".join(info.labels) == ",".join(edge))  # comma-joined: commas in names
        server = list(info.labels)
    else:
        from edge_model.manifest import labels_digest

        same = info.labels_sha256 == labels_digest(edge)
        server = f"sha256 {info.labels_sha256[:12]}..."
    if same:
        return None
    return CloudIncompatible(f"{endpoint.label}: the server's model has labels {_show(server)} but the edge model has "
                             f"{_show(list(edge))}; not used (deploy matching models, or labels_check: off)",
                             endpoint=endpoint.label)


def _show(labels) -> str:
    if isinstance(labels, str) or len(labels) <= 12:
        return str(labels)
    return f"{labels[:10]} ... ({len(labels)} labels)"


def build_infer_body(info: ModelInfo, endpoint: Endpoint, x: np.ndarray, pixels: Optional[np.ndarray],
                     budget_s: float, request_id: str) -> bytes:
    """The v2 request for ``x`` (normalised ``[N,1,H,W]``) or its raw ``pixels`` (``[N,H,W]``)."""
    n = len(x)
    if info.pixels_config is not None:  # pixels made for this endpoint (endpoint_pixels)
        return _infer_json(request_id, budget_s, info.input_name, [n, *info.pixels_tail], "UINT8", pixels,
                           endpoint.output_name)
    if info.datatype == "UINT8" and pixels is not None:
        arr, datatype = pixels.reshape(x.shape), "UINT8"  # in the edge's sample shape, as x
    elif x.dtype.kind in "iu":  # a uint8-input model's pixels, or a tensor model's integers
        arr, datatype = x, {"uint8": "UINT8", "int32": "INT32"}.get(x.dtype.name, "INT64")
    else:
        arr, datatype = x, "FP32"
    if info.axes is not None:  # into the endpoint's layout (plan_input)
        arr = arr.transpose(info.axes)
    if info.flip_axis is not None:  # RGB <-> BGR
        arr = np.flip(arr, axis=info.flip_axis)
    size = arr.size
    tail = [int(d) for d in arr.shape[1:]] if info.axes is not None else ([d for d in info.shape[1:]] or [1, 28, 28])
    if -1 in tail or math.prod(tail) * n != size:  # a model that wants e.g. [N, 784] or [N, 28, 28]
        tail = [int(d) for d in x.shape[1:]]
    return _infer_json(request_id, budget_s, info.input_name, [n, *tail], datatype, arr, endpoint.output_name)


def _infer_json(request_id: str, budget_s: float, name: str, shape: list, datatype: str, arr: np.ndarray,
                output_name: str) -> bytes:
    """The compact JSON of a one-input v2 request: byte for byte what ``json.dumps`` of the
    request dict writes (``separators=(",", ":")``), without building an encoder per part."""
    params = ",".join(f"{_json_str(k)}:{int(v)}" for k, v in budget_parameters(budget_s).items())
    head = (f'{{"id":{_json_str(request_id)},"parameters":{{{params}}},"inputs":[{{"name":{_json_str(name)},'
            f'"shape":[{",".join(str(int(d)) for d in shape)}],"datatype":{_json_str(datatype)},"data":[')
    tail = f']}}],"outputs":[{{"name":{_json_str(output_name)}}}]}}'
    return b"".join((head.encode(), _json_numbers(arr), tail.encode()))


_json_str = json.encoder.encode_basestring_ascii  # how json.dumps writes a str (ensure_ascii, C)


# Each byte value's JSON digits and a comma, zero-padded to 4 bytes, as one uint32 (see _json_numbers).
_U8_JSON = np.zeros((256, 4), np.uint8)
for _v in range(256):
    _U8_JSON[_v, :len(str(_v)) + 1] = np.frombuffer(f"{_v},".encode(), np.uint8)
_U8_JSON = _U8_JSON.view(np.uint32).reshape(-1)
del _v


def _json_numbers(arr: np.ndarray) -> bytes:
    """``arr``'s values in row-major order as JSON numbers joined by commas (a JSON array's inside).
    UINT8 pixels by a table lookup, dropping the padding: a tenth of json.dumps's time for an
    image (a list of 784 ints). Anything else as json.dumps writes it."""
    if arr.dtype == np.uint8:
        return _U8_JSON.take(arr.reshape(-1)).tobytes().replace(b"\0", b"")[:-1]
    return json.dumps(arr.reshape(-1).tolist(), separators=(",", ":")).encode()[1:-1]


def _body_limit(ep: Endpoint, ok: bool, cap: int, declared) -> int:
    """Bytes of a response body to read: ``cap`` for a 200 (refused at once when its
    Content-Length says more), at most ERROR_BODY_CAP of an error (only its message is wanted)."""
    limit = cap if ok else min(cap, ERROR_BODY_CAP)
    if isinstance(declared, bytes):
        declared = declared.decode("latin-1")
    if ok and declared is not None and declared.isdigit() and int(declared) > limit:
        raise CloudProtocolError(f"{ep.label}: response of {int(declared)} bytes exceeds the {limit}-byte cap "
                                 "(max_response_bytes)", endpoint=ep.label)
    return limit


async def _read_async(chunks, limit: int) -> bytearray:
    """A streamed body (an async iterator of bytes) until it ends or passes ``limit`` bytes. The
    loop is left by break, not raise, and the generator closed here: an exception's traceback
    would keep it alive until some other thread drops it."""
    buf = bytearray()
    async with contextlib.aclosing(chunks) as stream:
        async for chunk in stream:
            buf += chunk
            if len(buf) > limit:
                break
    return buf


def _cut(ep: Endpoint, ok: bool, buf: bytearray, limit: int) -> None:
    """A body read past ``limit``: a 200 is refused, an error body is cut there."""
    if len(buf) > limit:
        if ok:
            raise CloudProtocolError(f"{ep.label}: response exceeds the {limit}-byte cap (max_response_bytes)",
                                     endpoint=ep.label)
        del buf[limit:]


def response_cap(endpoint: Endpoint, rows: int, classes: Optional[int]) -> int:
    """Largest inference response body read from ``endpoint`` for ``rows`` rows of ``classes``."""
    if endpoint.max_response_bytes:
        return endpoint.max_response_bytes
    return max(MIN_RESPONSE_CAP, rows * (classes or CLASSES_IF_UNKNOWN) * BYTES_PER_VALUE + RESPONSE_SLACK)


def parse_infer_response(content: bytes, endpoint: Endpoint, rows: int,
                         classes: Optional[int] = None) -> tuple[np.ndarray, str]:
    """The probabilities ``[rows, classes]`` in a v2 response, checked to be possible.

    ``classes``: the edge's label count, when known; a different count is refused (an answer
    must never name a label the device does not have)."""
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
    return check_output(arr, endpoint, classes), resp.model_version or ""


def check_output(arr: np.ndarray, endpoint: Endpoint, classes: Optional[int] = None) -> np.ndarray:
    """``arr`` ([rows, C], as the server sent it) as probabilities, or CloudProtocolError when it
    cannot be an answer of the endpoint's ``output_kind`` over ``classes`` labels."""
    label = endpoint.label
    if arr.shape[1] == 0 or (classes is not None and arr.shape[1] != classes):
        raise CloudProtocolError(f"{label}: answer has {arr.shape[1]} classes, the edge model has {classes}",
                                 endpoint=label)
    # The smallest and largest values say it all: both reductions propagate a NaN, and an
    # infinity is one of them (two passes, not isfinite's array and its all()).
    lo, hi = float(_MIN(arr, None)), float(_MAX(arr, None))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CloudProtocolError(f"{label}: output contains NaN or infinite values", endpoint=label)
    kind = endpoint.output_kind
    if kind == "logits":
        return calibrated_softmax(arr)
    if kind == "log_probabilities":
        if hi > PROB_RANGE_TOL:
            raise CloudProtocolError(f"{label}: log-probabilities must be <= 0 (got {hi:.4g})", endpoint=label)
        arr = np.exp(arr)
    elif lo < -PROB_RANGE_TOL or hi > 1 + PROB_RANGE_TOL:
        raise CloudProtocolError(f"{label}: probabilities must lie in [0, 1] (got {lo:.4g}..{hi:.4g})",
                                 endpoint=label)
    sums = _SUM(arr, 1, np.float64)
    worst = max(abs(s - 1.0) for s in sums.tolist())
    if worst > PROB_SUM_TOL:
        raise CloudProtocolError(f"{label}: probability rows must sum to 1 (off by {worst:.4g})", endpoint=label)
    return arr


_MIN, _MAX, _SUM = np.minimum.reduce, np.maximum.reduce, np.add.reduce


def error_from_status(status: int, headers: httpx.Headers, content: bytes, endpoint: Endpoint) -> CloudError:
    msg = _error_message(content)
    text = f"HTTP {status} from {endpoint.label}" + (f": {msg}" if msg else "")
    if status in (401, 403):
        if endpoint.api_key_env and not endpoint.api_key():
            text += f" (the policy's api_key_env {endpoint.api_key_env} is not set in this process's environment)"
        return CloudAuthError(text, endpoint=endpoint.label, status=status)
    if status in OVERLOADED_STATUS:
        return CloudOverloaded(text, endpoint=endpoint.label, status=status, retry_after=_retry_after(headers))
    if status in GATEWAY_STATUS:
        return CloudGatewayError(text, endpoint=endpoint.label, status=status, retry_after=_retry_after(headers))
    if 400 <= status < 500:
        return CloudRejected(text, endpoint=endpoint.label, status=status)
    return CloudServerError(text, endpoint=endpoint.label, status=status)


def translate(exc: BaseException, endpoint: Endpoint) -> CloudError:
    """httpx / asyncio exceptions -> the router's tree."""
    label = endpoint.label
    if isinstance(exc, CloudError):
        return exc
    httpcore = _httpcore()
    if isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException, httpcore.TimeoutException, socket.timeout)):
        return CloudTimeout(f"{label}: timed out ({type(exc).__name__})", endpoint=label)
    tls = _tls_cause(exc)
    if tls is not None:
        return CloudTLSError(f"{label}: TLS handshake failed: {tls}", endpoint=label)
    if isinstance(exc, (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError,
                        httpx.CloseError, httpcore.NetworkError, httpcore.ProtocolError, OSError)):
        return CloudUnavailable(f"{label}: {type(exc).__name__}: {exc or 'connection failed'}", endpoint=label)
    if isinstance(exc, httpx.HTTPError):
        return CloudUnavailable(f"{label}: {type(exc).__name__}: {exc}", endpoint=label)
    return CloudError(f"{label}: unexpected {type(exc).__name__}: {exc}", endpoint=label)


def _returned(err: CloudError, t0: float) -> CloudError:
    """An attempt's error as the value it returns, timed from ``t0``, its tracebacks (and its
    causes') dropped. A caught exception's traceback holds the frame that caught it, and that
    frame held the error: a cycle of ~90 objects per failed attempt (frames, with the request's
    body and arrays in their locals) that only the cyclic collector frees, in collections that
    stop every thread. The message and the cause's type and text stay."""
    err.elapsed_s = time.monotonic() - t0
    seen: BaseException | None = err
    for _ in range(8):  # a cause chain is short; bounded against a self-referencing one
        if seen is None:
            break
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__
    return err


def _tls_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` behind an httpx/httpcore error (they chain it as the cause), if any."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ssl.SSLError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


@functools.lru_cache(maxsize=256)
def _key_may_travel(url: str, allow_insecure_http: bool) -> bool:
    return url.startswith("https://") or allow_insecure_http or is_loopback_url(url)


def request_headers(endpoint: Endpoint) -> dict[str, str]:
    """Headers of every request to ``endpoint``: JSON, no compression (a compressed body could
    expand past the size cap within one chunk), and the Bearer key when the policy names one --
    never over plain http to another host (the policy refuses that at load; this is the backstop)."""
    headers = {"content-type": "application/json", "accept-encoding": "identity"}
    key = endpoint.api_key()
    if key:
        if not _key_may_travel(endpoint.url, endpoint.allow_insecure_http):
            raise CloudAuthError(f"{endpoint.label}: refusing to send the API key over plain http to a "
                                 "non-loopback host; use https:// or set allow_insecure_http: true",
                                 endpoint=endpoint.label)
        headers["authorization"] = f"Bearer {key}"
    return headers


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

    _import_httpx()
    import httpcore._backends.sync  # noqa: F401 -- sync predict's attempts (_DeadlineBackend)
    import httpcore._sync.connection_pool  # noqa: F401
    import httpcore._async.connection_pool  # noqa: F401
    import httpcore._backends.anyio  # noqa: F401


def _ca_stamp(path: Optional[str]) -> tuple:
    """Identifies the bundle's contents cheaply: a reload after the file changed rebuilds trust."""
    if path is None:
        return ()
    try:
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        return ("missing",)


def make_ssl_context(verify: bool = True, ca_bundle: Optional[str] = None) -> ssl.SSLContext:
    """The TLS context for one (verify, CA bundle) pair, from the policy alone.

    ``ssl.create_default_context()`` without a ``cafile`` would load OpenSSL's default paths,
    which honour ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` from the environment; so the bundle is
    always named: the endpoint's ``ca_bundle``, else certifi's (what httpx itself uses), else
    the compiled-in system bundle (never the environment's)."""
    if not verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    cafile = ca_bundle
    if cafile is None:
        try:
            import certifi

            cafile = certifi.where()
        except ImportError:  # pragma: no cover -- httpx depends on certifi
            paths = ssl.get_default_verify_paths()
            return ssl.create_default_context(cafile=paths.openssl_cafile, capath=paths.openssl_capath)
    return ssl.create_default_context(cafile=cafile)


def _trust_nothing() -> ssl.SSLContext:
    """For plain-http clients: verification on, no CA loaded (cheap), so a client keyed to an
    http host fails closed if TLS ever happened on it."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)



# ----------------------------------------------------------------------------- sync I/O

_deadline = threading.local()  # .at: the running attempt's absolute end (time.monotonic) in this thread


def _httpcore():
    import httpcore  # loaded by CloudClient.prepare with any endpoint (a lookup here)

    return httpcore


@functools.lru_cache(maxsize=256)
def _model_url(base: str, model: str, version: Optional[str], tail: str = "") -> str:
    """An endpoint's model URL (``model_path`` quotes its parts: worth doing once, not per request)."""
    return base + model_path(model, version) + tail


@functools.lru_cache(maxsize=256)
def _core_url(url: str):
    """httpcore's parsed form of ``url``: parsing it was ~2 % of a sync escalation. httpcore only
    reads a request's URL, so one object serves every request to it."""
    return _httpcore().URL(url)


def _left(timeout: Optional[float]) -> Optional[float]:
    """A socket operation's timeout cut to what is left of this thread's attempt; at or past the
    end, the operation is not started."""
    at = getattr(_deadline, "at", None)
    if at is None:  # no attempt in this thread bounds it (a socket timeout cannot be infinite)
        return timeout
    left = at - time.monotonic()
    if left <= 0.0:
        raise socket.timeout("attempt deadline reached")
    return _poll_timeout(left) if timeout is None or timeout >= left else timeout


def _poll_timeout(left: float) -> float:
    """A socket timeout that wakes by the end ``left`` seconds away. CPython waits on a socket
    with ``poll()`` and rounds the timeout *up* to a whole millisecond (socketmodule.c,
    ``_PyTime_ROUND_CEILING``): 12.3 ms left would wake 13 ms later, half a millisecond past the
    end on average, before the GIL is even asked for. So whole milliseconds, less a microsecond
    (0.012 as a float may become 12.000001 ms and be rounded up again). Under a millisecond the
    remainder goes as is: poll's shortest wait, < 1 ms past the attempt's end, inside the reserve."""
    return left if left < 0.001 else math.floor(left * 1000.0) / 1000.0 - 1e-6


class _DeadlineStream:
    """httpcore's sync stream with every read, write and TLS step bounded by the attempt's
    absolute end. httpcore's own timeouts are per socket operation (a server dripping bytes can
    keep a request alive for ever); clamping each operation to the end bounds the whole
    exchange. The stream may be pooled and reused by another thread: the end is per thread.
    (httpcore's NetworkStream interface, duck-typed: httpcore is imported only with endpoints.)

    Writes are held until the first read and then sent as one: httpcore writes a request's
    headers and its body separately, and on loopback each send wakes the server for a partial
    request (two syscalls, two turns of its event loop: ~6 % of an escalation's time)."""

    __slots__ = ("_inner", "_held")

    def __init__(self, inner) -> None:
        self._inner = inner
        self._held: list[bytes] = []

    def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        if self._held:
            self._flush(timeout)
        try:
            return self._inner.read(max_bytes, _left(timeout))
        except socket.timeout as exc:  # _left's: the same exception httpcore maps a socket timeout to
            raise _httpcore().ReadTimeout(exc) from exc

    def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        if buffer:
            self._held.append(buffer)

    def _flush(self, timeout: Optional[float]) -> None:
        held = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held = []
        try:
            self._inner.write(held, _left(timeout))
        except socket.timeout as exc:
            raise _httpcore().WriteTimeout(exc) from exc
        except _httpcore().WriteError:
            # As httpcore does when a send fails: the server may have answered early (413, 401)
            # and closed; reading tells (its answer, or a ReadError).
            pass

    def close(self) -> None:
        self._held = []
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: Optional[str] = None,
                  timeout: Optional[float] = None) -> "_DeadlineStream":
        try:
            return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, _left(timeout)))
        except socket.timeout as exc:
            raise _httpcore().ConnectTimeout(exc) from exc

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


class _DeadlineBackend:
    """httpcore's sync socket backend, its streams wrapped in :class:`_DeadlineStream`."""

    def __init__(self) -> None:
        from httpcore._backends.sync import SyncBackend  # httpcore's default for ConnectionPool

        self._inner = SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: Optional[float] = None, local_address: Optional[str] = None,
                    socket_options=None) -> _DeadlineStream:
        try:
            return _DeadlineStream(self._inner.connect_tcp(host, port, _left(timeout), local_address, socket_options))
        except socket.timeout as exc:
            raise _httpcore().ConnectTimeout(exc) from exc

    def connect_unix_socket(self, path: str, timeout: Optional[float] = None, socket_options=None):
        raise _httpcore().ConnectError("unix sockets are not used by the router")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

class _HeldWritesStream:
    """httpcore's async stream with a request's writes held until the first read and sent as one
    (as :class:`_DeadlineStream` does for sync attempts; the caller's ``asyncio.timeout`` bounds
    the exchange, so no deadline is kept here)."""

    __slots__ = ("_inner", "_held", "_sock", "_readable")

    def __init__(self, inner, readable) -> None:
        self._inner = inner
        self._held: list[bytes] = []
        self._sock = inner.get_extra_info("socket")
        self._readable = readable  # httpcore's is_socket_readable

    async def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        if self._held:
            held = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held = []
            try:
                await self._inner.write(held, timeout)
            except _httpcore().WriteError:
                pass  # as httpcore does: the server may have answered early; reading tells
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        if buffer:
            self._held.append(buffer)

    async def aclose(self) -> None:
        self._held = []
        await self._inner.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: Optional[str] = None,
                        timeout: Optional[float] = None) -> "_HeldWritesStream":
        return _HeldWritesStream(await self._inner.start_tls(ssl_context, server_hostname, timeout), self._readable)

    def get_extra_info(self, info: str):
        if info == "is_readable" and self._sock is not None:
            # The pool asks before every reuse; anyio would rebuild its attribute table to find
            # the same socket (~3 % of an apredict escalation).
            return self._readable(self._sock)
        return self._inner.get_extra_info(info)


class _HeldWritesBackend:
    """httpcore's anyio backend (httpx's on asyncio), its streams wrapped in :class:`_HeldWritesStream`."""

    def __init__(self) -> None:
        from httpcore._utils import is_socket_readable  # loaded with httpcore (prepare)

        self._inner = _httpcore().AnyIOBackend()
        self._readable = is_socket_readable

    async def connect_tcp(self, host: str, port: int, timeout: Optional[float] = None,
                          local_address: Optional[str] = None, socket_options=None) -> _HeldWritesStream:
        return _HeldWritesStream(await self._inner.connect_tcp(host, port, timeout, local_address, socket_options),
                                 self._readable)

    async def connect_unix_socket(self, path: str, timeout: Optional[float] = None, socket_options=None):
        raise _httpcore().ConnectError("unix sockets are not used by the router")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class CloudClient:
    """Async v2 client over all endpoints of a policy. Pooled connections per event loop (the
    router's own I/O thread, and any loop that calls ``apredict``) and per trust key.

    ``classes``: the edge model's label count; answers with another count are refused."""

    def __init__(self, settings: CloudSettings, transport: httpx.AsyncBaseTransport | None = None,
                 *, classes: Optional[int] = None, labels=None, edge_form=None) -> None:
        self.settings = settings
        self.labels = None if labels is None else tuple(labels)  # the edge's: servers publishing others are refused
        # The edge's (sample_shape, layout, color), None for a tensor model: how pixels are arranged per endpoint.
        self.edge_form = edge_form
        self.classes = len(self.labels) if classes is None and self.labels is not None else classes
        self._transport = transport
        self._contexts: dict[tuple, ssl.SSLContext] = {}
        self._clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, httpx.AsyncClient]]" = \
            weakref.WeakKeyDictionary()
        # apredict's and the I/O thread's requests: httpcore pools per event loop and trust key
        # (httpx's client layers over the same pool were ~12 % of an async escalation; the httpx
        # clients above remain for an injected transport and the readiness probe).
        self._apools: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict]" = weakref.WeakKeyDictionary()
        # Sync predict's attempts run in the caller's thread over these (httpcore pools, thread-safe).
        self._pools: dict = {}  # trust key -> httpcore.ConnectionPool
        self._pools_lock = threading.Lock()
        self.prepare(settings)

    def relabel(self, labels, states, edge_form=None) -> None:
        """The edge now has ``labels`` (a hot-swapped release) and input form: answers are checked
        against them and each endpoint's published labels and input are compared again; a mismatch
        makes it incompatible (named in the error), a match makes it usable again."""
        self.labels = tuple(labels)
        self.classes = len(self.labels)
        if edge_form is not None:
            self.edge_form = edge_form
        for state in states:
            info = state.meta
            if info is not None:
                fresh = ModelInfo(**{**info.__dict__, "incompatible": None, "axes": None, "flip_axis": None,
                                     "pixels_config": None, "pixels_tail": None})
                refusal = check_labels(fresh, state.endpoint, self.labels)
                why = None if refusal is None else str(refusal)
                if why is None:
                    planned = plan_input(fresh, self.edge_form)
                    if isinstance(planned, str):
                        why = f"{state.endpoint.label}: {planned}"
                    else:
                        fresh = planned
                state.meta = ModelInfo(**{**fresh.__dict__, "incompatible": why})

    def prepare(self, settings: CloudSettings) -> None:
        """Adopt (new) settings. Building a verifying SSL context loads a CA bundle -- hundreds of
        milliseconds on a busy machine -- so it happens here, off every request's path, for each
        https endpoint's (verify, bundle) pair."""
        self.settings = settings
        if settings.endpoints:
            _preload_async_stack()
        for ep in settings.endpoints:
            if not ep.url.startswith("https://"):
                continue
            if not ep.tls_verify:
                log.warning("TLS VERIFICATION IS OFF for cloud endpoint %r (%s): any server can impersonate it "
                            "and read its API key; set tls_verify: true (and ca_bundle) outside tests",
                            ep.label, ep.url)
            self._context(ep.tls_verify, ep.ca_bundle, _ca_stamp(ep.ca_bundle))

    def _context(self, verify: bool, ca_bundle: Optional[str], stamp: tuple) -> ssl.SSLContext:
        key = (verify, ca_bundle, stamp)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._contexts[key] = make_ssl_context(verify, ca_bundle)
        return ctx

    def _client(self, ep: Endpoint) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        per_loop = self._clients.get(loop)
        if per_loop is None:
            per_loop = self._clients[loop] = {}
        s = self.settings
        key, https, stamp = self._trust_key(ep)
        client = per_loop.get(key)
        if client is None or client.is_closed:
            verify = self._context(ep.tls_verify, ep.ca_bundle, stamp) if https else _trust_nothing()
            client = httpx.AsyncClient(
                timeout=httpx.Timeout(s.per_try_timeout_ms / 1000.0, connect=s.connect_timeout_ms / 1000.0),
                limits=httpx.Limits(max_connections=s.max_connections, max_keepalive_connections=s.max_connections),
                transport=self._transport,
                verify=verify,
                trust_env=False,
                follow_redirects=False,
            )
            per_loop[key] = client
        return client

    def _apool(self, ep: Endpoint):
        """This event loop's httpcore pool for ``ep``'s trust key, built as ``_client`` builds its
        httpx client: the same TLS context, limits and keep-alive expiry; nothing read from the
        environment, no redirects followed (httpcore does neither)."""
        loop = asyncio.get_running_loop()
        per_loop = self._apools.get(loop)
        if per_loop is None:
            per_loop = self._apools[loop] = {}
        key, https, stamp = self._trust_key(ep)
        pool = per_loop.get(key)
        if pool is None:
            s = self.settings
            pool = per_loop[key] = _httpcore().AsyncConnectionPool(
                ssl_context=self._context(ep.tls_verify, ep.ca_bundle, stamp) if https else _trust_nothing(),
                max_connections=s.max_connections, max_keepalive_connections=s.max_connections,
                keepalive_expiry=ASYNC_KEEPALIVE_S, network_backend=_HeldWritesBackend(),
            )
        return pool

    def _trust_key(self, ep: Endpoint) -> tuple[tuple, bool, tuple]:
        """Everything that decides whom a pooled client trusts or how it connects; the host too,
        so a client built for one endpoint never carries another's requests."""
        s = self.settings
        https = ep.url.startswith("https://")
        stamp = _ca_stamp(ep.ca_bundle) if https and ep.ca_bundle else ()
        key = (ep.url.split("/", 3)[2], https, https and ep.tls_verify, ep.ca_bundle if https else None, stamp,
               s.connect_timeout_ms, s.per_try_timeout_ms, s.max_connections)
        return key, https, stamp

    @staticmethod
    def _headers(endpoint: Endpoint) -> dict[str, str]:
        return request_headers(endpoint)

    # ------------------------------------------------------------------ sync attempts

    def can_run_sync(self, call: CloudCall) -> bool:
        """Whether :meth:`infer_sync` runs this attempt: not with an injected (async) transport,
        nor when the rows must be split into concurrent requests (the async client does that)."""
        size = call.state.endpoint.max_batch_size
        return self._transport is None and not (size and len(call.x) > size)

    def warm_sync(self, ep: Endpoint) -> None:
        """Build ``ep``'s sync pool now (no socket is opened), off the first request's deadline."""
        if self._transport is None:
            self._pool(ep)

    def _pool(self, ep: Endpoint):
        key, https, stamp = self._trust_key(ep)
        pool = self._pools.get(key)
        if pool is None:
            with self._pools_lock:
                pool = self._pools.get(key)
                if pool is None:
                    s = self.settings
                    pool = self._pools[key] = _httpcore().ConnectionPool(
                        ssl_context=self._context(ep.tls_verify, ep.ca_bundle, stamp) if https else _trust_nothing(),
                        max_connections=s.max_connections, max_keepalive_connections=s.max_connections,
                        network_backend=_DeadlineBackend(),
                    )
        return pool

    def _exchange_sync(self, ep: Endpoint, method: str, url: str, cap: int, timeout_s: float,
                       content: Optional[bytes] = None) -> tuple[int, httpx.Headers | list, bytes]:
        """:meth:`_exchange` in the caller's thread. Every socket operation is cut to the attempt's
        absolute end (set by the caller in ``_deadline.at``); waiting for a pooled connection too."""
        connect = min(self.settings.connect_timeout_ms / 1000.0, timeout_s)
        timeouts = {"connect": connect, "read": timeout_s, "write": timeout_s, "pool": timeout_s}
        headers = [(k.encode(), v.encode()) for k, v in request_headers(ep).items()]
        with self._pool(ep).stream(method, _core_url(url), headers=headers, content=content,
                                   extensions={"timeout": timeouts}) as r:
            ok = r.status == 200
            declared = next((v for k, v in r.headers if k.lower() == b"content-length"), None)
            limit = _body_limit(ep, ok, cap, declared)
            buf = bytearray()
            for chunk in r.iter_stream():
                buf += chunk
                if len(buf) > limit:
                    break
        _cut(ep, ok, buf, limit)
        return r.status, r.headers, bytes(buf)

    def _fetch_metadata_sync(self, state: EndpointState, timeout_s: float) -> ModelInfo:
        ep = state.endpoint
        try:
            status, headers, content = self._exchange_sync(
                ep, "GET", _model_url(ep.url, ep.model, ep.version), max(METADATA_CAP, ep.max_response_bytes or 0),
                timeout_s)
        except Exception as exc:  # noqa: BLE001 -- translated right here
            raise translate(exc, ep) from exc
        return self._take_metadata(state, ep, status, headers, content)

    def infer_sync(self, call: CloudCall) -> CloudReply | CloudError:
        """:meth:`infer` in the caller's thread, for sync ``predict``: no event loop, no thread hop.
        The attempt ends at ``call``'s absolute deadline whatever the server does: each socket
        operation (connect, TLS, write, read, waiting for a pooled connection) is bounded by what
        is left (see :class:`_DeadlineStream`). Only for calls :meth:`can_run_sync` accepts."""
        ep = call.state.endpoint
        t0 = time.monotonic()
        timeout_s = call.remaining_s()
        outer = getattr(_deadline, "at", None)
        _deadline.at = t0 + timeout_s
        try:
            info = call.state.meta or self._fetch_metadata_sync(call.state, timeout_s)
            if info.incompatible:  # known from the first contact: no request is sent
                raise CloudIncompatible(info.incompatible, endpoint=ep.label)
            pixels = call.pixels if info.pixels_config is None else endpoint_pixels(info, call.images, ep.label)
            t_post = time.monotonic()  # the latency estimate is of inference calls, not the metadata read
            body = build_infer_body(info, ep, call.x, pixels, call.budget_s, call.request_id)
            status, headers, content = self._exchange_sync(
                ep, "POST", _model_url(ep.url, ep.model, ep.version, "/infer"),
                response_cap(ep, len(call.x), self.classes), max(0.0, _deadline.at - t_post), content=body)
            if status != 200:
                raise error_from_status(status, httpx.Headers(headers), content, ep)
            probs, version = parse_infer_response(content, ep, len(call.x), self.classes)
            return CloudReply(probs, version or (info.versions[0] if info.versions else ep.version or ""),
                              time.monotonic() - t_post, len(body))
        except CloudError as exc:
            return _returned(exc, t0)
        except Exception as exc:  # noqa: BLE001 -- httpcore, OSError, timeouts: translated here
            return _returned(translate(exc, ep), t0)
        finally:
            _deadline.at = outer

    async def _exchange(self, ep: Endpoint, method: str, url: str, cap: int, timeout_s: float,
                        content: Optional[bytes] = None) -> tuple[int, httpx.Headers | list, bytes]:
        """One request; the body is streamed and reading stops past ``cap`` bytes (a 200 over the
        cap is a CloudProtocolError; an error body is just cut: only its message is wanted).
        Connecting is bounded by ``connect_timeout_ms`` (and ``timeout_s``), each other phase (pool
        wait, write, read) by ``timeout_s``, the whole by the caller's ``asyncio.timeout``."""
        if self._transport is not None:  # an injected httpx transport (tests, tools)
            return await self._exchange_httpx(ep, method, url, cap, timeout_s, content)
        connect = min(self.settings.connect_timeout_ms / 1000.0, timeout_s)  # as the sync attempts
        timeouts = {"connect": connect, "read": timeout_s, "write": timeout_s, "pool": timeout_s}
        headers = [(k.encode(), v.encode()) for k, v in request_headers(ep).items()]
        async with self._apool(ep).stream(method, _core_url(url), headers=headers, content=content,
                                          extensions={"timeout": timeouts}) as r:
            ok = r.status == 200
            declared = next((v for k, v in r.headers if k.lower() == b"content-length"), None)
            limit = _body_limit(ep, ok, cap, declared)
            buf = await _read_async(r.aiter_stream(), limit)
        _cut(ep, ok, buf, limit)
        return r.status, r.headers, bytes(buf)

    async def _exchange_httpx(self, ep: Endpoint, method: str, url: str, cap: int, timeout_s: float,
                              content: Optional[bytes]) -> tuple[int, httpx.Headers, bytes]:
        async with self._client(ep).stream(method, url, headers=request_headers(ep), timeout=timeout_s,
                                           content=content) as r:
            ok = r.status_code == 200
            limit = _body_limit(ep, ok, cap, r.headers.get("content-length"))
            buf = await _read_async(r.aiter_bytes(), limit)
        _cut(ep, ok, buf, limit)
        return r.status_code, r.headers, bytes(buf)

    async def fetch_metadata(self, state: EndpointState, timeout_s: float) -> ModelInfo:
        ep = state.endpoint
        try:
            async with asyncio.timeout(timeout_s):
                status, headers, content = await self._exchange(
                    ep, "GET", _model_url(ep.url, ep.model, ep.version), max(METADATA_CAP, ep.max_response_bytes or 0),
                    timeout_s)
        except Exception as exc:  # noqa: BLE001 -- translated right here
            raise translate(exc, ep) from exc
        return self._take_metadata(state, ep, status, headers, content)

    def _take_metadata(self, state: EndpointState, ep: Endpoint, status: int, headers, content: bytes) -> ModelInfo:
        if status != 200:
            raise error_from_status(status, httpx.Headers(headers), content, ep)
        info = parse_metadata(content, ep)
        refusal = check_labels(info, ep, self.labels)
        if refusal is None:
            planned = plan_input(info, self.edge_form)
            if isinstance(planned, str):
                refusal = CloudIncompatible(f"{ep.label}: {planned}", endpoint=ep.label)
            else:
                info = planned
        if refusal is not None:
            state.meta = ModelInfo(**{**info.__dict__, "incompatible": str(refusal)})
            raise refusal
        state.meta = info
        return state.meta

    async def ready(self, state: EndpointState, timeout_s: float) -> bool:
        """``GET /v2/health/ready`` judged by status code only, as the protocol advises (the body
        is not read)."""
        ep = state.endpoint
        try:
            async with asyncio.timeout(timeout_s):
                async with self._client(ep).stream("GET", ep.url + "/v2/health/ready", timeout=timeout_s,
                                                   headers={"accept-encoding": "identity"}) as r:
                    return r.status_code == 200
        except Exception:  # noqa: BLE001 -- any failure means "not ready"
            return False

    async def infer(self, call: CloudCall) -> CloudReply | CloudError:
        """One attempt; returns the reply or the translated error (never raises a foreign error).
        Rows beyond the endpoint's ``max_batch_size`` go as concurrent requests of that size."""
        ep = call.state.endpoint
        t0 = time.monotonic()
        timeout_s = call.remaining_s() if hasattr(call, "remaining_s") else call.timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                info = call.state.meta or await self.fetch_metadata(call.state, timeout_s)
                if info.incompatible:  # known from the first contact: no request is sent
                    raise CloudIncompatible(info.incompatible, endpoint=ep.label)
                pixels = call.pixels if info.pixels_config is None else \
                    endpoint_pixels(info, getattr(call, "images", None), ep.label)
                t_post = time.monotonic()  # the latency estimate is of inference calls, not the metadata read
                size = ep.max_batch_size or len(call.x)
                if size >= len(call.x):  # one request: awaited here (gather would wrap it in a task)
                    parts = [await self._post(info, ep, call.x, pixels, call.budget_s, call.request_id, timeout_s)]
                else:
                    parts = await asyncio.gather(*(
                        self._post(info, ep, call.x[i:i + size], None if pixels is None else pixels[i:i + size],
                                   call.budget_s, f"{call.request_id}.{i // size}", timeout_s)
                        for i in range(0, len(call.x), size)
                    ))
            probs = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
            version = parts[0][1] or (info.versions[0] if info.versions else ep.version or "")
            return CloudReply(probs, version, time.monotonic() - t_post, sum(p[2] for p in parts))
        except CloudError as exc:
            return _returned(exc, t0)
        except Exception as exc:  # noqa: BLE001 -- httpx, OSError, TimeoutError: translated here
            return _returned(translate(exc, ep), t0)

    async def _post(self, info: ModelInfo, ep: Endpoint, x, pixels, budget_s: float, request_id: str,
                    timeout_s: float) -> tuple[np.ndarray, str, int]:
        body = build_infer_body(info, ep, x, pixels, budget_s, request_id)
        status, headers, content = await self._exchange(
            ep, "POST", _model_url(ep.url, ep.model, ep.version, "/infer"),
            response_cap(ep, len(x), self.classes), timeout_s, content=body,
        )
        if status != 200:
            raise error_from_status(status, httpx.Headers(headers), content, ep)
        probs, version = parse_infer_response(content, ep, len(x), self.classes)
        return probs, version, len(body)

    async def aclose(self) -> None:
        """Close this loop's clients (and any other loop's that is already gone)."""
        for per_loop in list(self._clients.values()):
            for client in list(per_loop.values()):
                try:
                    await client.aclose()
                except RuntimeError:  # a client bound to another, closed loop
                    pass
        self._clients.clear()
        for per_loop in list(self._apools.values()):
            for pool in list(per_loop.values()):
                try:
                    await pool.aclose()
                except RuntimeError:  # a pool bound to another, closed loop
                    pass
        self._apools.clear()
        self.close_sync()

    def close_sync(self) -> None:
        """Close the sync attempts' connection pools (a later attempt builds a new one)."""
        with self._pools_lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            try:
                pool.close()
            except Exception:  # noqa: BLE001 -- best effort at shutdown
                pass
