"""The router's exceptions: one typed tree, foreign errors translated where they enter.

::

    RouterError
     ├── ConfigError                 invalid policy YAML / arguments (names the file and field)
     ├── InvalidInput (ValueError)   the preprocessing refused the image (from edge_model.InputError)
     ├── EdgeError                   local model missing, corrupt or failing (from edge_model / onnxruntime)
     ├── CloudError                  escalation failed (from httpx and HTTP statuses)
     │    ├── CloudTimeout           an attempt ran out of its share of the deadline
     │    ├── CloudUnavailable       refused / reset / DNS / 502 / 503 / 504 (retry_after when the server said)
     │    │    └── CircuitOpen       the breaker (or the readiness probe) said no; no connection was tried
     │    ├── CloudRejected          4xx: the server refused this request (status, message); never retried
     │    │    └── CloudAuthError    401 / 403
     │    ├── CloudServerError       500 and other 5xx that are not worth a retry
     │    └── CloudProtocolError     a body that is not a valid Open Inference Protocol response
     ├── PrivacyViolation            a request that would need the network under privacy (cloud_only + privacy)
     └── PredictionUnavailable       neither side could answer; carries ``edge_error`` and ``cloud_error``

``retryable`` on a :class:`CloudError` says whether the retry policy may try the same endpoint again.
"""

from __future__ import annotations


class RouterError(Exception):
    """Base class of everything the router raises."""


class ConfigError(RouterError):
    pass


class InvalidInput(RouterError, ValueError):
    pass


class EdgeError(RouterError):
    pass


class PrivacyViolation(RouterError):
    pass


class CloudError(RouterError):
    retryable = False

    def __init__(self, message: str, *, endpoint: str | None = None, status: int | None = None):
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status


class CloudTimeout(CloudError):
    retryable = True


class CloudUnavailable(CloudError):
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class CircuitOpen(CloudUnavailable):
    retryable = False


class CloudRejected(CloudError):
    pass


class CloudAuthError(CloudRejected):
    pass


class CloudServerError(CloudError):
    pass


class CloudProtocolError(CloudError):
    pass


class PredictionUnavailable(RouterError):
    """Neither the edge nor the cloud produced an answer within the deadline."""

    def __init__(self, message: str, *, edge_error: BaseException | None = None, cloud_error: BaseException | None = None):
        super().__init__(message)
        self.edge_error = edge_error
        self.cloud_error = cloud_error
