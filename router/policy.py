"""The routing policy: what operators tune in ``config/policy.yaml``.

Validated by pydantic; :func:`load_policy` reports every problem as ``FILE: field.path: message``.
A policy is immutable: the router swaps whole policies atomically on reload, so a request in
flight keeps the snapshot it started with.
"""

from __future__ import annotations

import os
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from router.ab import ExperimentSettings
from router.budget import BudgetSettings
from router.errors import ConfigError

# The default policy ships inside the package, so ``router.predict(img)`` works from any folder of
# an installed client; ``config/policy.yaml`` in the repository is the same file, for operators to copy.
DEFAULT_POLICY_PATH = Path(str(resources.files("router").joinpath("default_policy.yaml")))


# libyaml's safe loader when PyYAML was built with it: ~10x faster than the pure-Python one (the
# default policy: ~0.5 ms instead of ~5 ms of a cold start), same documents.
_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Mode(str, Enum):
    """Where a request is answered, after Firebase AI Logic's inference modes."""

    PREFER_EDGE = "prefer_edge"  # the cascade: edge answers when confident, else escalate
    EDGE_ONLY = "edge_only"  # never the network
    PREFER_CLOUD = "prefer_cloud"  # cloud first; edge when offline, failing or short of budget
    CLOUD_ONLY = "cloud_only"  # strict: cloud or an error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetrySettings(_Strict):
    max_attempts: int = Field(3, ge=1, le=10, description="attempts per escalation, across endpoints")
    initial_backoff_ms: float = Field(5.0, ge=0)
    max_backoff_ms: float = Field(50.0, ge=0)
    multiplier: float = Field(2.0, ge=1.0)
    honour_retry_after: bool = True


class BreakerSettings(_Strict):
    failure_threshold: int = Field(5, ge=1, description="consecutive failures that open the breaker")
    failure_rate_threshold: float = Field(0.5, gt=0, le=1, description="or this failure share over the window")
    window: int = Field(20, ge=2, description="recent calls the failure rate is measured on")
    min_calls: int = Field(10, ge=1, description="calls in the window before the rate may open the breaker")
    open_duration_s: float = Field(5.0, gt=0)
    open_jitter: float = Field(0.2, ge=0, lt=1, description="each open period lasts open_duration_s x "
                                                            "uniform(1 - j, 1 + j): breakers do not phase-lock "
                                                            "with a periodic fault or with each other")
    half_open_max_calls: int = Field(1, ge=1, description="trial calls let through while half-open")


