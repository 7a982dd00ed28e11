"""The router's exceptions: one typed tree, foreign errors translated where they enter.

::

    RouterError
     ├── ConfigError                 invalid policy YAML / arguments (names the file and field)
     ├── InvalidInput (ValueError)   the preprocessing refused the image (from edge_model.InputError)
     ├── EdgeError                   local model missing, corrupt or failing (from edge_model / onnxruntime)
     ├── CloudError                  escalation failed (from httpx and HTTP statuses)
     │    ├── CloudTimeout           an attempt ran out of its share of the deadline
     │    ├── CloudUnavailable       refused / reset / DNS (retry_after when the server said)
     │    │    ├── CloudOverloaded   503 / 429: the server is up but shedding load
     │    │    ├── CloudGatewayError 502 / 504: a proxy in front of the server failed
     │    │    ├── CloudTLSError     the TLS handshake failed (untrusted certificate, not TLS at all)
     │    │    └── CircuitOpen       the breaker (or the readiness probe) said no; no connection was tried
     │    ├── CloudRejected          4xx: the server refused this request (status, message); never retried
     │    │    └── CloudAuthError    401 / 403
     │    ├── CloudServerError       500 and other 5xx that are not worth a retry
     │    └── CloudProtocolError     a body that is not a valid Open Inference Protocol response, or an
     │         │                     impossible one (class count, probabilities outside [0, 1], NaN, too large)
     │         └── CloudIncompatible the endpoint's labels differ from the edge's (checked at first contact)
     ├── PrivacyViolation            a request that would need the network under privacy (cloud_only + privacy)
     └── PredictionUnavailable       neither side could answer; carries ``edge_error`` and ``cloud_error``

``retryable`` on a :class:`CloudError` says whether the retry policy may try the same endpoint again.
``category`` says why an escalation failed, in words an operator acts on (one of
:data:`CLOUD_FAILURE_CATEGORIES`); it travels to ``Prediction.cloud_failure`` and ``stats()``.
"""

from __future__ import annotations

# Why an escalation failed. The class attribute ``category`` below is the one table mapping errors to these.
CLOUD_FAILURE_CATEGORIES = (
    "auth",  # 401 / 403: the key is missing, wrong or not allowed
    "rejected",  # other 4xx: the server refused this request
    "timeout",  # the attempt ran out of its share of the deadline
    "unreachable",  # connection refused / reset, DNS, no route, breaker open
    "tls",  # certificate not trusted, handshake failed
    "server_error",  # 5xx other than 503
    "overloaded",  # 503 / 429
    "protocol",  # malformed or impossible answer
    "incompatible",  # the endpoint's model has other labels than the edge's: never answered under the wrong name
)


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
    category = "unreachable"  # an unexpected failure of the exchange: the cloud could not be used

    def __init__(self, message: str, *, endpoint: str | None = None, status: int | None = None):
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status


class CloudTimeout(CloudError):
    retryable = True
    category = "timeout"


class CloudUnavailable(CloudError):
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class CloudOverloaded(CloudUnavailable):
    category = "overloaded"


class CloudGatewayError(CloudUnavailable):
    category = "server_error"


class CloudTLSError(CloudUnavailable):
    retryable = False  # an untrusted certificate stays untrusted; failover to another endpoint still applies
    category = "tls"


class CircuitOpen(CloudUnavailable):
    retryable = False


class CloudRejected(CloudError):
    category = "rejected"


class CloudAuthError(CloudRejected):
    category = "auth"


class CloudServerError(CloudError):
    category = "server_error"


class CloudProtocolError(CloudError):
    category = "protocol"


class CloudIncompatible(CloudProtocolError):
    """The endpoint serves a model with other class names than the edge's (or publishes none under
    ``labels_check: require``): it is not used, so nothing is answered under the wrong name."""

    category = "incompatible"


class PredictionUnavailable(RouterError):
    """Neither the edge nor the cloud produced an answer within the deadline."""

    def __init__(self, message: str, *, edge_error: BaseException | None = None, cloud_error: BaseException | None = None):
        super().__init__(message)
        self.edge_error = edge_error
        self.cloud_error = cloud_error
