"""``hybrid-router serve`` / ``python -m cloud_service``: run the cloud service under uvicorn.

Examples::

    hybrid-router serve                                   # defaults: 127.0.0.1:8000, batching on
    hybrid-router serve --config config/cloud.yaml --port 9000
    hybrid-router serve --check                           # validate, load + warm up the model, print, exit
    HYBRID_CLOUD__BATCHING__MAX_BATCH_SIZE=16 hybrid-router serve
    hybrid-router serve --engine ray --autoscale 1,4      # Ray Serve (needs the ray extra)

Exit codes: 0 clean shutdown (SIGINT or SIGTERM), 2 bad settings or arguments (one line naming
the file or variable and the field, no traceback), 3 start-up failed (e.g. the model could not be
loaded -- one line says why). ``--check`` runs the same start-up as serving (settings, keys,
model load and warm-up) without binding a port, so it fails exactly when start-up would.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import signal
import socket
import sys
from pathlib import Path

STARTUP_FAILURE = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML settings file (default: $HYBRID_CLOUD_CONFIG, else built-in defaults)")
    parser.add_argument("--host", default=None, help="bind address (default from settings: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="bind port (default from settings: 8000)")
    parser.add_argument("--workers", type=int, default=None, help="uvicorn worker processes")
    parser.add_argument("--log-level", default=None, choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--fd", type=int, default=None,
                        help="serve on this inherited, already bound listening socket instead of --host/--port")
    parser.add_argument("--check", action="store_true",
                        help="validate the settings, load and warm up the model as start-up would, print (keys hidden), exit")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: uvicorn in this process (default); ray: Ray Serve deployment")
    ray = parser.add_argument_group("Ray Serve engine (--engine ray)")
    ray.add_argument("--replicas", type=int, default=None, help="fixed number of replicas")
    ray.add_argument("--autoscale", default=None, metavar="MIN,MAX", help="autoscale between MIN and MAX replicas")
    ray.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")


def resolve_settings(args: argparse.Namespace):
    """Settings from file + environment + these arguments; :class:`SettingsError` names the source."""
    from cloud_service.settings import SettingsError, apply_overrides, load_settings

    settings = load_settings(args.config)
    lo = hi = None
    if getattr(args, "autoscale", None):
        parts = args.autoscale.split(",")
        try:
            lo, hi = (int(p) for p in parts)
        except ValueError:
            raise SettingsError(f"option --autoscale: expected MIN,MAX (two integers), got {args.autoscale!r}") from None
    return apply_overrides(settings, {
        "server.host": ("--host", args.host),
        "server.port": ("--port", args.port),
        "server.workers": ("--workers", args.workers),
        "server.log_level": ("--log-level", args.log_level),
        "ray.replicas": ("--replicas", getattr(args, "replicas", None)),
        "ray.autoscale_min_replicas": ("--autoscale", lo),
        "ray.autoscale_max_replicas": ("--autoscale", hi),
        "ray.address": ("--address", getattr(args, "address", None)),
    })


def run(args: argparse.Namespace) -> int:
    from cloud_service.settings import SettingsError

    try:
        settings = resolve_settings(args)
        settings.auth.resolve_keys(os.environ)  # fail closed before anything starts
    except SettingsError as exc:
        print(f"hybrid-router serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    if args.check:
        problem = check_startup(settings)
        if problem is not None:
            source = args.config or os.environ.get("HYBRID_CLOUD_CONFIG") or "defaults/environment"
            print(f"hybrid-router serve: start-up would fail ({source}): {problem}", file=sys.stderr)
            return STARTUP_FAILURE
        print(settings.model_dump_json(indent=2))  # SecretStr prints as '**********'
        return 0
    if args.engine == "ray":
        try:
            from cloud_service import ray_serve
        except ImportError as exc:
            print(f"hybrid-router serve: the Ray engine is unavailable ({exc}); install the 'ray' extra",
                  file=sys.stderr)
            return 2
        return int(ray_serve.run(settings, args) or 0)
    return serve(settings, fd=args.fd)


class WorkerAppFactory:
    """The app factory handed to uvicorn worker processes (``workers > 1``).

    uvicorn spawns workers with multiprocessing, which pickles the config -- this object
    included -- through an inherited pipe. The resolved settings (API keys too) travel that way:
    they are never exported into the environment (readable in ``/proc/<pid>/environ`` and
    inherited by every child) nor written to disk. Defined here, not in ``cloud_service.app``, so
    unpickling it in a worker imports nothing heavy.
    """

    def __init__(self, settings_json: str) -> None:
        self._settings_json = settings_json

    def __call__(self):
        from cloud_service.app import create_app
        from cloud_service.settings import ServiceSettings

        return create_app(ServiceSettings.from_json(self._settings_json))

    def __repr__(self) -> str:  # uvicorn may log the app; never the keys
        return "WorkerAppFactory(<settings>)"


def check_startup(settings) -> str | None:
    """Run the service's start-up (app, model load, warm-up, batcher) and stop; ``None`` or one line why not."""
    from cloud_service.app import create_app
    from cloud_service.errors import ServiceError
    from cloud_service.settings import SettingsError
    from edge_model.errors import EdgeModelError

    async def start_and_stop() -> None:
        app = create_app(settings)
        dataplane = app.state.dataplane
        try:
            await dataplane.start()  # exactly what the lifespan does before uvicorn serves
        finally:
            await dataplane.stop(settings.server.graceful_timeout_s)

    try:
        asyncio.run(start_and_stop())
    except (SettingsError, EdgeModelError, ServiceError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"model.manifest: {first}" if isinstance(exc, EdgeModelError) else first
    return None


def log_config(level: str) -> dict:
    """uvicorn's logging config plus our ``cloud_service`` loggers on the same handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["default"]["fmt"] = "%(asctime)s %(levelprefix)s %(message)s"
    config["formatters"]["access"]["fmt"] = '%(asctime)s %(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'
    config["loggers"]["cloud_service"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    if level != "debug":
        config.setdefault("filters", {})["one_line"] = {"()": "cloud_service.cli.OneLineTracebacks"}
        config["handlers"]["default"]["filters"] = ["one_line"]
    return config


class OneLineTracebacks(logging.Filter):
    """Start-up failures as one line (``ArtifactError: ...: manifest not found``), not a traceback.

    uvicorn logs a failed lifespan start-up as the full traceback text Starlette formatted; an
    operator needs its last line. ``--log-level debug`` keeps the tracebacks.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("Traceback (most recent call last)"):
            last = [line for line in msg.strip().splitlines() if line.strip()][-1]
            record.msg, record.args = f"start-up failed: {last.strip()}", ()
        elif record.exc_info and record.exc_info[1] is not None and msg.startswith("Exception in 'lifespan'"):
            exc = record.exc_info[1]
            record.msg, record.args = f"{msg.strip()}: {type(exc).__name__}: {exc}", ()
            record.exc_info = record.exc_text = None
        return True


def serve(settings, fd: int | None = None) -> int:
    """Run uvicorn with ``settings`` until SIGINT/SIGTERM; graceful shutdown lets in-flight requests finish."""
    import uvicorn

    from cloud_service.settings import SettingsError

    s = settings.server
    # An inherited descriptor is wrapped here, not by uvicorn: uvicorn's --fd path builds the socket
    # with socket.fromfd(fd, AF_UNIX, ...), so asyncio never sets TCP_NODELAY on the accepted TCP
    # connections and every response waits ~40 ms for the client's delayed ACK (Nagle).
    # socket.socket(fileno=fd) detects the real family (AF_INET) instead.
    sockets = [socket.socket(fileno=fd)] if fd is not None else None
    from cloud_service.app import create_app

    common = dict(
        host=s.host, port=s.port, log_level=s.log_level, log_config=log_config(s.log_level),
        access_log=s.access_log, timeout_graceful_shutdown=s.graceful_timeout_s, server_header=False,
        # An import string, not the class: worker processes unpickle their config before they answer
        # the supervisor's health check, and importing the app there took longer than its 5 s.
        lifespan="on", http="cloud_service.app:HardenedHttpProtocol", timeout_keep_alive=s.keep_alive_s,
        # The connection cap is HardenedHttpProtocol's (503 JSON at connect time); uvicorn's own
        # limit_concurrency would answer text/plain, and only once headers arrived.
    )
    # uvicorn re-raises a captured SIGTERM after its graceful shutdown; with the default action
    # that kills the process (exit 143) although everything stopped cleanly. A handler of ours
    # turns that re-raise into a no-op, so a clean SIGTERM shutdown exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    if s.workers > 1:
        from uvicorn.supervisors import Multiprocess

        # Each worker builds its own app (and loads the model) from the resolved settings, which
        # reach it pickled through multiprocessing's inherited pipe -- never via the environment.
        config = uvicorn.Config(WorkerAppFactory(settings.to_json()), factory=True, workers=s.workers, **common)
        if sockets is None:
            sockets = [config.bind_socket()]
        Multiprocess(config, sockets=sockets).run()
        return 0

    try:
        app = create_app(settings)
    except SettingsError as exc:
        print(f"hybrid-router serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    server = uvicorn.Server(uvicorn.Config(app, **common))
    try:
        server.run(sockets=sockets)
    except SystemExit as exc:  # uvicorn exits on start-up failure (lifespan error, bind error)
        logging.getLogger("cloud_service").error("start-up failed (exit %s)", exc.code)
        return STARTUP_FAILURE
    return 0 if server.started else STARTUP_FAILURE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "hybrid-router-serve",
                                     description="Run the cloud inference service (Open Inference Protocol v2).")
    add_arguments(parser)
    return run(parser.parse_args(argv))