def is_loopback_url(url: str) -> bool:
    """Whether ``url``'s host is this machine (127.0.0.0/8, ::1, localhost): plain http stays on it."""
    import ipaddress
    from urllib.parse import urlsplit

    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Endpoint(_Strict):
    name: Optional[str] = None
    url: str
    model: str = "fashion-mnist"
    version: Optional[str] = None
    api_key_env: Optional[str] = Field(None, description="name of the environment variable holding the API key")
    priority: int = Field(0, description="lower is preferred when selection = priority")
    weight: float = Field(1.0, gt=0)
    input_datatype: Literal["auto", "UINT8", "FP32"] = "auto"
    output_name: str = "probabilities"
    output_kind: Literal["probabilities", "log_probabilities", "logits"] = "probabilities"
    labels_check: Optional[Literal["require", "warn", "off"]] = Field(
        None, description="compare the server's published labels with the edge's at first contact: require (a "
        "server publishing none is refused), warn (logged when none are published), off; default require when "
        "the server publishes labels, warn when it does not. A mismatch is refused unless off")
    initial_latency_ms: float = Field(20.0, gt=0, description="latency estimate before any call succeeded")
    max_batch_size: Optional[int] = Field(
        None, ge=1, description="rows per request the server accepts (Triton's max_batch_size); larger "
                                "escalations are split into concurrent requests")
    # --- transport security and answer bounds (router/cloud.py)
    tls_verify: bool = Field(True, description="false accepts any certificate (logged as a warning): tests only")
    ca_bundle: Optional[str] = Field(None, description="PEM file of the CAs trusted for this endpoint (instead of certifi's)")
    allow_insecure_http: bool = Field(
        False, description="allow sending the API key over plain http to a host that is not loopback")
    max_response_bytes: Optional[int] = Field(
        None, ge=1024, description="cap on a response body; default: derived from rows x classes, at least 64 KiB")
    # --- price of one escalated image, for cloud.budget's money caps (router/budget.py)
    price_per_call: Optional[float] = Field(None, ge=0)
    price_per_1k_calls: Optional[float] = Field(None, ge=0, description="used when price_per_call is not set")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        if not (v.startswith("http://") or v.startswith("https://")):
            raise ValueError("must start with http:// or https://")
        if any(c.isspace() for c in v):
            raise ValueError(f"{v!r} contains white space")
        parts = urlsplit(v)
        if not parts.hostname:
            raise ValueError(f"{v!r} names no host (e.g. http://127.0.0.1:8000)")
        try:
            parts.port  # raises for a port outside 0-65535 or not a number
        except ValueError:
            raise ValueError(f"{v!r} has an invalid port") from None
        return v.rstrip("/")

    @model_validator(mode="after")
    def _transport_security(self) -> "Endpoint":
        if self.url.startswith("http://") and self.api_key_env and not self.allow_insecure_http \
                and not is_loopback_url(self.url):
            raise ValueError(f"endpoint {self.label!r}: refusing to send the API key over plain http to a "
                             "non-loopback host; use https:// or set allow_insecure_http: true")
        if self.ca_bundle is not None:
            if not self.tls_verify:
                raise ValueError(f"endpoint {self.label!r}: ca_bundle is set but tls_verify is false; drop one")
            if not os.path.isfile(self.ca_bundle):
                raise ValueError(f"endpoint {self.label!r}: ca_bundle {self.ca_bundle!r} is not a file")
        return self

    @property
    def key(self) -> str:
        return f"{self.url}|{self.model}|{self.version or ''}"

    @property
    def label(self) -> str:
        return self.name or self.url

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class CloudSettings(_Strict):
    endpoints: tuple[Endpoint, ...] = ()
    selection: Literal["latency", "priority"] = "latency"
    per_try_timeout_ms: float = Field(1000.0, gt=0, description="cap on one attempt; the deadline may cut it shorter")
    connect_timeout_ms: float = Field(250.0, gt=0)
    min_attempt_ms: float = Field(2.0, ge=0, description="an attempt needs at least this much budget to start")
    max_connections: int = Field(32, ge=1)
    health_probe_interval_s: float = Field(0.0, ge=0, description="0 disables the background readiness probe")
    latency_window: int = Field(50, ge=1)
    latency_quantile: float = Field(0.9, gt=0, le=1)
    latency_max_age_s: float = Field(60.0, gt=0, description="latency samples older than this are forgotten")
    retry: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()
    budget: BudgetSettings = Field(BudgetSettings(), description="escalation caps: rate, share, money (router/budget.py)")

    @model_validator(mode="before")
    @classmethod
    def _single_endpoint_shorthand(cls, data):
        # `cloud: {url: ..., model: ...}` is shorthand for one endpoint.
        if isinstance(data, dict) and "url" in data:
            data = dict(data)
            ep = {k: data.pop(k) for k in list(data) if k in Endpoint.model_fields}
            data["endpoints"] = [ep, *data.get("endpoints", ())]
        return data


class EdgeSettings(_Strict):
    manifest: Optional[str] = Field(None, description="edge model manifest; default: the shipped INT8 model")
    intra_op_threads: int = Field(1, ge=1)
    max_pixels: int = Field(25_000_000, ge=1)
    required: bool = Field(False, description="refuse to construct a router whose edge model cannot load")


class UpdateSettings(_Strict):
    """The signed edge-model release channel (router/updates.py); off unless ``enabled``."""

    enabled: bool = False
    url: Optional[str] = Field(None, description="base URL of the published channel (serves metadata/ and targets/)")
    root: Optional[str] = Field(None, description="trusted root.json shipped with the app (relative: to the policy file)")
    dir: Optional[str] = Field(None, description="updater folder (models, metadata cache, device id); "
                                                 "default ~/.cache/hybrid-edge-router/updates")
    check_interval_s: float = Field(3600.0, gt=0)
    max_download_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="cap on the bytes one check downloads")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0, description="cap on the wait for any one chunk")
    max_check_s: float = Field(300.0, gt=0, description="cap on one whole check, downloads included")
    keep_versions: int = Field(3, ge=1, description="model versions kept on disk, the active one included")
    pin: Optional[str] = Field(None, description="take exactly this release version, whatever its rollout share")
    device_id: Optional[str] = Field(None, description="cohort key for staged rollout; default: an id generated "
                                                       "once and kept in the updater folder")
    ca_bundle: Optional[str] = Field(None, description="PEM file of the CAs trusted for an https channel")
    calibration: Literal["release", "policy"] = Field(
        "release", description="release: a release's manifest calibration (threshold, expected escalation) "
                               "replaces the policy's while it answers; policy: the policy's thresholds always")

    @model_validator(mode="after")
    def _complete(self) -> "UpdateSettings":
        if self.enabled and not (self.url and self.root):
            raise ValueError("updates.enabled needs url (the channel) and root (the trusted root.json)")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return self


class DriftSettings(_Strict):
    """The field-monitoring alarm (router/audit.py): the realised escalation rate leaving its
    calibrated band, or audit agreement's upper bound under ``agreement_floor``."""

    window: int = Field(500, ge=20, description="recent edge answers the escalation rate is measured on")
    expected_escalation: Optional[float] = Field(
        None, ge=0, le=1, description="calibrated escalation share; default: the edge manifest's "
                                      "metrics.expected_escalation (no escalation alarm when neither is set)")
    z: float = Field(3.0, gt=0, description="band half-width in binomial standard errors at the window's size")
    confidence: float = Field(0.95, gt=0, lt=1, description="of the Wilson interval on agreement")
    rollback: bool = Field(False, description="the alarm calls rollback_edge() (needs updates.enabled)")


