"""A :class:`router_tools.netsim.NetworkProxy` in its own process, for measurements.

In-process, the simulated network's event loop shares the measuring process's GIL with the
router it measures, so every forwarded chunk and timer steals time from the router's own loop
(a real network costs the client nothing). ``hybrid-router eval`` therefore runs the proxy in a
child process and controls it over a pipe::

    with ProxyProcess(("127.0.0.1", port), "wan40", seed=0) as proxy:
        url = proxy.url_for()
        proxy.set_mode("refuse")      # same calls as NetworkProxy
        proxy.stats()                 # -> router_tools.netsim.ProxyStats

Protocol (one JSON object per line): the child prints ``{"port": N, "profile": "..."}`` once
ready; then answers each command line on stdin (``{"op": "set_mode", "mode": "refuse"}``,
``{"op": "stats"}``) with ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``; EOF on
stdin stops it. The child also exits when its parent dies (stdin closes), so nothing is left
behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

from router_tools.netsim import NetworkProfile, ProxyStats, get_profile
from router_tools.netsim._service import parse_upstream
from router_tools.netsim.errors import NetsimError

_ROOT = Path(__file__).resolve().parent.parent


class ProxyProcessError(NetsimError):
    pass


class ProxyProcess:
    def __init__(self, upstream: "tuple[str, int] | str", profile: "NetworkProfile | str" = "loopback", *,
                 seed: int = 0, start_timeout: float = 30.0) -> None:
        self.profile = get_profile(profile)
        host, port = parse_upstream(upstream)  # loopback only, checked here before anything starts
        self._upstream = f"{host}:{port}"
        self._seed = seed
        self._timeout = start_timeout
        self._proc: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()
        self.port: Optional[int] = None
        self.host = "127.0.0.1"

    def start(self) -> "ProxyProcess":
        spec = json.dumps({"upstream": self._upstream, "seed": self._seed,
                           "profile": {k: getattr(self.profile, k) for k in self.profile.__dataclass_fields__}},
                          default=str)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        self._proc = subprocess.Popen([sys.executable, "-m", "router_tools.proxy_process", spec], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(_ROOT))
        line = self._readline(self._timeout)
        try:
            hello = json.loads(line)
            self.port = int(hello["port"])
        except (ValueError, KeyError, TypeError):
            err = self._proc.stderr.read() if self._proc.poll() is not None else ""
            self.stop()
            raise ProxyProcessError(f"network proxy process did not start: {line.strip() or err.strip()[-500:]}") from None
        return self

    def _readline(self, timeout: float) -> str:
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self._proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not out:
            raise ProxyProcessError(f"network proxy process did not answer within {timeout:g} s")
        return out[0]

    def _command(self, **cmd) -> dict:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                raise ProxyProcessError("network proxy process is not running")
            self._proc.stdin.write(json.dumps(cmd) + "\n")
            self._proc.stdin.flush()
            reply = json.loads(self._readline(10.0) or "{}")
        if not reply.get("ok"):
            raise ProxyProcessError(f"network proxy: {reply.get('error', 'no answer')}")
        return reply

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def url_for(self, scheme: str = "http") -> str:
        return f"{scheme}://{self.host}:{self.port}"

    def set_mode(self, mode: str) -> None:
        self._command(op="set_mode", mode=str(getattr(mode, "value", mode)))

    def stats(self) -> ProxyStats:
        return ProxyStats(**self._command(op="stats")["stats"])

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for f in (proc.stdout, proc.stderr):
            try:
                f.close()
            except OSError:
                pass

    def __enter__(self) -> "ProxyProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _serve(spec: dict) -> int:
    import dataclasses

    from router_tools.netsim import NetworkProxy

    profile = NetworkProfile(**spec["profile"])
    with NetworkProxy(spec["upstream"], profile, seed=int(spec["seed"])) as proxy:
        print(json.dumps({"port": proxy.port, "profile": profile.describe()}), flush=True)
        for line in sys.stdin:  # EOF (parent closed the pipe or died): stop
            try:
                cmd = json.loads(line)
                if cmd.get("op") == "set_mode":
                    proxy.set_mode(cmd["mode"])
                    reply = {"ok": True}
                elif cmd.get("op") == "stats":
                    reply = {"ok": True, "stats": dataclasses.asdict(proxy.stats())}
                else:
                    reply = {"ok": False, "error": f"unknown command {cmd!r}"}
            except Exception as exc:  # noqa: BLE001 -- reported to the parent, the proxy keeps running
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_serve(json.loads(sys.argv[1])))
