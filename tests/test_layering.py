"""The dependency rules between the packages, checked in fresh interpreters.

- ``router`` (the client) imports neither ``cloud_service`` nor ``router_tools`` nor a web framework.
- ``cloud_service`` (the server) never imports ``router`` or ``router_tools``.
- ``oip`` (the wire-protocol types both sides use) imports only numpy and pydantic.
- ``edge_model`` knows nothing of networks, of the client or of the server.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WEB = {"fastapi", "uvicorn", "starlette", "prometheus_client", "rich", "matplotlib", "torch", "ray"}
NETWORK = {"httpx", "httpcore", "h11", "anyio", "requests", "urllib3", "aiohttp"}


def _modules_after(stmt: str) -> set[str]:
    code = f"import sys; {stmt}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return {m.split(".")[0] for m in out.stdout.split()}


def _imported_packages(package: str) -> dict[Path, set[str]]:
    """Top-level names each module of ``package`` imports, read from its source (lazy imports included)."""
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        if "build" in path.relative_to(ROOT).parts:
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[path] = names
    return found


def test_client_imports_no_server_tools_or_web_framework():
    mods = _modules_after("import router; from router import Router, RoutingPolicy; import router.cloud")
    # (httpx imports rich for its command line when rich is installed, as it is in the dev
    # environment; the client-only wheel test proves rich is not installed with the client)
    assert not mods & ((WEB - {"rich"}) | {"cloud_service", "router_tools"})


def test_router_with_an_endpoint_loads_httpx_without_its_command_line():
    # httpx's __init__ imports its CLI (rich, click, pygments) when installed; the router never
    # runs it (router/cloud.py _import_httpx), yet httpx.main still reaches the real one.
    mods = _modules_after(
        "from router import Router; from router.policy import parse_policy; "
        "Router(parse_policy({'cloud': {'endpoints': [{'url': 'http://127.0.0.1:9', 'model': 'm'}]}}))")
    assert "httpx" in mods and not mods & {"rich", "click", "pygments"}
    code = ("from router.cloud import _preload_async_stack; _preload_async_stack(); import httpx, importlib; "
            "print(importlib.util.find_spec('click') is None or "
            "importlib.import_module('httpx._main').main.name == 'main' and callable(httpx.main))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split()[-1] == "True"


@pytest.mark.parametrize("package, forbidden", [
    ("router", {"cloud_service", "router_tools"} | WEB),
    ("cloud_service", {"router", "router_tools"}),
    ("edge_model", {"router", "cloud_service", "router_tools", "oip"} | NETWORK | WEB),
    ("oip", {"router", "cloud_service", "router_tools", "edge_model"} | NETWORK | WEB),
])
def test_no_forbidden_import_anywhere_in_the_source(package, forbidden):
    # The one exception: the device's optional Prometheus exporter, behind the client's `metrics`
    # extra, imported only by whoever calls router.metrics.serve (never by `import router`).
    allowed = {"router/metrics.py": {"prometheus_client"}}
    bad = {str(p.relative_to(ROOT)): sorted(names & forbidden - allowed.get(str(p.relative_to(ROOT)), set()))
           for p, names in _imported_packages(package).items()
           if names & forbidden - allowed.get(str(p.relative_to(ROOT)), set())}
    assert not bad


def test_protocol_module_imports_only_numpy_and_pydantic():
    mods = _modules_after("import oip.protocol")
    assert not mods & (WEB | NETWORK | {"router", "cloud_service", "router_tools", "edge_model", "onnxruntime", "PIL", "yaml"})


def test_edge_model_knows_no_network():
    # (pydantic itself imports the stdlib socket module; actual socket use is covered by
    # test_router_privacy, which audits every socket event)
    mods = _modules_after("import edge_model, edge_model.runtime, edge_model.preprocess")
    assert not mods & (NETWORK | WEB | {"router", "cloud_service", "router_tools"})


def test_packaged_default_policy_is_the_documented_one():
    assert (ROOT / "router" / "default_policy.yaml").read_bytes() == (ROOT / "config" / "policy.yaml").read_bytes()
