"""Service settings: YAML file + ``HYBRID_CLOUD__SECTION__FIELD`` environment overrides, validated by pydantic.

Precedence (lowest first): defaults < YAML file < environment < command line. Every invalid
value raises :class:`SettingsError` whose message names where the value came from (the file,
the environment variable or the command-line option) and the dotted field, e.g.::

    config/cloud.yaml: batching.max_batch_size: Input should be greater than or equal to 1 (got 0)
    environment HYBRID_CLOUD__RUNTIME__INTRA_OP_THREADS: runtime.intra_op_threads: ...

Environment values are parsed as YAML scalars, so ``8``, ``true``, ``2.5`` and ``[a, b]`` work.
A relative ``model.manifest`` in a file is resolved against that file's directory.
API keys are ``SecretStr`` (never printed) and may come from an environment variable named by
``auth.api_keys_env`` (comma-separated), so they need not be written into the file.

Imports pydantic and PyYAML only (no FastAPI), so the CLI can validate a config cheaply.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

ENV_PREFIX = "HYBRID_CLOUD__"
CONFIG_ENV = "HYBRID_CLOUD_CONFIG"  # path of the YAML file when none is passed explicitly
SETTINGS_JSON_ENV = "HYBRID_CLOUD_SETTINGS_JSON"  # resolved settings handed to uvicorn worker processes
DEFAULT_MANIFEST = Path(__file__).resolve().parent / "artifacts" / "cloud-fp32.json"
MIN_KEY_LENGTH = 16


class SettingsError(ValueError):
    """Invalid or unreadable settings; the message names the source and the dotted field."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ModelSettings(_Section):
    manifest: Path = Field(DEFAULT_MANIFEST, description="manifest JSON of the ONNX model to serve")
    name: str = Field("fashion-mnist", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="served model name")

    @field_validator("manifest")
    @classmethod
    def _expand_user(cls, path: Path) -> Path:
        return path.expanduser()  # "~/models/x.json" from a file, the environment or the command line


class BatchingSettings(_Section):
    enabled: bool = True
    max_batch_size: int = Field(32, ge=1, le=4096, description="rows per ONNX Runtime call")
    max_queue_delay_ms: float = Field(2.0, ge=0, le=60_000, description="longest wait for a batch to fill")
    dispatch_when_idle: bool = Field(
        True, description="start a batch at once when an execution instance is idle (false: wait max_queue_delay_ms)"
    )
    max_queue_size: int = Field(256, ge=1, le=1_000_000, description="queued requests before 503")
    default_timeout_ms: Optional[float] = Field(
        None, gt=0, description="budget of requests that carry no parameters.timeout (None: unbounded)"
    )


class RuntimeSettings(_Section):
    intra_op_threads: int = Field(1, ge=1, le=256)
    inter_op_threads: int = Field(1, ge=1, le=256)
    instances: int = Field(1, ge=1, le=64, description="batches executed concurrently (Triton instance_group count)")
    solo_threads: int = Field(
        0, ge=0, le=256,
        description="intra-op threads of a batch that runs alone (no other batch running or queued): "
                    "a lone request then uses the cores the instances would share; 0: off (also with batching off)",
    )
    warmup_runs: int = Field(3, ge=0, le=1000)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes (each loads the model)")
    graceful_timeout_s: float = Field(10.0, gt=0, le=3600, description="in-flight requests may finish this long")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = False
    # HTTP hardening (cloud_service.app.HardenedHttpProtocol); every client gets a bounded share.
    max_header_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024,
                                  description="request line + headers; larger is answered 431 and closed")
    header_timeout_s: float = Field(10.0, gt=0, le=3600,
                                    description="a request's line and headers must arrive within this (else 408, closed)")
    body_timeout_s: float = Field(30.0, gt=0, le=3600,
                                  description="longest pause while a request body streams in (else 408, closed)")
    keep_alive_s: float = Field(5.0, gt=0, le=3600, description="idle keep-alive connections are closed after this")
    limit_concurrency: int = Field(512, ge=1, le=1_000_000,
                                   description="open connections; more are answered 503 JSON and closed "
                                               "(also capped below the process's file-descriptor limit)")


