"""Shared plumbing: a loopback listener that can stop listening without losing its port, and a
service that runs its own asyncio loop in a background thread so sync code (tests, CLI) can
drive it. Both :class:`~router_tools.netsim.proxy.NetworkProxy` and
:class:`~router_tools.netsim.faultserver.FaultServer` build on these.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import select
import selectors
import socket
import struct
import threading
import time
from typing import Any, Awaitable, Callable, Iterator, Optional, TypeVar
from urllib.parse import urlsplit

from .errors import LoopbackOnlyError, ServiceStateError

T = TypeVar("T")
S = TypeVar("S", bound="LoopService")

LOOPBACK = "127.0.0.1"
CALL_TIMEOUT = 5.0   # bound on every wait for the background loop
STOP_TIMEOUT = 5.0


def check_loopback(host: str) -> str:
    """The host as an address literal if it is loopback; never resolves names (no DNS)."""
    if host == "localhost":
        return LOOPBACK
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise LoopbackOnlyError(
            f"upstream host {host!r} is not a loopback address; only 127.0.0.0/8, ::1 or "
            "'localhost' may be a target (names are not resolved)") from None
    if not addr.is_loopback:
        raise LoopbackOnlyError(f"upstream {host!r} is not a loopback address; only 127.0.0.0/8 or ::1 may be a target")
    return str(addr)


def parse_upstream(upstream: "tuple[str, int] | str") -> tuple[str, int]:
    """``(host, port)``, ``"host:port"`` or ``"http://host:port/..."`` -> checked ``(host, port)``."""
    if isinstance(upstream, tuple):
        host, port = upstream
    elif isinstance(upstream, str):
        parts = urlsplit(upstream if "://" in upstream else f"tcp://{upstream}")
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            host, port = None, None
        if not host or port is None:
            raise LoopbackOnlyError(f"upstream {upstream!r} must look like 'host:port' or 'http://host:port'")
    else:
        raise LoopbackOnlyError(f"upstream must be (host, port) or 'host:port', got {upstream!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise LoopbackOnlyError(f"upstream port must be 1..65535, got {port!r}")
    return check_loopback(str(host)), port


async def connect_loopback(host: str, port: int, timeout: float, *,
                           limit: int = 64 * 1024) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a checked loopback address literal (no resolver, no executor thread)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await asyncio.open_connection(sock=sock, limit=limit)
    except BaseException:
        # Closed on the next turn: the cancelled sock_connect's callback that unregisters this
        # fd is already queued, and must not hit a new socket that reused the number.
        loop.call_soon(sock.close)
        raise


@contextlib.contextmanager
def closed_port() -> Iterator[tuple[str, int]]:
    """``(127.0.0.1, port)`` where connections are refused for the duration of the block: the
    port is bound (so nothing else can take it) but not listening -- a "server down" target."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
        yield LOOPBACK, sock.getsockname()[1]
    finally:
        sock.close()


