"""The background readiness probe: ``GET /v2/health/ready`` on every endpoint of the current
policy, every ``cloud.health_probe_interval_s``; it feeds each endpoint's readiness, which the
rules read as ``offline``. Never runs under privacy (it would open sockets)."""

from __future__ import annotations

import asyncio
from typing import Callable


async def probe_loop(snapshot: Callable[[], object], cloud, clock: Callable[[], float],
                     closed: Callable[[], bool]) -> None:
    """``snapshot()`` returns the router's current policy snapshot (policy + endpoint states)."""
    while not closed():
        snap = snapshot()
        interval = snap.policy.cloud.health_probe_interval_s
        if interval <= 0 or snap.policy.privacy_mode:
            await asyncio.sleep(1.0)
            continue
        for state in snap.states:
            ok = await cloud.ready(state, timeout_s=min(1.0, interval))
            state.readiness.update(ok, clock())
        await asyncio.sleep(interval)