class LimitsSettings(_Section):
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request body limit (413), enforced while streaming")
    max_pixels: int = Field(25_000_000, ge=1, description="image width x height limit, checked from the header (413)")
    max_decoded_bytes: int = Field(160 * 1024 * 1024, ge=1024 * 1024,
                                   description="peak decode memory of one image, from its header (413); a 25 M pixel RGBA needs 150 MB")
    decode_budget_bytes: int = Field(320 * 1024 * 1024, ge=1024 * 1024,
                                     description="decoded bytes all concurrent image decodes may hold together")
    decode_wait_s: float = Field(15.0, ge=0, le=600,
                                 description="how long an image waits for decode budget before 503 + Retry-After")

    @model_validator(mode="after")
    def _budget_holds_one_image(self) -> "LimitsSettings":
        if self.max_decoded_bytes > self.decode_budget_bytes:
            raise ValueError(f"max_decoded_bytes ({self.max_decoded_bytes}) exceeds decode_budget_bytes "
                             f"({self.decode_budget_bytes}): one image could never be decoded")
        return self


class AuthSettings(_Section):
    api_keys: list[SecretStr] = Field(default_factory=list, description="accepted Bearer keys")
    api_keys_env: Optional[str] = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="environment variable holding comma-separated keys"
    )
    public_metrics: bool = Field(True, description="serve /metrics without a key (health endpoints are always open)")

    @field_validator("api_keys")
    @classmethod
    def _long_enough(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for i, key in enumerate(keys):
            if len(key.get_secret_value()) < MIN_KEY_LENGTH:
                raise ValueError(f"key #{i} is shorter than {MIN_KEY_LENGTH} characters")
        return keys

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys) or self.api_keys_env is not None

    def resolve_keys(self, env: Mapping[str, str]) -> tuple[bytes, ...]:
        """All accepted keys as bytes; fails closed if ``api_keys_env`` names an unset/empty variable."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_env is not None:
            raw = env.get(self.api_keys_env, "")
            from_env = [k.strip() for k in raw.split(",") if k.strip()]
            if not from_env:
                raise SettingsError(
                    f"auth.api_keys_env: environment variable {self.api_keys_env} is unset or empty "
                    "(refusing to start without the keys it should hold)"
                )
            short = [i for i, k in enumerate(from_env) if len(k) < MIN_KEY_LENGTH]
            if short:
                raise SettingsError(
                    f"auth.api_keys_env: key #{short[0]} in {self.api_keys_env} is shorter than {MIN_KEY_LENGTH} characters"
                )
            keys.extend(from_env)
        return tuple(k.encode() for k in keys)


class RaySettings(_Section):
    """Scale-out on Ray Serve (``hybrid-router serve --engine ray``); unused by the local engine."""

    address: Optional[str] = Field(None, description="Ray cluster address; None starts a local Ray")
    replicas: int = Field(1, ge=1, le=1024)
    autoscale_min_replicas: Optional[int] = Field(None, ge=0, le=1024)
    autoscale_max_replicas: Optional[int] = Field(None, ge=1, le=1024)
    target_ongoing_requests: float = Field(2.0, gt=0)
    num_cpus: float = Field(0.5, gt=0, description="CPUs reserved per replica (fractional is fine)")
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(128, ge=-1, description="-1: unbounded (Ray's default)")
    request_timeout_s: Optional[float] = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _autoscale_pair(self) -> "RaySettings":
        lo, hi = self.autoscale_min_replicas, self.autoscale_max_replicas
        if (lo is None) != (hi is None):
            raise ValueError("set both autoscale_min_replicas and autoscale_max_replicas, or neither")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"autoscale_min_replicas ({lo}) exceeds autoscale_max_replicas ({hi})")
        return self

    @property
    def autoscaling(self) -> Optional[dict[str, Any]]:
        """Ray Serve ``autoscaling_config`` or ``None`` for a fixed replica count."""
        if self.autoscale_min_replicas is None:
            return None
        return {
            "min_replicas": self.autoscale_min_replicas,
            "max_replicas": self.autoscale_max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }


class ServiceSettings(_Section):
    model: ModelSettings = Field(default_factory=ModelSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    ray: RaySettings = Field(default_factory=RaySettings)

    def to_json(self) -> str:
        """JSON that :meth:`from_json` restores exactly -- keys included (only for child processes)."""
        data = self.model_dump(mode="json")
        data["auth"]["api_keys"] = [k.get_secret_value() for k in self.auth.api_keys]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "ServiceSettings":
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise _describe(exc, lambda loc: SETTINGS_JSON_ENV) from None


# ----------------------------------------------------------------------------- loading

def load_settings(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> ServiceSettings:
    """Defaults < YAML at ``path`` (or ``$HYBRID_CLOUD_CONFIG``) < ``HYBRID_CLOUD__*`` variables."""
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = env[CONFIG_ENV]
    data: dict[str, Any] = {}
    file_label = "defaults"
    if path is not None:
        path = Path(path)
        file_label = str(path)
        data = _read_yaml(path)
        manifest = data.get("model", {}).get("manifest") if isinstance(data.get("model"), dict) else None
        if isinstance(manifest, str) and manifest and not Path(manifest).expanduser().is_absolute():
            data["model"]["manifest"] = str((path.resolve().parent / manifest).resolve())
    env_sources: dict[tuple[str, ...], str] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = tuple(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
        if not all(keys):
            raise SettingsError(f"environment {name}: malformed name (use {ENV_PREFIX}SECTION__FIELD)")
        try:
            value = yaml.safe_load(env[name])
        except yaml.YAMLError:
            value = env[name]
        _set_path(data, keys, value, name)
        env_sources[keys] = name

    def source(loc: tuple) -> str:
        keys = tuple(str(p) for p in loc)
        for n in range(len(keys), 0, -1):
            if keys[:n] in env_sources:
                return f"environment {env_sources[keys[:n]]}"
        return file_label

    try:
        return ServiceSettings.model_validate(data)
    except ValidationError as exc:
        raise _describe(exc, source) from None


def apply_overrides(settings: ServiceSettings, overrides: Mapping[str, tuple[str, Any]]) -> ServiceSettings:
    """Re-validate ``settings`` with ``{"server.port": ("--port", 9000), ...}``; ``None`` values are skipped.

    The first element of each tuple names the source in error messages (a command-line option).
    """
    data = settings.model_dump()
    sources: dict[tuple[str, ...], str] = {}
    for dotted, (label, value) in overrides.items():
        if value is None:
            continue
        keys = tuple(dotted.split("."))
        _set_path(data, keys, value, label)
        sources[keys] = label

    def source(loc: tuple) -> str:
        keys = tuple(str(p) for p in loc)
        for n in range(len(keys), 0, -1):
            if keys[:n] in sources:
                return f"option {sources[keys[:n]]}"
        return "settings"

    try:
        return ServiceSettings.model_validate(data)
    except ValidationError as exc:
        raise _describe(exc, source) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"{path}: settings file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: cannot read settings file ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise SettingsError(f"{path}:{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: top level must be a mapping of sections, not {type(data).__name__}")
    return data


def _set_path(data: dict[str, Any], keys: tuple[str, ...], value: Any, label: str) -> None:
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SettingsError(f"{label}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def _describe(exc: ValidationError, source) -> SettingsError:
    problems = []
    for err in exc.errors(include_url=False, include_context=False):
        loc = err["loc"]
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"]
        # Echo short non-secret values to help the operator; never anything under auth.
        value = err.get("input")
        if err["type"] != "missing" and (not loc or loc[0] != "auth") and isinstance(value, (int, float, str, bool)):
            text = repr(value)
            if len(text) <= 60:
                msg = f"{msg} (got {text})"
        problems.append(f"{source(loc)}: {dotted}: {msg}")
    return SettingsError("; ".join(problems), problems)