def rst_socket(sock: Any) -> None:
    """Make the next close send RST instead of FIN (SO_LINGER 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, AttributeError):
        pass


def abort_writer(writer: Optional[asyncio.StreamWriter]) -> None:
    """Close a stream connection with RST, at once."""
    if writer is None:
        return
    transport = writer.transport
    if transport.is_closing() and transport.get_extra_info("socket") is None:
        return
    rst_socket(transport.get_extra_info("socket"))
    transport.abort()


if hasattr(selectors, "EpollSelector"):
    class FineTimerEpollSelector(selectors.EpollSelector):
        """epoll whose timeouts are not rounded up to whole milliseconds.

        Python rounds epoll_wait's timeout up to the next millisecond, which would add up to
        1 ms to every simulated delay (2 ms per round trip) -- more than the whole ``lan``
        profile. The sub-millisecond remainder is waited for with ``select()`` on the epoll fd
        itself: microsecond resolution, and it still wakes up as soon as any socket is ready.
        """

        def select(self, timeout: Optional[float] = None) -> list:
            if timeout is None or timeout <= 0:
                return super().select(timeout)
            deadline = time.monotonic() + timeout
            whole_ms = int(timeout * 1000)
            if whole_ms:
                ready = super().select((whole_ms - 0.5) / 1000)  # rounds up to exactly whole_ms
                if ready:
                    return ready
            rest = deadline - time.monotonic()
            if rest > 0:
                fd = self.fileno()
                if fd < 1024:  # FD_SETSIZE
                    select.select([fd], [], [], rest)
                else:
                    time.sleep(rest)
            return super().select(0)


class Listener:
    """A listening socket on 127.0.0.1 that can stop listening (connect -> ECONNREFUSED) and
    start again on the same port.

    The port is chosen by binding port 0 (no probe-then-bind race). A second socket is bound to
    that port explicitly while the first still holds it, because Linux keeps an *explicitly*
    bound port across ``shutdown(SHUT_RD)`` of a listener -- which returns it to the unconnected
    state -- while a port-0 binding would be released. Where that shutdown is unsupported, the
    socket is closed and re-bound to the same port on resume.
    """

    def __init__(self, backlog: int = 128) -> None:
        self.backlog = backlog
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((LOOPBACK, 0))
            self.port: int = probe.getsockname()[1]
            self.sock: Optional[socket.socket] = self._bind()
        finally:
            probe.close()
        self.listening = False

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((LOOPBACK, self.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def listen(self) -> None:
        if self.sock is None:
            self.sock = self._bind()
        self.sock.listen(self.backlog)
        self.listening = True

    def unlisten(self) -> None:
        """Stop listening; queued, not yet accepted connections are reset by the kernel."""
        if self.sock is None or not self.listening:
            return
        self.listening = False
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        self.listening = False
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class LoopService:
    """Runs an asyncio loop in a daemon thread; subclasses implement ``_setup`` / ``_teardown``
    (coroutines run on that loop) and handle each accepted socket in ``_on_connection``."""

    _thread_prefix = "netsim"
    fine_timers = True  # sub-millisecond timer precision (see FineTimerEpollSelector)

    def __init__(self) -> None:
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._listener: Optional[Listener] = None
        self._accepting = False
        self._tasks: set[asyncio.Task] = set()
        self._state = "new"
        self.errors: list[str] = []  # unexpected exceptions of connection tasks (should stay empty)

    # ----------------------------------------------------------------- public lifecycle
    @property
    def port(self) -> int:
        if self._listener is None:
            raise ServiceStateError(f"{type(self).__name__} is not started")
        return self._listener.port

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def stopping(self) -> bool:
        return self._state in ("stopping", "stopped")

    def start(self: S) -> S:
        if self._state != "new":
            raise ServiceStateError(f"{type(self).__name__} can be started once (state: {self._state})")
        self._start()
        return self

    def _start(self) -> None:
        self._listener = Listener()
        loop = self._new_loop()
        self._loop = loop
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(loop, ready),
                                        name=f"{self._thread_prefix}-{self._listener.port}", daemon=True)
        self._thread.start()
        if not ready.wait(CALL_TIMEOUT):
            raise ServiceStateError(f"{type(self).__name__}: background loop did not start")
        try:
            self._call(self._setup())
        except BaseException:
            self.stop()
            raise
        self._state = "running"

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        if self.fine_timers and hasattr(selectors, "EpollSelector"):
            return asyncio.SelectorEventLoop(FineTimerEpollSelector())
        return asyncio.new_event_loop()

    def stop(self) -> None:
        """Close the listener and every connection, end the thread. Idempotent, bounded."""
        if self._state == "stopped" or self._loop is None:
            self._state = "stopped"
            return
        if threading.current_thread() is self._thread:
            raise ServiceStateError(f"{type(self).__name__}.stop() called from its own loop thread")
        self._state = "stopping"
        loop, thread = self._loop, self._thread
        try:
            if loop.is_running():
                fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
                try:
                    fut.result(STOP_TIMEOUT)
                except (concurrent.futures.TimeoutError, Exception):
                    fut.cancel()
                loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # loop already closed
            pass
        if thread is not None:
            thread.join(STOP_TIMEOUT)
        if self._listener is not None:
            self._listener.close()
        self._state = "stopped"
        if thread is not None and thread.is_alive():
            raise ServiceStateError(f"{type(self).__name__}: loop thread did not end within {STOP_TIMEOUT:g} s")

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- loop plumbing
    def _run_loop(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def _call(self, work: "Awaitable[T] | Callable[[], T]", timeout: float = CALL_TIMEOUT) -> T:
        """Run a coroutine (or a plain callable) on the loop and wait for its result."""
        loop = self._loop
        if loop is None or loop.is_closed():
            if asyncio.iscoroutine(work):
                work.close()
            raise ServiceStateError(f"{type(self).__name__} is not running")
        if threading.current_thread() is self._thread:
            raise ServiceStateError("blocking call from the service's own loop thread")

        async def wrapper() -> T:
            return await work if asyncio.iscoroutine(work) else work()  # type: ignore[misc,operator]

        fut = asyncio.run_coroutine_threadsafe(wrapper(), loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise ServiceStateError(f"{type(self).__name__}: loop did not answer within {timeout:g} s") from None

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._note_error(task.exception())

    def _note_error(self, exc: BaseException) -> None:
        if len(self.errors) < 100:
            self.errors.append(repr(exc))

    # Accepting is a reader callback on the listening socket (as asyncio.Server does), not a
    # task awaiting loop.sock_accept: cancelling that task can race with an accept already
    # queued, losing the accepted socket. remove_reader is synchronous on the loop thread.
    def _start_accepting(self) -> None:
        listener = self._listener
        if listener is None:
            raise ServiceStateError("no listener")
        if not listener.listening:
            listener.listen()
        if not self._accepting and listener.sock is not None:
            self._accepting = True
            asyncio.get_running_loop().add_reader(listener.sock.fileno(), self._accept_ready)

    def _stop_accepting(self) -> None:
        listener = self._listener
        if self._accepting:
            self._accepting = False
            if listener is not None and listener.sock is not None:
                asyncio.get_running_loop().remove_reader(listener.sock.fileno())
        if listener is not None:
            listener.unlisten()

    def _accept_ready(self) -> None:
        listener = self._listener
        for _ in range(64):  # bounded batch per wake-up, fair to the other connections
            if not self._accepting or listener is None or listener.sock is None:
                return
            try:
                csock, _ = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # e.g. EMFILE: pause instead of spinning
                self._note_error(exc)
                self._stop_accepting_for(0.1)
                return
            csock.setblocking(False)
            csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._on_connection(csock))

    def _stop_accepting_for(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        listener = self._listener
        if listener is None or listener.sock is None or not self._accepting:
            return
        loop.remove_reader(listener.sock.fileno())

        def resume() -> None:
            if self._accepting and listener.sock is not None:
                loop.add_reader(listener.sock.fileno(), self._accept_ready)

        loop.call_later(seconds, resume)

    async def _shutdown(self) -> None:
        self._stop_accepting()
        if self._listener is not None:
            self._listener.close()
        await self._teardown()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    # ----------------------------------------------------------------- subclass hooks
    async def _setup(self) -> None:
        self._start_accepting()

    async def _teardown(self) -> None:
        """Abort live connections (called before their tasks are cancelled)."""

    async def _on_connection(self, csock: socket.socket) -> None:
        raise NotImplementedError
