"""Timing model of one direction of a simulated TCP path (pure: no I/O, injectable RNG).

The proxy reads a chunk from one socket and asks :meth:`Link.schedule` when the chunk may be
written to the other side. The link is FIFO, like a TCP byte stream::

    serialisation: start = max(arrival, link free); link free = start + bytes / bandwidth
    propagation:   one_way = max(0, rtt/2 + U(-jitter/2, +jitter/2))   (never negative)
    delivery:      at = max(link free + one_way + extra + loss_penalty, previous delivery)

so jitter never reorders bytes and a delayed chunk holds back the ones behind it
(head-of-line blocking).

Loss: real packet loss cannot be removed from a TCP byte stream -- TCP retransmits, and what
the application sees is a stall. A chunk of ``n`` bytes is ``ceil(n / MSS)`` segments, each
lost with probability ``loss``. When one is lost the chunk is delivered late by:

* ``rto = max(rto_min, 2*rtt)`` if the lost segment is among the chunk's last 3 (too few
  later segments to produce 3 duplicate ACKs, so the sender waits for its retransmission
  timer -- the common case for small request/response messages), otherwise
* one ``rtt`` (fast retransmit after 3 duplicate ACKs);
* each retransmission is itself lost with probability ``loss``, doubling the timer
  (exponential backoff) every time.

Optionally the first chunk of a connection pays one extra RTT for the TCP handshake, which the
local ``connect()`` to the proxy did not pay.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .profiles import NetworkProfile

MSS = 1448  # typical TCP payload per segment with timestamps


@dataclass(frozen=True)
class Delivery:
    at: float            # loop time at which the chunk may be written
    penalty: float       # seconds added by losses (0 when none)
    losses: int          # segments lost (incl. lost retransmissions)


class Link:
    """One direction of one connection. Not thread-safe: owned by the proxy's loop."""

    def __init__(self, profile: NetworkProfile, rng: random.Random, *, handshake: bool = False) -> None:
        self.profile = profile
        self._rng = rng
        self._handshake_pending = handshake
        self._link_free = -math.inf
        self._last = -math.inf

    def one_way_delay(self) -> float:
        p = self.profile
        half_jitter = p.jitter_ms / 2.0
        ms = p.rtt_ms / 2.0 + (self._rng.uniform(-half_jitter, half_jitter) if half_jitter else 0.0)
        return max(0.0, ms) / 1000.0

    def loss_penalty(self, nbytes: int) -> tuple[float, int]:
        p = self.profile
        if p.loss <= 0.0 or nbytes <= 0:
            return 0.0, 0
        segments = max(1, math.ceil(nbytes / MSS))
        if self._rng.random() >= 1.0 - (1.0 - p.loss) ** segments:
            return 0.0, 0
        lost_index = self._rng.randrange(segments)
        rto = p.rto_s
        penalty = rto if segments - lost_index <= 3 else p.rtt_s
        losses = 1
        backoff = rto
        while self._rng.random() < p.loss:  # the retransmission is lost too
            penalty += backoff
            backoff *= 2.0
            losses += 1
        return penalty, losses

    def schedule(self, nbytes: int, now: float, extra: float = 0.0) -> Delivery:
        """When a chunk of ``nbytes`` read at ``now`` is delivered (``nbytes == 0``: the FIN)."""
        p = self.profile
        delay = self.one_way_delay() + extra
        if self._handshake_pending:
            self._handshake_pending = False
            delay += self.one_way_delay() + self.one_way_delay()
        start = max(now, self._link_free)
        if p.bandwidth_bytes_per_s:
            start += nbytes / p.bandwidth_bytes_per_s
        self._link_free = start
        penalty, losses = self.loss_penalty(nbytes)
        at = max(start + delay + penalty, self._last)
        self._last = at
        return Delivery(at=at, penalty=penalty, losses=losses)