class RoutingPolicy(_Strict):
    mode: Mode = Mode.PREFER_EDGE
    privacy_mode: bool = Field(False, description="local only: no escalation, no probe, no socket")
    confidence_threshold: float = Field(0.8, ge=0, le=1)
    class_thresholds: dict[str, float] = Field(default_factory=dict, description="per-label overrides (name or index)")
    default_deadline_ms: float = Field(150.0, gt=0)
    budget_reserve_ms: float = Field(5.0, ge=0, description="kept back to answer locally after a failed escalation")
    edge: EdgeSettings = EdgeSettings()
    updates: UpdateSettings = UpdateSettings()
    cloud: CloudSettings = CloudSettings()
    decision_log: bool = True
    decision_log_privacy_details: bool = Field(
        False, description="log label and confidence of privacy requests too (off: a private answer is not logged)")
    reload_check_interval_s: float = Field(1.0, ge=0, description="0 disables automatic reload on file change")
    experiments: Optional[ExperimentSettings] = Field(None, description="A/B arms of this policy (router/ab.py)")
    # Field monitoring (router/audit.py); never any of it under privacy_mode.
    audit_rate: float = Field(0.0, ge=0, le=1, description="share of confident edge answers also sent to the "
                                                           "cloud, off the request path, to measure agreement")
    audit_queue: int = Field(64, ge=1, le=10_000, description="audits waiting at most; more are dropped")
    agreement_floor: Optional[float] = Field(None, gt=0, le=1, description="alarm when agreement's upper "
                                                                          "confidence bound falls below this")
    drift: DriftSettings = DriftSettings()
    fleet_report_interval_s: float = Field(0.0, ge=0, description="send aggregate counts per edge version to the "
                                                                   "first endpoint's /v1/fleet/report; 0: off")

    @field_validator("class_thresholds")
    @classmethod
    def _thresholds(cls, v: dict[str, float]) -> dict[str, float]:
        for k, t in v.items():
            if not 0 <= float(t) <= 1:
                raise ValueError(f"threshold for {k!r} must be within [0, 1]")
        return v

    def thresholds_for(self, labels: tuple[str, ...]) -> tuple[float, ...]:
        """The effective threshold of each class index; keys may be label names or indices."""
        out = [self.confidence_threshold] * len(labels)
        for key, t in self.class_thresholds.items():
            if key in labels:
                out[labels.index(key)] = float(t)
            elif str(key).isdigit() and int(key) < len(labels):
                out[int(key)] = float(t)
            else:
                import difflib

                near = difflib.get_close_matches(str(key), labels, n=1)
                hint = f" -- did you mean {near[0]!r}?" if near else f" (labels: {', '.join(labels)})"
                raise ConfigError(f"class_thresholds: {key!r} is neither a label of the edge model nor an index{hint}")
        return tuple(out)

    def with_overrides(self, **overrides) -> "RoutingPolicy":
        """A copy with per-call overrides (None values ignored), re-validated."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if not changes:
            return self
        try:
            return RoutingPolicy.model_validate({**self.model_dump(), **changes})
        except ValidationError as exc:
            raise ConfigError(_format(exc, "arguments")) from None


def _format(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{source}: {loc}: {err['msg']}")
    return "\n".join(lines)


def parse_policy(data: object, source: str = "<policy>") -> RoutingPolicy:
    if data is None:
        # An empty document is never meant as "all defaults": it is what a reader sees while an
        # editor rewrites the file in place, and the defaults include privacy off.
        raise ConfigError(f"{source}: the policy is empty; write at least one setting (e.g. mode: prefer_edge)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the policy must be a mapping, got {type(data).__name__}")
    try:
        return RoutingPolicy.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from None


def load_policy(path: str | os.PathLike | None = None) -> RoutingPolicy:
    """Read and validate a policy YAML file (default: ``$HYBRID_ROUTER_POLICY``, else the packaged default)."""
    path = Path(path or os.environ.get("HYBRID_ROUTER_POLICY") or DEFAULT_POLICY_PATH)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: policy file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read policy ({exc})") from exc
    return parse_policy_text(text, str(path))


def parse_policy_text(text: str, source: str = "<policy>") -> RoutingPolicy:
    """A policy from YAML text; an empty (or comments-only) document is a ConfigError."""
    try:
        try:
            data = yaml.load(text, Loader=_FAST_LOADER)
        except yaml.YAMLError:  # the pure-Python parser says what is wrong more plainly ('\t', <stream end>)
            data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}") from None
    return parse_policy(data, source)
