"""The cloud side: the full-precision model behind FastAPI, speaking the Open Inference Protocol v2.

``create_app`` and ``ServiceSettings`` are resolved lazily (module ``__getattr__``) so that
importing a submodule (e.g. ``cloud_service.launch``) never imports FastAPI or uvicorn.

Modules: ``settings`` (YAML + env config),
``errors`` (typed errors), ``batching`` (dynamic batcher), ``dataplane`` (models and inference,
no HTTP), ``metrics`` (Prometheus), ``app`` (FastAPI), ``cli`` / ``__main__`` (uvicorn),
``launch`` (``LocalService``: a service subprocess for tests, eval and the demo).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from cloud_service.app import create_app
    from cloud_service.settings import ServiceSettings, SettingsError, load_settings

_LAZY = {
    "create_app": "cloud_service.app",
    "ServiceSettings": "cloud_service.settings",
    "SettingsError": "cloud_service.settings",
    "load_settings": "cloud_service.settings",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cloud_service' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
