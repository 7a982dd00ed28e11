"""Errors of the network-fault machinery.

::

    NetsimError                    base of everything raised here
     ├── ProfileError (ValueError) an invalid or unknown network profile / CLI value
     ├── LoopbackOnlyError (ValueError)  a target outside 127.0.0.0/8 / ::1 (never contacted)
     └── ServiceStateError         start/stop misuse, or the background loop did not answer in time

Kept independent of the router's ``RouterError`` tree on purpose: these are test/eval/demo
tools, and their errors mean "the harness was misused", not "a prediction failed".
"""

from __future__ import annotations


class NetsimError(Exception):
    """Base class of this package's errors."""


class ProfileError(NetsimError, ValueError):
    """A network profile that does not validate, or an unknown profile name."""


class LoopbackOnlyError(NetsimError, ValueError):
    """An upstream that is not a loopback address; only 127.0.0.0/8 may be a target."""


class ServiceStateError(NetsimError):
    """A proxy/server used in the wrong state, or its background loop not answering in time."""
