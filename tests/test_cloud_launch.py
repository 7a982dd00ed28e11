"""``LocalService``: outage (kill -> connection refused), recovery on the same port, start-up failures."""

from __future__ import annotations

import httpx
import pytest

from cloud_service.launch import LocalService, ServiceStartError
from tests.support.cloud import client, infer_path, sample_pixels, v2_body

pytestmark = pytest.mark.timeout(90)


def test_kill_refuses_connections_and_start_recovers_on_the_same_port(tmp_path):
    log = tmp_path / "svc.log"
    svc = LocalService(log_path=log)
    try:
        svc.start()
        port, first_pid = svc.port, svc.pid
        assert svc.start() is svc and svc.pid == first_pid  # idempotent while running
        with client(svc) as c:
            assert c.post(infer_path(), json=v2_body(sample_pixels(1))).status_code == 200
        svc.kill()
        assert not svc.running and svc.returncode == -9
        with pytest.raises(httpx.ConnectError):  # refused at once, not a hang
            httpx.get(svc.url + "/v2/health/live", timeout=5)
        svc.start()
        assert svc.port == port and svc.pid != first_pid
        with client(svc) as c:
            assert c.get("/v2/health/ready").status_code == 200
            assert c.post(infer_path(), json=v2_body(sample_pixels(1))).status_code == 200
    finally:
        code = svc.stop()
    assert not svc.running and svc.stop() == code  # stop twice is safe
    svc.kill()  # nothing running: no error
    text = log.read_text()
    assert text.count("LocalService start") == 2 and "Application startup complete" in text


def test_bad_model_fails_start_with_the_log_tail(tmp_path):
    missing = tmp_path / "nope.json"
    svc = LocalService(overrides={"model.manifest": str(missing)}, ready_timeout=30)
    with pytest.raises(ServiceStartError) as info:
        svc.start()
    assert "nope.json" in str(info.value) and "exited with code" in str(info.value)
    assert not svc.running


def test_invalid_settings_fail_start(tmp_path):
    svc = LocalService(overrides={"batching.max_batch_size": 0}, ready_timeout=30)
    with pytest.raises(ServiceStartError) as info:
        svc.start()
    assert "HYBRID_CLOUD__BATCHING__MAX_BATCH_SIZE" in str(info.value)
    assert "batching.max_batch_size" in str(info.value)


def test_several_workers_share_the_socket_and_the_settings():
    key = "worker-key-" + "w" * 16
    with LocalService(overrides={"server.workers": 2, "auth.api_keys": [key]}) as svc:
        with client(svc, headers={"Authorization": f"Bearer {key}"}) as c:
            for _ in range(4):
                assert c.post(infer_path(), json=v2_body(sample_pixels(1))).status_code == 200
        assert httpx.get(svc.url + "/v2", timeout=10).status_code == 401  # the key reached the workers
    log = svc.log_text()
    assert log.count("Application startup complete") == 2
    assert key not in log


def test_sigterm_is_a_clean_shutdown_with_exit_code_0():
    svc = LocalService()
    with svc:
        with client(svc) as c:
            assert c.get("/v2/health/ready").status_code == 200
    assert svc.returncode == 0  # uvicorn re-raised SIGTERM after shutting down: was 143
    assert "Application shutdown complete" in svc.log_text()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_worker_processes_get_the_keys_without_the_environment(tmp_path):
    key = "pipe-only-key-" + "p" * 16
    config = tmp_path / "cloud.yaml"  # keys in a file, so the parent's environment has none either
    config.write_text(f"server:\n  workers: 2\nauth:\n  api_keys: [{key}]\n")
    with LocalService(config) as svc:
        assert httpx.get(svc.url + "/v2", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200
        workers = _children(svc.pid)
        assert workers, "no worker processes found"
        for pid in workers:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                environ = fh.read()
            assert key.encode() not in environ and b"HYBRID_CLOUD_SETTINGS_JSON" not in environ
