"""``LocalService``: the real cloud service in a subprocess on a loopback port, for tests, eval and the demo.

::

    from cloud_service.launch import LocalService

    with LocalService(overrides={"batching.max_batch_size": 8}) as svc:
        httpx.get(f"{svc.url}/v2/health/ready")      # 200: the model is loaded and warmed up
        svc.kill()                                    # outage: SIGKILL, the port now refuses connections
        svc.start()                                   # recovery: same port, waits until ready again
    # leaving the block stops it gracefully (SIGTERM; in-flight requests finish)

How it works and why:

* The parent binds ``127.0.0.1:0`` itself, listens, and hands the socket to
  ``python -m cloud_service --fd N`` (``pass_fds``): the port is known before the child starts
  and nothing can take it in between (no "find a free port, then hope" race). Connections made
  while the model loads wait in the backlog instead of being refused.
* The parent closes its own copy once the child runs, so the child is the only holder: after
  ``kill()`` the port refuses connections at once, like a crashed server. ``start()`` again
  binds the same port (``SO_REUSEADDR``) for recovery scenarios.
* ``start()`` returns only when ``GET /v2/health/ready`` is 200; if the child exits or the
  bounded wait (``ready_timeout``) passes it raises :class:`ServiceStartError` with the tail of
  the child's log.
* The child's stdout and stderr go to ``log_path`` (a temporary file by default; restarts
  append). Settings come from ``config`` (YAML) and ``overrides`` (dotted names, passed as
  ``HYBRID_CLOUD__SECTION__FIELD`` variables); ``HYBRID_CLOUD*`` variables of the parent are
  not inherited, so what runs is exactly what was asked. ``env`` adds variables (e.g. the one
  named by ``auth.api_keys_env``).
* Only loopback: the host is always 127.0.0.1.
* A child left running when the object is garbage-collected or the interpreter exits is
  killed (``weakref.finalize``); still, prefer the ``with`` block.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

HOST = "127.0.0.1"
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = HOST) -> int:
    """A port free on ``host`` right now (for servers that must be told a number, e.g. Ray, Triton)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def url_host(host: str) -> str:
    """``host`` as it goes in a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host else host


class ServiceStartError(RuntimeError):
    """The service did not become ready (exited, or timed out); the message carries its log tail."""


class LocalService:
    """A cloud service subprocess on a loopback port (see the module docstring)."""

    def __init__(
        self,
        config: str | os.PathLike[str] | None = None,
        *,
        overrides: Optional[Mapping[str, Any]] = None,
        env: Optional[Mapping[str, str]] = None,
        log_path: str | os.PathLike[str] | None = None,
        port: int = 0,
        ready_timeout: float = 60.0,
        stop_timeout: float = 20.0,
        python: Optional[str] = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.config = Path(config) if config is not None else None
        self.overrides = dict(overrides or {})
        self.extra_env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.python = python or sys.executable
        self.extra_args = list(extra_args)
        self._port = int(port)
        self._proc: Optional[subprocess.Popen] = None
        self._log_fh = None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="cloud-service-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self._finalizer = weakref.finalize(self, _kill_quietly, None)

    # ------------------------------------------------------------------ properties
    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("LocalService has no port until start()")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return self._proc.poll() if self._proc is not None else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "LocalService":
        """Bind (the same port on a restart), spawn, wait until ready. Idempotent if already running."""
        if self.running:
            return self
        sock = self._bind()
        try:
            self._log_fh = open(self.log_path, "ab")
            self._log_fh.write(f"--- LocalService start on {HOST}:{self._port} at {time.strftime('%H:%M:%S')} ---\n".encode())
            self._log_fh.flush()
            cmd = [self.python, "-m", "cloud_service", "--fd", str(sock.fileno())]
            if self.config is not None:
                cmd += ["--config", str(self.config)]
            cmd += self.extra_args
            self._proc = subprocess.Popen(
                cmd, pass_fds=(sock.fileno(),), env=self._child_env(), cwd=str(_PROJECT_ROOT),
                stdin=subprocess.DEVNULL, stdout=self._log_fh, stderr=subprocess.STDOUT,
            )
        finally:
            sock.close()  # the child holds the only copy now: if it dies, connections are refused
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill_quietly, self._proc)
        try:
            self.wait_ready(self.ready_timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll ``/v2/health/ready`` until 200; :class:`ServiceStartError` if the child exits or time runs out."""
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, trust_env=False) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise ServiceStartError(f"cloud service exited with code {code} during start-up\n{self._tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServiceStartError(f"cloud service not ready after {timeout:.0f}s\n{self._tail()}")
                try:
                    if client.get("/v2/health/ready", timeout=min(2.0, remaining)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)

    def stop(self, timeout: Optional[float] = None) -> Optional[int]:
        """SIGTERM and wait: uvicorn stops accepting, lets in-flight requests finish, exits. SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._close_log()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL now (an outage): no graceful shutdown, the port refuses connections afterwards."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self._close_log()

    def restart(self) -> "LocalService":
        self.stop()
        return self.start()

    def __enter__(self) -> "LocalService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals
    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5.0
        while True:
            try:
                sock.bind((HOST, self._port))
                break
            except OSError as exc:
                if not self._port or time.monotonic() > deadline:
                    sock.close()
                    raise ServiceStartError(f"cannot bind {HOST}:{self._port}: {exc}") from exc
                time.sleep(0.1)  # the previous holder of a fixed port is still closing
        sock.listen(512)
        sock.set_inheritable(True)
        self._port = sock.getsockname()[1]
        return sock

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRID_CLOUD")}
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        for dotted, value in self.overrides.items():
            name = "HYBRID_CLOUD__" + "__".join(part.upper() for part in dotted.split("."))
            # JSON is valid YAML: strings stay strings ("on" is not read as true), numbers stay numbers.
            env[name] = json.dumps(os.fspath(value) if isinstance(value, os.PathLike) else value)
        env.update(self.extra_env)
        return env

    def _tail(self, lines: int = 30) -> str:
        if self._log_fh is not None:
            self._log_fh.flush()
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None


def _kill_quietly(proc: Optional[subprocess.Popen]) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
