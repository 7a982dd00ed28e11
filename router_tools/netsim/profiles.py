"""Network profiles: what a simulated link does to the bytes crossing it.

A :class:`NetworkProfile` is a validated, immutable value. ``PROFILES`` holds the named ones
the CLI offers (``--network wifi``); :func:`profile_from_args` builds one from a name and/or
explicit ``--rtt-ms/--jitter-ms/--loss`` values.

Delay model (per direction, per chunk read from the socket)::

    one_way   = max(0, rtt/2 + U(-jitter/2, +jitter/2))     -> RTT varies within rtt ± jitter
    delivered = max(arrival + serialisation + one_way + slow/2 + loss_penalty, previous delivery)

Loss is modelled as TCP experiences it (see :mod:`router_tools.netsim.link`): bytes are never
dropped from the stream; a lost segment costs a retransmission delay.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any, Optional

from .errors import ProfileError


class Mode(str, enum.Enum):
    """What the proxy does with connections (switchable at runtime)."""

    NORMAL = "normal"        # the profile applies
    REFUSE = "refuse"        # not listening: connect() fails with ECONNREFUSED; live connections are reset
    BLACKHOLE = "blackhole"  # accepts and reads, never answers; live connections go silent
    RESET = "reset"          # accepts, then RST; live connections are reset
    SLOW = "slow"            # the profile plus a fixed extra round-trip delay (``slow_ms``)

    @classmethod
    def parse(cls, value: "Mode | str") -> "Mode":
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            known = ", ".join(m.value for m in cls)
            raise ProfileError(f"unknown network mode {value!r} (known: {known})") from None


@dataclass(frozen=True)
class NetworkProfile:
    """One direction-symmetric link. Times in milliseconds, probabilities in [0, 1]."""

    name: str = "custom"
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0                      # per-segment loss probability (costs a retransmission delay)
    bandwidth_bytes_per_s: Optional[float] = None  # None = unlimited
    reset_probability: float = 0.0         # per client->server chunk (~per HTTP request): connection reset
    mode: Mode = Mode.NORMAL
    slow_ms: float = 0.0                   # extra round-trip delay while in Mode.SLOW
    rto_min_ms: float = 200.0              # Linux's minimum retransmission timeout

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.parse(self.mode))
        _check_number(self, "rtt_ms", low=0.0)
        _check_number(self, "jitter_ms", low=0.0)
        _check_number(self, "slow_ms", low=0.0)
        _check_number(self, "rto_min_ms", low=0.0, strict=True)
        _check_number(self, "loss", low=0.0, high=1.0, high_open=True)
        _check_number(self, "reset_probability", low=0.0, high=1.0)
        if self.bandwidth_bytes_per_s is not None:
            _check_number(self, "bandwidth_bytes_per_s", low=0.0, strict=True)
        if not isinstance(self.name, str) or not self.name:
            raise ProfileError("network profile: field 'name' must be a non-empty string")

    # Times in seconds, as the event loop counts them.
    @property
    def rtt_s(self) -> float:
        return self.rtt_ms / 1000.0

    @property
    def rto_s(self) -> float:
        """Retransmission timeout charged for a lost segment: max(rto_min, 2*rtt)."""
        return max(self.rto_min_ms, 2.0 * self.rtt_ms) / 1000.0

    def replace(self, **changes: Any) -> "NetworkProfile":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        if self.mode is Mode.REFUSE:
            return f"{self.name}: offline (connections refused)"
        parts = [f"rtt {self.rtt_ms:g} ms"]
        if self.jitter_ms:
            parts.append(f"jitter ±{self.jitter_ms:g} ms")
        if self.loss:
            parts.append(f"loss {self.loss * 100:g}%")
        if self.bandwidth_bytes_per_s:
            parts.append(f"{self.bandwidth_bytes_per_s / 1e6:g} MB/s")
        if self.reset_probability:
            parts.append(f"resets {self.reset_probability * 100:g}%")
        if self.mode is not Mode.NORMAL:
            parts.append(f"mode {self.mode.value}")
        return f"{self.name}: " + ", ".join(parts)


def _check_number(p: NetworkProfile, field: str, *, low: float, high: float | None = None,
                  strict: bool = False, high_open: bool = False) -> None:
    value = getattr(p, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProfileError(f"network profile {p.name!r}: field {field!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ProfileError(f"network profile {p.name!r}: field {field!r} must be finite, got {value!r}")
    if value < low or (strict and value == low):
        op = ">" if strict else ">="
        raise ProfileError(f"network profile {p.name!r}: field {field!r} must be {op} {low:g}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        op = "<" if high_open else "<="
        raise ProfileError(f"network profile {p.name!r}: field {field!r} must be {op} {high:g}, got {value!r}")
    object.__setattr__(p, field, float(value))


PROFILES: dict[str, NetworkProfile] = {
    p.name: p
    for p in (
        NetworkProfile("loopback"),
        NetworkProfile("lan", rtt_ms=1.0),
        NetworkProfile("wifi", rtt_ms=10.0, jitter_ms=5.0),
        NetworkProfile("4g", rtt_ms=50.0, jitter_ms=15.0, loss=0.005),
        NetworkProfile("wan40", rtt_ms=40.0, jitter_ms=2.0),
        NetworkProfile("flaky", rtt_ms=30.0, jitter_ms=20.0, loss=0.03, reset_probability=0.02),
        NetworkProfile("offline", mode=Mode.REFUSE),
    )
}


def get_profile(name: "str | NetworkProfile") -> NetworkProfile:
    """A named profile (case-insensitive), or the profile itself."""
    if isinstance(name, NetworkProfile):
        return name
    try:
        return PROFILES[str(name).lower()]
    except KeyError:
        raise ProfileError(f"unknown network profile {name!r} (known: {', '.join(PROFILES)})") from None


def profile_from_args(name: Optional[str] = None, rtt_ms: Optional[float] = None,
                      jitter_ms: Optional[float] = None, loss: Optional[float] = None) -> NetworkProfile:
    """A profile from ``--network NAME`` and/or explicit ``--rtt-ms/--jitter-ms/--loss`` overrides.

    No name and no values -> ``loopback``. Explicit values override the named profile's.
    ``loss`` is a fraction (0.005) or a percent string ("0.5%").
    """
    base = get_profile(name) if name else PROFILES["loopback"]
    changes: dict[str, Any] = {}
    if rtt_ms is not None:
        changes["rtt_ms"] = rtt_ms
    if jitter_ms is not None:
        changes["jitter_ms"] = jitter_ms
    if loss is not None:
        changes["loss"] = parse_loss(loss) if isinstance(loss, str) else loss
    if not changes:
        return base
    if base.mode is Mode.REFUSE:
        raise ProfileError(f"network profile {base.name!r} is offline; --rtt-ms/--jitter-ms/--loss do not apply")
    label = ",".join(f"{k.removesuffix('_ms')}={v}" for k, v in changes.items())
    return base.replace(name=f"{base.name if name else 'custom'}({label})", **changes)


def parse_loss(text: "str | float") -> float:
    """``"0.5%"`` -> 0.005, ``"0.005"`` -> 0.005 (an argparse ``type=``)."""
    try:
        if isinstance(text, str) and text.strip().endswith("%"):
            value = float(text.strip()[:-1]) / 100.0
        else:
            value = float(text)
    except ValueError:
        raise ProfileError(f"loss must be a fraction like 0.005 or a percent like 0.5%, got {text!r}") from None
    if not (0.0 <= value < 1.0):
        raise ProfileError(f"loss must be in [0, 1), got {text!r}")
    return value


def _loss_type(text: str) -> float:
    try:
        return parse_loss(text)
    except ProfileError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """``--network/--rtt-ms/--jitter-ms/--loss`` for commands that reach the cloud through a proxy."""
    g = parser.add_argument_group("simulated network (the cloud is reached through a loopback proxy)")
    g.add_argument("--network", metavar="PROFILE", default=None,
                   help=f"named network profile: {', '.join(PROFILES)}")
    g.add_argument("--rtt-ms", type=float, default=None, help="round-trip time added by the proxy (ms)")
    g.add_argument("--jitter-ms", type=float, default=None, help="RTT variation, uniform within ± this (ms)")
    g.add_argument("--loss", type=_loss_type, default=None,
                   help="segment loss probability, as 0.005 or 0.5%% (costs TCP retransmission delay)")


def profile_from_namespace(args: argparse.Namespace) -> Optional[NetworkProfile]:
    """The profile asked for by :func:`add_network_arguments` options, or None when none was given."""
    values = [getattr(args, k, None) for k in ("network", "rtt_ms", "jitter_ms", "loss")]
    if all(v is None for v in values):
        return None
    return profile_from_args(*values)
