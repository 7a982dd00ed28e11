"""The process-wide router behind the module-level ``router.predict(image)``."""

from __future__ import annotations

import atexit
import threading

from router.api import Router
from router.prediction import Prediction

_default: Router | None = None
_default_lock = threading.Lock()


def default_router() -> Router:
    """The process-wide router over the default policy file (created on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Router.from_config()
                atexit.register(_default.close)
    return _default


def predict(image, **kwargs) -> Prediction:
    """``router.predict(image, deadline_ms=..., privacy=..., mode=...)`` over the default config."""
    return default_router().predict(image, **kwargs)
