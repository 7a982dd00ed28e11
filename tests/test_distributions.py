"""The three distributions, built as wheels and installed as a device app and an operator would.

The client wheel goes into a fresh virtual environment with its dependencies from the package
registry, is used from an unrelated folder, and must not bring the server's or the tools' stack.
Then the server and tools wheels go into the same environment and their commands run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
CLIENT_PACKAGES = ("router/", "edge_model/", "oip/")
# What a device must never get with the client.
NOT_ON_DEVICE = ("fastapi", "starlette", "uvicorn", "prometheus_client", "rich", "matplotlib", "ray", "torch",
                 "cloud_service", "router_tools")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _run(cmd, *, cwd, env=None, timeout=600):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    # Build from a copy of the tracked files, so the build leaves nothing in the checkout.
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "--quiet", "--no-deps",
          "--no-build-isolation", "-w", str(out), ".", "./cloud_service", "./router_tools"], cwd=src)
    found = {p.name.split("-")[0]: p for p in out.glob("*.whl")}
    assert set(found) == {"hybrid_edge_router", "hybrid_edge_router_server", "hybrid_edge_router_tools"}, found
    return found


def test_client_wheel_carries_only_the_client_and_at_most_one_mebibyte(wheels):
    with zipfile.ZipFile(wheels["hybrid_edge_router"]) as zf:
        infos = zf.infolist()
    project = [i for i in infos if i.filename.startswith(CLIENT_PACKAGES)]
    names = {i.filename for i in infos}
    assert sum(i.file_size for i in project) <= MiB, sum(i.file_size for i in project)
    assert "router/default_policy.yaml" in names
    assert "edge_model/artifacts/edge-int8.onnx" in names and "edge_model/artifacts/edge-int8.json" in names
    assert not [n for n in names if n.startswith(("cloud_service/", "router_tools/", "tests/", "bench/", "config/"))]
    assert not [n for n in names if n.endswith((".gz", ".pt"))]


@pytest.fixture(scope="module")
def device_env(tmp_path_factory, wheels):
    """A fresh virtual environment with only the client wheel (dependencies from the registry)."""
    venv = tmp_path_factory.mktemp("device-venv")
    _run([sys.executable, "-m", "venv", str(venv)], cwd=venv)
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "--disable-pip-version-check", "install", "--quiet", str(wheels["hybrid_edge_router"])],
         cwd=venv, timeout=900)
    return py


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HYBRID_"))}
    return env


def test_client_installs_alone_without_server_or_tools_stack(device_env):
    code = ("import importlib.metadata as md, importlib.util as u, json; "
            f"print(json.dumps({{n: u.find_spec(n) is not None for n in {list(NOT_ON_DEVICE)!r}}}))")
    present = json.loads(_run([str(device_env), "-c", code], cwd=device_env.parent.parent, env=_clean_env()))
    assert not [n for n, there in present.items() if there], present


def test_router_predict_from_an_unrelated_folder(device_env, tmp_path):
    app = tmp_path / "my-app"
    app.mkdir()
    # A real test image, written as a PNG the way an app would have one on disk.
    from router_tools.datasets import load_test

    split = load_test().head(3)
    for i, img in enumerate(split.images):
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(app / f"img{i}.png")
    script = app / "main.py"
    script.write_text(
        "import json, router\n"
        "from router import Router, RoutingPolicy\n"
        "out = []\n"
        "for i in range(3):\n"
        "    p = router.predict(f'img{i}.png', deadline_ms=500)\n"  # the packaged default policy
        "    out.append([p.label, p.source, p.reason])\n"
        "with Router(policy=RoutingPolicy(privacy_mode=True)) as r:\n"
        "    p = r.predict('img0.png')\n"
        "    out.append([p.label, p.source, p.reason])\n"
        "print(json.dumps(out))\n"
    )
    rows = json.loads(_run([str(device_env), str(script)], cwd=app, env=_clean_env()).strip().splitlines()[-1])
    assert len(rows) == 4
    for label, source, reason in rows:
        assert isinstance(label, str) and label and source in {"edge", "cloud"} and reason
    assert rows[3][1:] == ["edge", "privacy"]


def test_server_and_tools_wheels_install_beside_the_client_and_their_commands_run(device_env, wheels, tmp_path):
    _run([str(device_env), "-m", "pip", "--disable-pip-version-check", "install", "--quiet",
          str(wheels["hybrid_edge_router_server"]), str(wheels["hybrid_edge_router_tools"])],
         cwd=tmp_path, timeout=900)
    bindir = device_env.parent
    out = _run([str(bindir / "hybrid-router"), "serve", "--check"], cwd=tmp_path, env=_clean_env())
    assert out.strip()
    out = _run([str(bindir / "hybrid-router"), "predict", "--privacy", "--json"], cwd=tmp_path, env=_clean_env())
    assert '"source": "edge"' in out.replace("'", '"')
