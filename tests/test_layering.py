"""The dependency rules between the three packages, checked in fresh interpreters."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules_after(stmt: str) -> set[str]:
    code = f"import sys; {stmt}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return set(out.stdout.split())


def test_router_core_imports_no_web_framework():
    mods = _modules_after("import router; from router import Router, RoutingPolicy; import router.cloud")
    assert not {m for m in mods if m.split(".")[0] in {"fastapi", "uvicorn", "starlette"}}


def test_protocol_module_imports_no_web_framework():
    mods = _modules_after("import cloud_service.protocol")
    assert not {m for m in mods if m.split(".")[0] in {"fastapi", "uvicorn", "starlette", "router"}}


def test_edge_model_knows_no_network():
    # (pydantic itself imports the stdlib socket module; actual socket use is covered by
    # test_router_privacy, which audits every socket event)
    mods = _modules_after("import edge_model, edge_model.runtime, edge_model.preprocess, edge_model.data")
    assert not {m for m in mods if m.split(".")[0] in {"httpx", "httpcore", "fastapi", "uvicorn", "starlette", "router", "cloud_service", "requests", "urllib3", "aiohttp"}}


def test_cloud_service_never_imports_router():
    for path in (ROOT / "cloud_service").rglob("*.py"):
        text = path.read_text()
        assert "import router" not in text and "from router" not in text, path
