"""Real loopback network faults for tests, ``hybrid-router eval --network`` and the demo.

Pure asyncio + stdlib (no web framework, no HTTP client). Two tools, each running its own event
loop in a background thread so sync and async code can drive them alike:

* :class:`NetworkProxy` -- a TCP proxy on 127.0.0.1 that applies a :class:`NetworkProfile`
  (RTT, jitter, bandwidth, TCP-style loss, random resets) to a loopback upstream, and whose mode
  can be switched at runtime (``normal``, ``refuse``, ``blackhole``, ``reset``, ``slow``).
* :class:`FaultServer` -- a misbehaving HTTP/1.1 server (status codes, garbage bodies, slow,
  blackhole, closed connections, sequences, passthrough to a real upstream) that counts the
  requests and connections it receives.

Only loopback targets are accepted; nothing here resolves names or leaves the machine.
"""

from .behaviours import (GARBAGE_KINDS, Behaviour, Blackhole, Close, Garbage, InferOk, ModelMetadata, ProxyTo,
                         Sequence, Slow, Status, blackhole, close, garbage, infer_ok, model_metadata, proxy_to,
                         sequence, slow, status)
from .errors import LoopbackOnlyError, NetsimError, ProfileError, ServiceStateError
from .faultserver import ROUTES, FaultServer, RequestRecord, classify
from .link import Link
from .profiles import (PROFILES, Mode, NetworkProfile, add_network_arguments, get_profile, parse_loss,
                       profile_from_args, profile_from_namespace)
from .proxy import NetworkProxy, ProxyStats
from ._service import closed_port

__all__ = [
    "NetworkProxy", "ProxyStats", "NetworkProfile", "Mode", "PROFILES", "get_profile", "profile_from_args",
    "profile_from_namespace", "add_network_arguments", "parse_loss", "Link",
    "FaultServer", "RequestRecord", "ROUTES", "classify",
    "Behaviour", "Status", "Garbage", "Slow", "Blackhole", "Close", "Sequence", "ProxyTo", "ModelMetadata", "InferOk",
    "status", "garbage", "slow", "blackhole", "close", "sequence", "proxy_to", "model_metadata", "infer_ok",
    "closed_port", "GARBAGE_KINDS", "NetsimError", "ProfileError", "LoopbackOnlyError", "ServiceStateError",
]
