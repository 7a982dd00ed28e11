"""The router's private I/O thread: an asyncio loop in a daemon thread that runs the sync API's
cloud attempts and the readiness probe. Started only when a request may leave the device (or at
construction when the policy has endpoints and no privacy), never under privacy."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading


class IOThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="router-io", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self, final=None, timeout: float = 2.0) -> None:
        if final is not None:
            try:
                self.submit(final).result(timeout)
            except Exception:  # noqa: BLE001 -- best effort at shutdown
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
