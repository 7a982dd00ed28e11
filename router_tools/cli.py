"""``hybrid-router`` command line: one registry of subcommands, each in its own module.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and keeps its heavy
imports inside ``run``; only the chosen command's module is imported, so ``--help`` and
``predict`` stay fast and the router's core never pulls in the web stack.
"""

from __future__ import annotations

import argparse
import importlib
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
    "train": ("router_tools.train_cli", "train, export, quantize and calibrate the shipped models (train extra)"),
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


if __name__ == "__main__":
    sys.exit(main())
