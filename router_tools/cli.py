"""``hybrid-router`` command line: one registry of subcommands, each in its own module.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and keeps its heavy
imports inside ``run``; only the chosen command's module is imported, so ``--help`` and
``predict`` stay fast and the router's core never pulls in the web stack.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys

# A command whose part is not installed says in one line what to install.
MISSING_PART = {
    "cloud_service": "the cloud service is not installed: pip install hybrid-edge-router-server",
    "fastapi": "the cloud service is not installed: pip install hybrid-edge-router-server",
    "uvicorn": "the cloud service is not installed: pip install hybrid-edge-router-server",
    "torch": "training needs torch: pip install torch==2.13.0 'hybrid-edge-router-tools[train]'",
    "onnx": "this command needs the onnx package: pip install 'hybrid-edge-router-tools[train]'",
    "matplotlib": "plots need matplotlib: pip install 'hybrid-edge-router-tools[plot]'",
}

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("router_tools.commands.demo", "start a local cloud service and stream test images through the router (the main job)"),
    "predict": ("router_tools.commands.predict", "classify image files through the router"),
    "serve": ("cloud_service.cli", "run the cloud inference service (Open Inference Protocol v2; server distribution)"),
    "eval": ("router_tools.commands.evaluate", "evaluate edge-only / cloud-only / router on a labeled set"),
    "calibrate": ("router_tools.commands.calibrate", "choose a confidence threshold from labeled data"),
    "advise": ("router_tools.commands.advise", "measure edge and cloud here and recommend edge-only, cloud-only or hybrid"),
    "train": ("router_tools.train_cli", "train, export, quantize and calibrate the shipped models (train extra)"),
    "model": ("router_tools.commands.model", "bring your own ONNX model: import (manifest + validation), quantize (INT8 twin, measured)"),
    "release": ("router_tools.commands.release", "sign and publish edge-model releases for device updates (release extra)"),
    "ab": ("router_tools.commands.ab", "compare the arms of a routing A/B test from a router's stats() JSON"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid-router",
        description="Hybrid edge/cloud inference router: demo, predict, serve, eval, calibrate, train.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


# The project's typed errors: (module, class). Looked up in ``sys.modules`` when something is raised,
# so reporting an error imports nothing (a class whose module was never imported cannot be it).
TYPED_ERRORS = (
    ("router.errors", "RouterError"),  # ConfigError, PlotError, CalibrationError, LabeledDataError, ...
    ("edge_model.errors", "EdgeModelError"),
    ("router_tools.netsim.errors", "NetsimError"),
    ("cloud_service.launch", "ServiceStartError"),
    ("cloud_service.settings", "SettingsError"),
    ("oip.protocol", "ProtocolError"),
)
DEBUG_ENV = "HYBRID_ROUTER_DEBUG"  # set to 1 for the traceback instead of the one-line message


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except ModuleNotFoundError as exc:
        hint = MISSING_PART.get((exc.name or "").split(".")[0])
        if hint is None:
            raise
        print(f"hybrid-router: {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not _is_typed(exc) or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"hybrid-router {command or ''}: {one_line(exc)}".replace(" :", ":", 1), file=sys.stderr)
        return 2


def _is_typed(exc: BaseException) -> bool:
    for module, name in TYPED_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def one_line(exc: BaseException) -> str:
    """The error as one line: validation problems joined with ``; `` (each already names the file
    and the field, with a did-you-mean for a misspelt key); for anything else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    if _is_config(exc):
        return "; ".join(_did_you_mean(line, exc) for line in lines)
    more = f" (details: {DEBUG_ENV}=1)" if len(lines) > 1 else ""
    return lines[0] + more


def _is_config(exc: BaseException) -> bool:
    return any(isinstance(exc, cls) for cls in (getattr(sys.modules.get("router.errors"), "ConfigError", None),
                                                getattr(sys.modules.get("cloud_service.settings"), "SettingsError", None))
               if cls is not None)


_EXTRA = re.compile(r"^(?P<head>.*?)(?P<loc>[A-Za-z_][\w.]*): Extra inputs are not permitted$")


def _did_you_mean(line: str, exc: BaseException) -> str:
    """``... confidence_treshold: Extra inputs are not permitted`` -> ``...: extra field not permitted
    -- did you mean confidence_threshold?`` (the close names come from the pydantic model itself)."""
    m = _EXTRA.match(line)
    if not m:
        return line
    root = _root_model(exc)
    *parents, key = m.group("loc").split(".")
    fields = _fields_at(root, parents) if root is not None else []
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    hint = f" — did you mean {close[0]}?" if close else (f" (known: {', '.join(sorted(fields))})" if fields else "")
    return f"{m.group('head')}{m.group('loc')}: extra field not permitted{hint}"


def _root_model(exc: BaseException):
    settings = sys.modules.get("cloud_service.settings")
    if settings is not None and isinstance(exc, getattr(settings, "SettingsError")):
        return getattr(settings, "ServiceSettings", None)
    policy = sys.modules.get("router.policy")
    return getattr(policy, "RoutingPolicy", None)


def _fields_at(model, path: list[str]) -> list[str]:
    """Field names of the pydantic model reached from ``model`` along ``path`` (list indices skipped)."""
    import typing

    from pydantic import BaseModel

    def models_in(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]

    for part in path:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        found = models_in(field.annotation) if field is not None else []
        if not found:
            return []
        model = found[0]
    return list(model.model_fields)


if __name__ == "__main__":
    sys.exit(main())
