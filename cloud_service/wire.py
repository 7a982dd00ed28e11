"""HTTP body codec of the v2 infer endpoint: JSON, and the binary tensor data extension.

JSON requests are validated straight from bytes by pydantic-core. With the binary extension
(Triton's, advertised as ``binary_tensor_data``; ``tritonclient`` uses it by default) the body
is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw little-endian
tensors of the inputs whose ``parameters.binary_data_size`` is set, in input order. Outputs are
returned binary when the request asks (``parameters.binary_data_output`` or an output's
``parameters.binary_data``), JSON otherwise.

Error messages name fields and sizes, never values: they reach clients and logs.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

import numpy as np
from pydantic import ValidationError
from pydantic_core import to_json

from cloud_service.errors import InvalidRequest
from oip.protocol import DATATYPES, InferenceRequest, InferenceResponse, ProtocolError, budget_from_parameters

HEADER_LENGTH = "inference-header-content-length"
BINARY_SIZE = "binary_data_size"
# Shapes are checked with Python integers before numpy sees them: a dimension above int64 or a
# product that overflows it made np.prod raise OverflowError (a 500) instead of a 400.
MAX_DIM = 2**31 - 1
MAX_ELEMENTS = 2**40
MAX_TIMEOUT_US = 86_400 * 1_000_000  # a day: larger budgets are nonsense and overflow the event loop's timers


def parse_request(body: bytes, header_length: Optional[str]) -> InferenceRequest:
    """Bytes of an infer request -> a checked :class:`InferenceRequest`; :class:`InvalidRequest` otherwise."""
    return check_request(_parse(body, header_length))


def check_request(req: InferenceRequest) -> InferenceRequest:
    """Shapes within int64 arithmetic (each dim and the element count), before anything multiplies them."""
    for i, tensor in enumerate(req.inputs):
        count = 1
        for d in tensor.shape:
            if d < 0 or d > MAX_DIM:
                raise InvalidRequest(f"inputs[{i}].shape: dimensions must be between 0 and {MAX_DIM}")
            count *= d
        if count > MAX_ELEMENTS:
            raise InvalidRequest(f"inputs[{i}].shape: more than {MAX_ELEMENTS} elements")
    return req


def budget_seconds(req: InferenceRequest) -> Optional[float]:
    """``parameters.timeout`` (microseconds) as seconds: positive, finite and at most a day, else 400."""
    try:
        budget = budget_from_parameters(req.parameters)
    except ProtocolError as exc:
        raise InvalidRequest(str(exc)) from None
    if budget is None:
        return None
    if not math.isfinite(budget) or budget * 1_000_000 > MAX_TIMEOUT_US:
        raise InvalidRequest(f"parameters.timeout must be a finite number of microseconds up to {MAX_TIMEOUT_US}")
    return budget


def _parse(body: bytes, header_length: Optional[str]) -> InferenceRequest:
    """Bytes of an infer request -> :class:`InferenceRequest` (binary inputs become numpy arrays)."""
    if not body:
        raise InvalidRequest("empty request body; expected a JSON inference request")
    if header_length is None:
        try:
            return InferenceRequest.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidRequest(describe_validation(exc)) from None
    text = header_length.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 18):  # int() would take "١٢", "1_0", 5000 digits
        raise InvalidRequest("Inference-Header-Content-Length must be a non-negative integer")
    n = int(text)
    if n < 0 or n > len(body):
        raise InvalidRequest(f"Inference-Header-Content-Length {n} is outside the {len(body)}-byte body")
    try:
        raw = json.loads(body[:n])
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: nesting bomb
        raise InvalidRequest("invalid JSON in the inference request header") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("inputs"), list):
        raise InvalidRequest("inference request header must be a JSON object with an 'inputs' list")
    offset = n
    for i, tensor in enumerate(raw["inputs"]):
        params = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(params, dict) or BINARY_SIZE not in params:
            continue
        size = params[BINARY_SIZE]
        datatype = tensor.get("datatype")
        dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None  # a list/dict is unhashable
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidRequest(f"inputs[{i}].parameters.binary_data_size must be a non-negative integer")
        if dtype is None:
            shown = datatype if isinstance(datatype, str) and len(datatype) <= 16 else type(datatype).__name__
            raise InvalidRequest(f"inputs[{i}]: datatype {shown!r} cannot be sent as binary data")
        if offset + size > len(body):
            raise InvalidRequest(f"inputs[{i}]: binary_data_size {size} runs past the end of the body")
        if size % dtype.itemsize:
            raise InvalidRequest(f"inputs[{i}]: binary_data_size {size} is not a multiple of {dtype.itemsize}")
        if "data" in tensor:
            raise InvalidRequest(f"inputs[{i}]: has both 'data' and binary_data_size")
        tensor["data"] = np.frombuffer(body, dtype=dtype.newbyteorder("<"), count=size // dtype.itemsize, offset=offset)
        params.pop(BINARY_SIZE)
        offset += size
    if offset != len(body):
        raise InvalidRequest(f"{len(body) - offset} bytes after the binary inputs belong to no input")
    try:
        return InferenceRequest.model_validate(raw)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation(exc)) from None


def binary_outputs(request: InferenceRequest) -> frozenset[str]:
    """Names of outputs to return as binary data (per-output setting wins over the request-wide one)."""
    default = bool((request.parameters or {}).get("binary_data_output", False))
    if not request.outputs:
        return frozenset(["*"]) if default else frozenset()
    names = set()
    for out in request.outputs:
        flag = (out.parameters or {}).get("binary_data", default)
        if flag is True:
            names.add(out.name)
    return frozenset(names)


def render_response(response: InferenceResponse, binary: frozenset[str]) -> tuple[bytes, dict[str, str]]:
    """Response whose outputs hold numpy arrays -> body bytes and extra headers."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in response.outputs:
        arr = np.asarray(out.data)
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if "*" in binary or out.name in binary:
            blob = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {**(out.parameters or {}), BINARY_SIZE: len(blob)}
            blobs.append(blob)
        else:
            if out.parameters:
                entry["parameters"] = out.parameters
            entry["data"] = arr.ravel().tolist()
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        head["id"] = response.id
    if response.parameters:
        head["parameters"] = response.parameters
    head["outputs"] = outputs
    header = to_json(head)  # pydantic-core's Rust encoder: ~8x faster than json.dumps for float lists
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def describe_validation(exc: ValidationError) -> str:
    """A pydantic error as ``field: problem`` lines without the offending input (it may be payload)."""
    parts = []
    for err in exc.errors(include_url=False, include_context=False, include_input=False)[:3]:
        if err["type"] in ("json_invalid", "json_type"):
            parts.append(err["msg"])  # "Invalid JSON: ... at line 1 column 2"
            continue
        loc = ".".join(str(p) for p in err["loc"]) or "request"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts) or "invalid inference request"
