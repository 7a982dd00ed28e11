"""Whole-set model outputs for ``calibrate`` and ``eval``: the edge and cloud models' probabilities
on a labeled set, from the model files (batched ONNX Runtime) or from a running Open Inference
Protocol v2 service (batched requests).

The v2 path *is* the router's client (:class:`router.cloud.CloudClient`) driven from a private
event loop: it sends exactly what the router sends (compact UINT8 pixels when the server accepts
them, the same headers and key rules), trusts exactly what the router trusts, checks answers the
same way, and errors arrive as the router's typed ``CloudError`` tree.
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
    """``uint8 [N, *config.pixel_shape]`` -> normalised model input ``[N, *config.sample_shape]``
    (the router's own preprocessing; ``[N, 1, H, W]`` for a one-channel NCHW model)."""
    return normalise(pixels, config).reshape(len(pixels), *config.sample_shape)


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
    """Batched v2 inference against one endpoint (sync; for whole-set scoring, not for routing).
    ``classes``: the label count answers must have (checked when given)."""

    def __init__(self, url: str, model: str = "fashion-mnist", *, version: Optional[str] = None,
                 api_key_env: Optional[str] = None, timeout_s: float = 60.0, batch_size: int = 64,
                 classes: Optional[int] = None, ca_bundle: Optional[str] = None) -> None:
        import asyncio

        from pydantic import ValidationError

        from router.cloud import CloudClient
        from router.errors import ConfigError
        from router.health import EndpointState
        from router.policy import CloudSettings, Endpoint

        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1; got {batch_size}")
        try:
            self.endpoint = Endpoint(name=url, url=url, model=model, version=version, api_key_env=api_key_env,
                                     ca_bundle=ca_bundle)
            settings = CloudSettings(endpoints=(self.endpoint,), per_try_timeout_ms=timeout_s * 1000.0,
                                     connect_timeout_ms=min(timeout_s, 10.0) * 1000.0, max_connections=1)
        except ValidationError as exc:
            raise ConfigError(f"cloud URL {url!r}: {exc.errors()[0]['msg']}") from None
        self.timeout_s = timeout_s
        self.batch_size = batch_size
        self._state = EndpointState(self.endpoint, settings)
        self._cloud = CloudClient(settings, classes=classes)
        self._loop = asyncio.new_event_loop()

    def __enter__(self) -> "V2BatchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._cloud.aclose())
            self._loop.close()

    def metadata(self):
        if self._state.meta is None:
            self._loop.run_until_complete(self._cloud.fetch_metadata(self._state, self.timeout_s))
        return self._state.meta

    def predict_proba(self, pixels: np.ndarray, config: PreprocessConfig,
                      progress=None) -> tuple[np.ndarray, RemoteModel]:
        """Probabilities for ``uint8 [N, H, W]`` pixels, ``batch_size`` images per request
        (``progress(done, total)`` after each)."""
        from router.decision import CloudCall
        from router.errors import CloudError

        info = self.metadata()
        out, version = [], ""
        for i in range(0, len(pixels), self.batch_size):
            px = np.ascontiguousarray(pixels[i:i + self.batch_size])
            call = CloudCall(self._state, model_input(px, config), px, self.timeout_s, self.timeout_s,
                             f"score-{os.getpid()}-{i}")
            reply = self._loop.run_until_complete(self._cloud.infer(call))
            if isinstance(reply, CloudError):
                raise reply
            out.append(reply.probs)
            version = reply.model_version
            if progress is not None:
                progress(min(i + self.batch_size, len(pixels)), len(pixels))
        probs = np.concatenate(out) if out else np.empty((0, 0), np.float32)
        version = version or (info.versions[0] if info.versions else "")
        return probs, RemoteModel(self.endpoint.url, self.endpoint.model, version, info.datatype)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
