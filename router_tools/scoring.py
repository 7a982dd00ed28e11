"""Whole-set model outputs for ``calibrate`` and ``eval``: the edge and cloud models' probabilities
on a labeled set, from the model files (batched ONNX Runtime) or from a running Open Inference
Protocol v2 service (batched requests).

The v2 path reuses the router's own message functions (:func:`router.cloud.build_infer_body`,
:func:`router.cloud.parse_infer_response`, :func:`router.cloud.parse_metadata`) over a plain
synchronous httpx client, so it sends exactly what the router sends (compact UINT8 pixels when
the server accepts them) and errors arrive as the router's typed ``CloudError`` tree.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from edge_model.preprocess import PreprocessConfig, normalise
from edge_model.runtime import OnnxClassifier


def model_input(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """``uint8 [N, H, W]`` -> normalised ``float32 [N, 1, H, W]`` (the router's own preprocessing)."""
    return normalise(pixels, config)[:, None]


def model_logits(model: OnnxClassifier, pixels: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Raw logits of ``model`` on ``pixels`` (batched)."""
    out = [model.logits(model_input(pixels[i:i + batch_size], model.preprocess_config))
           for i in range(0, len(pixels), batch_size)]
    return np.concatenate(out) if out else np.empty((0, len(model.labels)), np.float32)


def model_probs(model: OnnxClassifier, pixels: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Calibrated probabilities of ``model`` on ``pixels`` (batched ``predict_proba``)."""
    out = [model.predict_proba(model_input(pixels[i:i + batch_size], model.preprocess_config))
           for i in range(0, len(pixels), batch_size)]
    return np.concatenate(out) if out else np.empty((0, len(model.labels)), np.float32)


@dataclass(frozen=True)
class RemoteModel:
    """What a v2 server said about the model it served."""

    url: str
    model: str
    version: str
    datatype: str


class V2BatchClient:
    """Batched v2 inference against one endpoint (sync; for whole-set scoring, not for routing)."""

    def __init__(self, url: str, model: str = "fashion-mnist", *, version: Optional[str] = None,
                 api_key_env: Optional[str] = None, timeout_s: float = 60.0, batch_size: int = 64) -> None:
        import httpx
        from pydantic import ValidationError

        from router.errors import ConfigError
        from router.policy import Endpoint

        try:
            self.endpoint = Endpoint(name=url, url=url, model=model, version=version, api_key_env=api_key_env)
        except ValidationError as exc:
            raise ConfigError(f"cloud URL {url!r}: {exc.errors()[0]['msg']}") from None
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1; got {batch_size}")
        self.timeout_s = timeout_s
        self.batch_size = batch_size
        self._client = httpx.Client(timeout=timeout_s, trust_env=False, follow_redirects=False)
        self._info = None

    def __enter__(self) -> "V2BatchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        key = self.endpoint.api_key()
        if key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    def _request(self, method: str, path: str, **kwargs):
        from router.cloud import error_from_status, translate

        ep = self.endpoint
        try:
            r = self._client.request(method, ep.url + path, headers=self._headers(), **kwargs)
        except Exception as exc:  # noqa: BLE001 -- httpx errors, translated here
            raise translate(exc, ep) from exc
        if r.status_code != 200:
            raise error_from_status(r.status_code, r.headers, r.content, ep)
        return r

    def metadata(self):
        from oip.protocol import model_path
        from router.cloud import parse_metadata

        if self._info is None:
            r = self._request("GET", model_path(self.endpoint.model, self.endpoint.version))
            self._info = parse_metadata(r.content, self.endpoint)
        return self._info

    def predict_proba(self, pixels: np.ndarray, config: PreprocessConfig,
                      progress=None) -> tuple[np.ndarray, RemoteModel]:
        """Probabilities for ``uint8 [N, H, W]`` pixels, ``batch_size`` images per request
        (``progress(done, total)`` after each)."""
        from oip.protocol import model_path
        from router.cloud import build_infer_body, parse_infer_response

        info = self.metadata()
        path = model_path(self.endpoint.model, self.endpoint.version) + "/infer"
        out, version = [], ""
        for i in range(0, len(pixels), self.batch_size):
            px = np.ascontiguousarray(pixels[i:i + self.batch_size])
            x = model_input(px, config)
            body = build_infer_body(info, self.endpoint, x, px, self.timeout_s, f"score-{os.getpid()}-{i}")
            r = self._request("POST", path, content=body)
            probs, version = parse_infer_response(r.content, self.endpoint, len(px))
            out.append(probs)
            if progress is not None:
                progress(min(i + self.batch_size, len(pixels)), len(pixels))
        probs = np.concatenate(out) if out else np.empty((0, 0), np.float32)
        version = version or (info.versions[0] if info.versions else "")
        return probs, RemoteModel(self.endpoint.url, self.endpoint.model, version, info.datatype)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
