"""The cloud service on Ray Serve: the very same FastAPI app, N replicas, behind Serve's HTTP proxy.

``hybrid-router serve --engine ray [--replicas N | --autoscale MIN,MAX] [--address auto]`` calls
:func:`run`. Each replica builds the app with :func:`cloud_service.app.create_app` (through
``@serve.ingress`` with a builder function, so nothing is pickled but the settings) and runs its
lifespan: model load, warm-up, and our dynamic batcher -- batching works per replica, and the
batcher's bounded queue still answers 503 + ``Retry-After`` and 504 for expired budgets. The
only addition is an ``X-Replica-Id`` response header naming the replica that answered.

Settings (``ray`` section of :class:`~cloud_service.settings.ServiceSettings`):

* ``replicas`` -- or ``autoscale_min_replicas``/``autoscale_max_replicas`` with
  ``target_ongoing_requests`` (Serve's ``autoscaling_config``);
* ``num_cpus`` per replica (fractional is fine: two 0.5-CPU replicas on a 2-core machine);
* ``max_ongoing_requests`` per replica and ``max_queued_requests`` per caller: past that Serve
  itself rejects with 503 (+ ``Retry-After`` via ``backpressure_config`` where the installed Ray
  has it; its body is plain text, not ``{"error": ...}``). Keep ``max_ongoing_requests`` at or
  above ``batching.max_queue_size`` if you want every 503 to come from our batcher instead;
* ``request_timeout_s`` -- Serve's end-to-end HTTP timeout (Serve answers 408).

``server.host``/``server.port`` become Serve's HTTP proxy address (default 127.0.0.1:8000).

For tests and benchmarks, :class:`LocalRayServe` starts a private local Ray (``address="local"``,
loopback, no dashboard), deploys, waits for the replicas and tears everything down::

    with LocalRayServe(settings, num_cpus=2) as srv:
        srv.url        # "http://127.0.0.1:<port>"
"""

from __future__ import annotations

from cloud_service.launch import free_port, url_host

import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from cloud_service.settings import ServiceSettings, SettingsError, apply_overrides

APP_NAME = "hybrid-router-cloud"
DEPLOYMENT_NAME = "CloudService"
REPLICA_HEADER = "X-Replica-Id"
BACKPRESSURE_RETRY_AFTER_S = 1.0
PROJECT_ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("cloud_service.ray_serve")


class RayServeError(RuntimeError):
    """Ray Serve is missing, or the deployment did not come up in time."""


# ----------------------------------------------------------------------------- deployment

def deployment_options(settings: ServiceSettings) -> dict[str, Any]:
    """``@serve.deployment`` options from the ``ray`` section (pure; no Ray import)."""
    r = settings.ray
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": r.num_cpus},
        "max_ongoing_requests": r.max_ongoing_requests,
        "max_queued_requests": r.max_queued_requests,
        "graceful_shutdown_timeout_s": settings.server.graceful_timeout_s,
        "logging_config": _logging_config(settings),
    }
    if r.autoscaling is not None:
        options["autoscaling_config"] = dict(r.autoscaling)
    else:
        options["num_replicas"] = r.replicas
    return options


def _logging_config(settings: ServiceSettings) -> dict[str, Any]:
    # Serve logs a line per request by default (costly at thousands of requests per second);
    # follow the service's own access-log setting and level instead.
    return {"enable_access_log": settings.server.access_log, "log_level": settings.server.log_level.upper()}


def build_application(settings: ServiceSettings):
    """The bound Serve application: ``@serve.deployment`` + ``@serve.ingress(<create_app builder>)``."""
    serve = _import_serve()
    settings_json = settings.to_json()  # replicas rebuild the exact settings (keys included)

    def build_app():
        # Runs inside each replica: the very same app the local engine serves.
        from cloud_service.app import create_app
        from cloud_service.ray_serve import ReplicaIdMiddleware, replica_id
        from cloud_service.settings import ServiceSettings

        app = create_app(ServiceSettings.from_json(settings_json))
        app.add_middleware(ReplicaIdMiddleware, replica_id=replica_id())
        return app

    options = deployment_options(settings)
    backpressure = _backpressure_config()
    if backpressure is not None:
        options["backpressure_config"] = backpressure

    @serve.deployment(**options)
    @serve.ingress(build_app)
    class CloudService:
        def check_health(self) -> None:
            # Serve restarts a replica whose model is not ready (after start-up).
            dataplane = getattr(getattr(self.app, "state", None), "dataplane", None)
            if dataplane is not None and not dataplane.ready:
                raise RuntimeError("model not ready")

    return CloudService.bind()


