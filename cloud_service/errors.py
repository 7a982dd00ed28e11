"""Typed errors of the cloud service's data plane.

::

    ServiceError                 base; ``message`` is safe to return to the client
     ├── InvalidRequest          bad JSON, shape, datatype, element count, image      -> 400
     ├── Unauthorized            missing or wrong API key                              -> 401
     ├── ModelNotFound           unknown model name or version                         -> 404
     ├── PayloadTooLarge         body over ``limits.max_body_bytes`` / image pixels    -> 413
     ├── Unavailable             not ready yet, or shutting down                       -> 503
     │    └── Overloaded         queue full; carries ``retry_after`` seconds           -> 503
     ├── DeadlineExceeded        the request's budget ran out before it was computed   -> 504
     └── InferenceFailed         onnxruntime failed on a valid request                 -> 500

The HTTP status of each lives in ONE table, ``cloud_service.app.STATUS_BY_ERROR``; nothing
below the app knows about HTTP. Messages never contain request payload (tensor values,
image bytes) or keys: they are returned to clients and logged.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the data plane's errors."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ServiceError):
    pass


class Unauthorized(ServiceError):
    pass


class ModelNotFound(ServiceError):
    pass


class PayloadTooLarge(ServiceError):
    pass


class Unavailable(ServiceError):
    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(Unavailable):
    pass


class DeadlineExceeded(ServiceError):
    pass


class InferenceFailed(ServiceError):
    pass
