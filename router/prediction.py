"""What ``predict()`` returns: the answer, which side gave it, and why."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict


class Reason(str, Enum):
    def __str__(self) -> str:  # print(p.reason) shows "cloud_error", not "Reason.CLOUD_ERROR"
        return self.value

    CONFIDENT = "confident"  # edge: calibrated confidence reached the threshold
    LOW_CONFIDENCE = "low_confidence"  # cloud: the edge was unsure
    PRIVACY = "privacy"  # edge: privacy forbids the network
    OFFLINE = "offline"  # edge: no endpoint configured, or the readiness probe says none is ready
    BREAKER_OPEN = "breaker_open"  # edge: every endpoint's circuit breaker is open
    BUDGET = "budget"  # edge: the estimated cloud latency does not fit the remaining budget
    ESCALATION_BUDGET = "escalation_budget"  # edge: an escalation cap (rate, share, cost) binds (cloud.budget)
    EDGE_ERROR = "edge_error"  # cloud: the edge model failed
    CLOUD_ERROR = "cloud_error"  # edge: the escalation failed within the deadline
    MODE = "mode"  # where the routing mode puts it (edge_only, prefer_cloud, cloud_only)
    # Progressive answers (router.progressive): the edge's first answer, and how it stood.
    PROVISIONAL = "provisional"  # edge: first answer; the cloud's refinement is on its way
    REFINEMENT_LATE = "refinement_late"  # edge: no refinement within the deadline; the first answer stands
    REFINEMENT_FAILED = "refinement_failed"  # edge: the refinement failed (see cloud_failure); the first answer stands
    REFINEMENT_CANCELLED = "refinement_cancelled"  # edge: the caller cancelled the refinement


class Timings(BaseModel):
    model_config = ConfigDict(frozen=True)

    edge_ms: float = 0.0
    cloud_ms: float = 0.0
    total_ms: float = 0.0


class EdgeOpinion(BaseModel):
    """The edge's own answer, kept for audit when the cloud answered."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    label: str
    class_index: int
    confidence: float
    model_version: str


@dataclass(frozen=True)
class CloudFailure:
    """Why an escalation failed: ``category`` is one of ``router.errors.CLOUD_FAILURE_CATEGORIES``
    (auth, rejected, timeout, unreachable, tls, server_error, overloaded, protocol)."""

    category: str
    message: str
    endpoint: Optional[str] = None

    @classmethod
    def from_error(cls, exc: BaseException) -> "CloudFailure":
        """From a ``CloudError`` (its ``category`` class attribute is the one mapping table)."""
        return cls(getattr(exc, "category", "unreachable"), str(exc), getattr(exc, "endpoint", None))


def build(cls: type[BaseModel], **values):
    """Build a model from values the router computed itself, skipping validation.

    pydantic's ``model_construct`` still walks every field (~27 us here, more than validating);
    this sets the instance state directly (~5 us), which matters on the confident hot path whose
    whole budget is a few tens of microseconds. Fields not given take their (immutable) defaults.
    """
    if len(values) != len(_FIELDS[cls]):
        defaults = _DEFAULTS[cls]  # in field order: dumps keep the schema's order
        values = {k: values[k] if k in values else defaults[k] for k in cls.model_fields}
    return build_from(cls, values)


def build_from(cls: type[BaseModel], values: dict):
    """:func:`build` from a dict giving every field, in schema order, taken as the instance's
    state (not copied). For per-image loops: 15 keyword arguments cost ~3 us to pass here."""
    obj = _new(cls)
    _set_dict(obj, values)
    _set_fields_set(obj, _FIELDS[cls])
    _set_extra(obj, None)
    _set_private(obj, None)
    return obj


# BaseModel's four instance slots, set through their descriptors: what object.__setattr__ ends
# in, without its attribute lookup along the class's MRO (half of build_from's cost).
_new = object.__new__
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


class Prediction(BaseModel):
    model_config = ConfigDict(frozen=True, protected_namespaces=())

    label: str
    class_index: int
    confidence: float
    probabilities: list[float]
    source: Literal["edge", "cloud"]
    reason: Reason
    fallback: bool = False  # the side the policy chose for this request failed or was unreachable
    model_version: str
    timings: Timings
    attempts: int = 0  # cloud attempts made (0 when the request never left the device)
    request_id: str
    endpoint: Optional[str] = None  # which cloud endpoint answered
    edge: Optional[EdgeOpinion] = None
    cloud_failure: Optional[CloudFailure] = None  # why the escalation failed, when it did
    arm: Optional[str] = None  # the A/B arm (policy `experiments`) that routed this request


class _FieldsSet(frozenset):
    """The field-set every answer shares (one object, never mutated). Copying it gives a mutable
    set: ``model_copy(update=...)`` copies the model's field set and then adds to the copy."""

    __slots__ = ()

    def __copy__(self) -> set:
        return set(self)


_FIELDS = {cls: _FieldsSet(cls.model_fields) for cls in (Timings, EdgeOpinion, Prediction)}
_DEFAULTS = {cls: {k: f.default for k, f in cls.model_fields.items() if not f.is_required()}  # all immutable
             for cls in (Timings, EdgeOpinion, Prediction)}