class ReplicaIdMiddleware:
    """Pure ASGI: adds ``X-Replica-Id`` to every response, so clients and tests see who answered."""

    def __init__(self, app, replica_id: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), replica_id.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged_send(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged_send)


def replica_id() -> str:
    """This Serve replica's id (``host:pid`` outside a replica)."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_tag)
    except Exception:  # outside a replica (unit use): still unique per process
        return f"{socket.gethostname()}:{os.getpid()}"


def _backpressure_config():
    try:
        from ray.serve.config import BackpressureConfig
    except ImportError:  # older Ray: Serve's own 503 then has no Retry-After
        return None
    return BackpressureConfig(status_code=503, retry_after_s=BACKPRESSURE_RETRY_AFTER_S)


def _import_serve():
    try:
        from ray import serve
    except ImportError as exc:
        raise RayServeError(f"Ray Serve is not installed ({exc}); "
                            "pip install 'hybrid-edge-router-server[ray]'") from exc
    return serve


def deploy(settings: ServiceSettings, *, timeout_s: float = 120.0) -> str:
    """Start Serve's HTTP proxy on ``server.host:port`` and deploy; returns the base URL.

    Ray must already be initialised (``ray.init``). Waits until every replica is running.
    """
    serve = _import_serve()
    from ray.serve.config import HTTPOptions

    host, port = settings.server.host, settings.server.port
    if port == 0:
        port = free_port(host)
    serve.start(
        http_options=HTTPOptions(host=host, port=port, request_timeout_s=settings.ray.request_timeout_s),
        logging_config=_logging_config(settings),  # the proxy and controller
    )
    application = build_application(settings)
    started = time.monotonic()
    # serve.run waits for the app to be RUNNING (all replicas constructed, lifespan done).
    done: list[BaseException | None] = []

    def run_app() -> None:
        try:
            serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
            done.append(None)
        except BaseException as exc:  # surfaced below
            done.append(exc)

    thread = threading.Thread(target=run_app, name="serve-run", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not done:
        raise RayServeError(f"Ray Serve app {APP_NAME!r} not running after {timeout_s:.0f} s")
    if done[0] is not None:
        raise RayServeError(f"Ray Serve could not deploy {APP_NAME!r}: {done[0]}") from done[0]
    url = f"http://{url_host(host)}:{port}"
    log.info("Ray Serve app %s running at %s after %.1f s", APP_NAME, url, time.monotonic() - started)
    return url


class LocalRayServe:
    """A private local Ray + Serve deployment on loopback (tests, benchmarks, the CLI); a context manager.

    Leaving it shuts Serve and Ray down and waits (then kills, by PID) any process this Ray
    instance started that is still alive, so nothing is left behind.
    """

    def __init__(self, settings: ServiceSettings, *, num_cpus: Optional[float] = 2,
                 object_store_mb: Optional[int] = 100, timeout_s: float = 180.0,
                 private_temp_dir: bool = True, log_to_driver: bool = False) -> None:
        self.settings = settings
        self.num_cpus = num_cpus
        self.object_store_mb = object_store_mb
        self.timeout_s = timeout_s
        self.private_temp_dir = private_temp_dir
        self.log_to_driver = log_to_driver
        self.url: Optional[str] = None
        self.startup_s: Optional[float] = None
        self._temp_dir: Optional[str] = None
        self._processes: set[tuple[int, int]] = set()

    def __enter__(self) -> "LocalRayServe":
        _import_serve()
        started = time.monotonic()
        if self.private_temp_dir:
            # A short path: Ray puts Unix sockets under it (108-byte limit).
            self._temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        # Only processes that appear from here on are this Ray's (not, say, a test's other servers).
        others = _descendants(os.getpid())
        try:
            init_local_ray(num_cpus=self.num_cpus, object_store_mb=self.object_store_mb,
                           temp_dir=self._temp_dir, log_to_driver=self.log_to_driver)
            self._processes = _descendants(os.getpid()) - others
            self.url = deploy(self.settings, timeout_s=self.timeout_s)
            self._processes |= _descendants(os.getpid()) - others
        except BaseException:
            self._processes |= _descendants(os.getpid()) - others
            self.__exit__()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def __exit__(self, *exc) -> None:
        import shutil

        import ray

        try:
            from ray import serve

            if ray.is_initialized():
                serve.shutdown()
        finally:
            # Also after an interrupted ray.init (not "initialized", yet its processes run).
            try:
                ray.shutdown(wait_for_processes=True)
            except TypeError:  # older Ray: no such argument; _reap() waits instead
                ray.shutdown()
            self._reap(timeout_s=15.0)
            if self._temp_dir is not None:
                shutil.rmtree(self._temp_dir, ignore_errors=True)

    def leftover_processes(self) -> list[int]:
        """PIDs of this Ray instance's processes (seen while it ran) that are still alive."""
        alive = _process_table()
        return sorted(pid for pid, started in self._processes
                      if pid in alive and alive[pid][1] == started and alive[pid][2] != "Z")

    def _reap(self, timeout_s: float) -> None:
        # ray.shutdown() ends its processes asynchronously, and cannot after an interrupted
        # ray.init: wait, then TERM and KILL the stragglers of *this* instance (by PID).
        deadline = time.monotonic() + timeout_s
        while self.leftover_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 1.0)):
            pids = self.leftover_processes()
            if not pids:
                break
            log.warning("sending %s to %d leftover Ray processes", sig.name, len(pids))
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + grace
            while self.leftover_processes() and time.monotonic() < deadline:
                time.sleep(0.1)
        # Collect our own children so that they do not linger as zombies.
        for pid, _ in self._processes:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child, or already collected
                pass


