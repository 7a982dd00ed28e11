"""Open Inference Protocol (v2) REST types -- the one wire-protocol module both sides use.

Pure pydantic + numpy: the cloud service validates requests with it, the router's cloud
client builds requests and parses responses with it. It imports no web framework, so the
router can use it without FastAPI (see ``tests/test_layering.py``).

Spec: kserve/open-inference-protocol ``specification/protocol/inference_rest.md``.
Parsers tolerate ``null`` for optional fields (KServe sends ``"model_version": null``) and
unknown extra fields (servers add their own).
"""

from __future__ import annotations

import math
from array import array
from typing import Any, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

PLATFORM_ONNX = "onnx_onnxv1"
TIMEOUT_PARAMETER = "timeout"  # microseconds, as Triton reads it: the request's remaining budget

ParameterValue = Union[bool, int, float, str]

# v2 datatype <-> numpy dtype (BYTES is carried as strings and not used by this project).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_DATATYPE = {v: k for k, v in DATATYPES.items()}


class ProtocolError(ValueError):
    """A tensor or message that does not follow the protocol (the service answers 400)."""


class _Model(BaseModel):
    # cache_strings="keys": pydantic-core would otherwise cache every short string value it parses
    # -- every request/response id is unique, so the cache filled with ~1 MB of ids per process
    # (bench/soak.py --pydantic-only); field names are the only strings worth caching here.
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), cache_strings="keys")


# ----------------------------------------------------------------------------- metadata

class MetadataTensor(_Model):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadataResponse(_Model):
    name: str
    version: str
    extensions: list[str] = Field(default_factory=list)


class ModelMetadataResponse(_Model):
    name: str
    versions: Optional[list[str]] = None
    platform: str = ""
    inputs: list[MetadataTensor] = Field(default_factory=list)
    outputs: list[MetadataTensor] = Field(default_factory=list)


# ----------------------------------------------------------------------------- inference

class RequestInput(_Model):
    name: str
    shape: list[int]
    datatype: str
    parameters: Optional[dict[str, ParameterValue]] = None
    data: Any  # flat or nested row-major list


class RequestOutput(_Model):
    name: str
    parameters: Optional[dict[str, ParameterValue]] = None


class InferenceRequest(_Model):
    id: Optional[str] = None
    parameters: Optional[dict[str, ParameterValue]] = None
    inputs: list[RequestInput]
    outputs: Optional[list[RequestOutput]] = None


class ResponseOutput(_Model):
    name: str
    shape: list[int]
    datatype: str
    parameters: Optional[dict[str, ParameterValue]] = None
    data: Any


class InferenceResponse(_Model):
    model_name: str
    model_version: Optional[str] = None
    id: Optional[str] = None
    parameters: Optional[dict[str, ParameterValue]] = None
    outputs: list[ResponseOutput]


class ErrorResponse(_Model):
    error: str


# ----------------------------------------------------------------------------- tensors

def decode_tensor(tensor: RequestInput | ResponseOutput) -> np.ndarray:
    """A v2 tensor -> numpy array of its shape and dtype; :class:`ProtocolError` if inconsistent."""
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise ProtocolError(f"tensor {tensor.name!r}: unsupported datatype {tensor.datatype!r}")
    if any((not isinstance(d, int)) or d < 0 for d in tensor.shape):
        raise ProtocolError(f"tensor {tensor.name!r}: shape {tensor.shape} must be non-negative integers")
    expected = math.prod(tensor.shape)
    data = tensor.data
    if dtype.kind == "f" and type(data) is list:
        # A flat list of numbers (what servers send): array("d") is C and takes ints and floats
        # only -- a string, None or nested list raises and takes the general path below, which
        # words the error. ~5x cheaper than np.asarray's type discovery for a row of scores.
        try:
            flat = np.frombuffer(array("d", data), np.float64)
        except (TypeError, OverflowError):
            flat = None
        if flat is not None:
            if flat.size != expected:
                raise ProtocolError(
                    f"tensor {tensor.name!r}: {flat.size} elements in data but shape {tensor.shape} needs {expected}")
            return flat.astype(dtype).reshape(tensor.shape)
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError) as exc:  # ragged nesting
        raise ProtocolError(f"tensor {tensor.name!r}: malformed data ({exc})") from None
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise ProtocolError(f"tensor {tensor.name!r}: data must be {tensor.datatype} numbers")
    if arr.size != expected:
        raise ProtocolError(
            f"tensor {tensor.name!r}: {arr.size} elements in data but shape {tensor.shape} needs {expected}"
        )
    if dtype.kind in "ui":
        if arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0):
            raise ProtocolError(f"tensor {tensor.name!r}: non-integer values for {tensor.datatype}")
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise ProtocolError(f"tensor {tensor.name!r}: values out of range for {tensor.datatype}")
    elif dtype.kind == "b" and arr.dtype.kind != "b":
        raise ProtocolError(f"tensor {tensor.name!r}: BOOL data must be true/false")
    return arr.astype(dtype, copy=False).reshape(tensor.shape)


def encode_tensor(name: str, arr: np.ndarray, parameters: dict | None = None) -> dict:
    """numpy -> v2 tensor dict with flat ``data`` (cheaper to serialise than a model instance)."""
    datatype = NUMPY_TO_DATATYPE.get(arr.dtype)
    if datatype is None:
        raise ProtocolError(f"cannot encode numpy dtype {arr.dtype} as a v2 datatype")
    out = {"name": name, "shape": list(arr.shape), "datatype": datatype, "data": arr.ravel().tolist()}
    if parameters:
        out["parameters"] = parameters
    return out


def budget_parameters(remaining_s: float) -> dict[str, int]:
    """The request's remaining budget as the v2 ``parameters.timeout`` (microseconds)."""
    return {TIMEOUT_PARAMETER: max(1, int(remaining_s * 1_000_000))}


def budget_from_parameters(parameters: dict | None) -> float | None:
    """Seconds of budget a request carries, or ``None``; :class:`ProtocolError` if malformed."""
    if not parameters or TIMEOUT_PARAMETER not in parameters:
        return None
    value = parameters[TIMEOUT_PARAMETER]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ProtocolError(f"parameters.timeout must be a positive number of microseconds; got {value!r}")
    return float(value) / 1_000_000


def model_path(model: str, version: str | None = None) -> str:
    """``/v2/models/{model}[/versions/{version}]`` with path-safe quoting."""
    from urllib.parse import quote

    base = f"/v2/models/{quote(model, safe='')}"
    return base if not version else f"{base}/versions/{quote(version, safe='')}"
