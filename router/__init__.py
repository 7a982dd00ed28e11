"""Hybrid edge/cloud inference router: one ``predict()`` that answers on-device or escalates.

    from router import Router
    with Router.from_config("config/policy.yaml") as r:
        p = r.predict(image, deadline_ms=150)
        print(p.label, p.source, p.reason)

See :mod:`router.api` (front-ends), :mod:`router.flow` + :mod:`router.rules` (the sans-I/O core),
:mod:`router.policy` (the YAML schema) and :mod:`router.errors` (the exception tree).
This package's core imports neither FastAPI nor uvicorn.
"""

from router._default import default_router, predict
from router.api import Router
from router.errors import (
    CircuitOpen,
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
    ConfigError,
    EdgeError,
    InvalidInput,
    PredictionUnavailable,
    PrivacyViolation,
    RouterError,
)
from router.policy import Endpoint, Mode, RoutingPolicy, load_policy
from router.prediction import CloudFailure, EdgeOpinion, Prediction, Reason, Timings
from router.progressive import ProgressiveHandle

__all__ = [
    "CircuitOpen", "CloudAuthError", "CloudError", "CloudGatewayError", "CloudIncompatible", "CloudOverloaded", "CloudTLSError", "CloudProtocolError", "CloudRejected", "CloudServerError",
    "CloudTimeout", "CloudUnavailable", "CloudFailure", "ConfigError", "EdgeError", "EdgeOpinion", "Endpoint",
    "InvalidInput", "Mode", "Prediction", "PredictionUnavailable", "ProgressiveHandle", "PrivacyViolation", "Reason",
    "Router", "RouterError",
    "RoutingPolicy", "Timings", "default_router", "load_policy", "predict",
]