def _process_table() -> dict[int, tuple[int, int, str]]:
    """``{pid: (ppid, start time in clock ticks, state)}`` from /proc (empty where there is no /proc)."""
    table: dict[int, tuple[int, int, str]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return table
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        table[int(entry.name)] = (int(fields[1]), int(fields[19]), fields[0])
    return table


def _descendants(root: int) -> set[tuple[int, int]]:
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[tuple[int, int]] = set()
    stack = list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        found.add((pid, table[pid][1]))
        stack.extend(children.get(pid, ()))
    return found


def init_local_ray(*, num_cpus: Optional[float] = None, object_store_mb: Optional[int] = None,
                   temp_dir: Optional[str] = None, log_to_driver: bool = True) -> None:
    """Start a new single-node Ray whose every listening socket is on 127.0.0.1 (no dashboard)."""
    _loopback_only()
    import ray

    in_main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    ray.init(
        address="local",  # never attach to some other cluster found on the machine
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=None if object_store_mb is None else object_store_mb * 1024 * 1024,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        runtime_env=_runtime_env(),
        log_to_driver=log_to_driver,
        configure_logging=False,
    )
    if in_main_thread and sigterm is not None:
        # Ray's core installs a crash handler for SIGTERM that makes the later ray.shutdown()
        # abort (exit 134) and leaves agents running; keep the process's own SIGTERM behaviour.
        signal.signal(signal.SIGTERM, sigterm)


def _loopback_only() -> None:
    # Ray maps a 127.0.0.1 node address to the machine's external IP (and binds its servers to
    # it or to all interfaces) unless "clusters" are disabled, as they are on macOS/Windows.
    # The variable must be in the environment of the processes Ray spawns, and in this one's
    # already-imported constants.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def bind_replica_grpc_to_loopback() -> None:
    """Ray worker setup hook: Serve replicas bind their inter-deployment gRPC server to ``[::]``.

    Ray 2.60 hard-codes that address; on a loopback-only local node we rebind it to 127.0.0.1.
    Harmless when the Ray version differs (the attribute is then missing and nothing changes).
    """
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_loopback", False):
        return

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port._loopback = True
    replica.add_port_to_grpc_server = add_port


def _runtime_env() -> dict[str, Any]:
    # Workers must import this project even when it is not pip-installed (a plain clone).
    path = os.environ.get("PYTHONPATH")
    pythonpath = str(PROJECT_ROOT) if not path else f"{PROJECT_ROOT}{os.pathsep}{path}"
    env = {
        "PYTHONPATH": pythonpath,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    return {"env_vars": env, "worker_process_setup_hook": "cloud_service.ray_serve.bind_replica_grpc_to_loopback"}



# ----------------------------------------------------------------------------- command line

def settings_from_args(settings: ServiceSettings, args) -> ServiceSettings:
    """Apply ``--replicas N``, ``--autoscale MIN,MAX`` and ``--address`` (missing attributes are ignored)."""
    replicas = getattr(args, "replicas", None)
    autoscale = getattr(args, "autoscale", None)
    address = getattr(args, "address", None)
    if replicas is not None and autoscale is not None:
        raise SettingsError("options --replicas and --autoscale exclude each other")
    overrides: dict[str, tuple[str, Any]] = {"ray.address": ("--address", address)}
    if replicas is not None:
        overrides["ray.replicas"] = ("--replicas", replicas)
        # a fixed count on the command line replaces autoscaling from the file
        ray = settings.ray.model_copy(update={"autoscale_min_replicas": None, "autoscale_max_replicas": None})
        settings = settings.model_copy(update={"ray": ray})
    if autoscale is not None:
        lo, hi = _parse_autoscale(autoscale)
        overrides["ray.autoscale_min_replicas"] = ("--autoscale", lo)
        overrides["ray.autoscale_max_replicas"] = ("--autoscale", hi)
    return apply_overrides(settings, overrides)


def _parse_autoscale(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        lo, hi = value
    else:
        lo, sep, hi = str(value).partition(",")
        if not sep:
            raise SettingsError(f"option --autoscale: expected MIN,MAX (e.g. 1,4); got {value!r}")
    try:
        lo, hi = int(lo), int(hi)
    except (TypeError, ValueError):
        raise SettingsError(f"option --autoscale: MIN and MAX must be integers; got {value!r}") from None
    if not 0 <= lo <= hi or hi < 1:
        raise SettingsError(f"option --autoscale: need 0 <= MIN <= MAX and MAX >= 1; got {value!r}")
    return lo, hi


def run(settings: ServiceSettings, args) -> int:
    """``hybrid-router serve --engine ray``: deploy and serve until SIGINT/SIGTERM.

    Exit codes as the local engine: 0 clean shutdown, 2 bad settings or no Ray, 3 start-up failed.
    """
    try:
        settings = settings_from_args(settings, args)
    except SettingsError as exc:
        print(f"hybrid-router serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    try:
        _import_serve()
    except RayServeError as exc:
        print(f"hybrid-router serve: the Ray engine is unavailable ({exc})", file=sys.stderr)
        return 2

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # SIGTERM shuts down like Ctrl-C
    try:
        if settings.ray.address:
            return _serve_on_cluster(settings)
        with LocalRayServe(settings, num_cpus=None, object_store_mb=None, private_temp_dir=False,
                           log_to_driver=True) as srv:
            _announce(settings, srv.url)
            _wait_forever()
    except KeyboardInterrupt:
        print("Ray Serve stopped", flush=True)
        return 0
    except RayServeError as exc:
        print(f"hybrid-router serve: start-up failed: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:  # ray.init raises ConnectionError, RuntimeError, ValueError ...
        print(f"hybrid-router serve: cannot start Ray: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    return 0


def _serve_on_cluster(settings: ServiceSettings) -> int:
    """Deploy to an existing cluster (its nodes need ``pip install 'hybrid-edge-router-server[ray]'``);
    remove on exit."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=settings.ray.address, configure_logging=False)
    try:
        url = deploy(settings)
        _announce(settings, url)
        _wait_forever()
    finally:
        try:
            serve.delete(APP_NAME)  # the cluster and its Serve instance belong to someone else
        finally:
            ray.shutdown()
    return 0


def _announce(settings: ServiceSettings, url: str) -> None:
    r = settings.ray
    scale = (f"autoscaling {r.autoscale_min_replicas}-{r.autoscale_max_replicas} replicas"
             if r.autoscaling else f"{r.replicas} replica(s)")
    print(f"ready: {url}/v2/models/{settings.model.name} on Ray Serve ({scale}, {r.num_cpus} CPU each); "
          "Ctrl-C stops", flush=True)


def _wait_forever() -> None:
    while True:
        time.sleep(1.0)
