"""The same FastAPI app on Ray Serve: 2 replicas on a private local Ray, real HTTP on loopback.

One module-scoped deployment (a local Ray start takes ~10-30 s on 2 busy cores); every test
talks to Serve's HTTP proxy with httpx. Ray runs with a temporary HOME, RAY_AUTH_MODE=disabled,
``num_cpus=2`` and 0.5 CPU per replica, and every socket it opens is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile

import httpx
import numpy as np
import pytest

from cloud_service.ray_serve import REPLICA_HEADER, deployment_options, settings_from_args
from cloud_service.settings import ServiceSettings, SettingsError
from tests.support.cloud import MODEL, infer_path, output, sample_pixels, v2_body

TIMEOUT = httpx.Timeout(30.0)


# ----------------------------------------------------------------------------- settings (no Ray)

def test_deployment_options_follow_ray_settings():
    s = ServiceSettings.model_validate({"ray": {"replicas": 3, "num_cpus": 0.25, "max_ongoing_requests": 7,
                                                "max_queued_requests": 9}})
    opts = deployment_options(s)
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 0.25}
    assert opts["max_ongoing_requests"] == 7 and opts["max_queued_requests"] == 9
    auto = ServiceSettings.model_validate({"ray": {"autoscale_min_replicas": 1, "autoscale_max_replicas": 4,
                                                   "target_ongoing_requests": 3}})
    opts = deployment_options(auto)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3}


def test_command_line_overrides():
    base = ServiceSettings.model_validate({"ray": {"autoscale_min_replicas": 1, "autoscale_max_replicas": 2}})
    fixed = settings_from_args(base, argparse.Namespace(replicas=2, autoscale=None, address=None))
    assert fixed.ray.replicas == 2 and fixed.ray.autoscaling is None
    auto = settings_from_args(ServiceSettings(), argparse.Namespace(replicas=None, autoscale="2,5", address="auto"))
    assert auto.ray.autoscaling["min_replicas"] == 2 and auto.ray.autoscaling["max_replicas"] == 5
    assert auto.ray.address == "auto"
    with pytest.raises(SettingsError, match="--autoscale"):
        settings_from_args(ServiceSettings(), argparse.Namespace(replicas=None, autoscale="2-5", address=None))
    with pytest.raises(SettingsError, match="--autoscale"):
        settings_from_args(ServiceSettings(), argparse.Namespace(replicas=None, autoscale="5,2", address=None))
    with pytest.raises(SettingsError, match="exclude"):
        settings_from_args(ServiceSettings(), argparse.Namespace(replicas=2, autoscale="1,2", address=None))


# ----------------------------------------------------------------------------- a real deployment

@pytest.fixture(scope="module")
def ray_service():
    pytest.importorskip("ray.serve", reason="the ray extra (ray[serve]) is not installed")
    from cloud_service.ray_serve import LocalRayServe

    settings = ServiceSettings.model_validate({
        "server": {"host": "127.0.0.1", "port": 0},
        # a short queue so that overload is easy to provoke; the batcher still coalesces
        "batching": {"max_batch_size": 8, "max_queue_delay_ms": 5, "max_queue_size": 2},
        "ray": {"replicas": 2, "num_cpus": 0.5, "max_ongoing_requests": 16, "max_queued_requests": 8,
                "request_timeout_s": 60},
    })
    home = tempfile.mkdtemp(prefix="ray-home-")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", home)
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("OMP_NUM_THREADS", "1")
        srv = LocalRayServe(settings, num_cpus=2, timeout_s=180)
        with srv:
            print(f"\nRay Serve with 2 replicas ready in {srv.startup_s:.1f} s at {srv.url}")
            yield srv
    shutil.rmtree(home, ignore_errors=True)
    assert not srv.leftover_processes(), "Ray processes outlived the deployment"


pytestmark_ray = pytest.mark.timeout(300)


@pytestmark_ray
def test_v2_endpoints_through_serve(ray_service):
    with httpx.Client(base_url=ray_service.url, timeout=TIMEOUT, trust_env=False) as c:
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 200
        server = c.get("/v2").json()
        assert server["name"] == "hybrid-router-cloud"  # our app, not a second implementation
        meta = c.get(f"/v2/models/{MODEL}").json()
        assert meta["platform"] == "onnx_onnxv1"
        assert meta["inputs"][0]["name"] == "input" and meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
        assert c.get(f"/v2/models/{MODEL}/ready").status_code == 200
        assert c.get("/v2/models/no-such-model").status_code == 404
        bad = c.post(infer_path(), json={"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
                                                     "data": [0.0, 1.0, 2.0]}]})
        assert bad.status_code == 400 and "error" in bad.json()
        assert "hybrid_cloud_inference_count" in c.get("/metrics").text


@pytestmark_ray
def test_answers_equal_the_onnx_classifier(ray_service):
    from edge_model.runtime import OnnxClassifier

    clf = OnnxClassifier(ray_service.settings.model.manifest)
    pixels = sample_pixels(6)
    with httpx.Client(base_url=ray_service.url, timeout=TIMEOUT, trust_env=False) as c:
        r = c.post(infer_path(), json=v2_body(pixels[:, None], request_id="ray-1"))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "ray-1"
    np.testing.assert_allclose(output(r.json(), "probabilities"), clf.classify(list(pixels)), atol=1e-5)


@pytestmark_ray
def test_requests_are_seen_on_both_replicas(ray_service):
    body = v2_body(sample_pixels(1)[:, None])

    async def round_of(n: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=ray_service.url, timeout=TIMEOUT, trust_env=False, limits=limits) as c:
            return await asyncio.gather(*(c.post(infer_path(), json=body) for _ in range(n)))

    seen: set[str] = set()
    for _ in range(10):  # Serve spreads concurrent requests; a few rounds make "both" certain
        for r in asyncio.run(round_of(4)):
            if r.status_code == 200:
                seen.add(r.headers[REPLICA_HEADER])
        if len(seen) >= 2:
            break
    assert len(seen) == 2, f"requests only reached replicas {seen}"


@pytestmark_ray
def test_expired_budget_is_504(ray_service):
    with httpx.Client(base_url=ray_service.url, timeout=TIMEOUT, trust_env=False) as c:
        r = c.post(infer_path(), json=v2_body(sample_pixels(1)[:, None], timeout_us=1))
    assert r.status_code == 504, r.text
    assert "error" in r.json()


@pytestmark_ray
def test_overload_answers_503_with_retry_after(ray_service):
    # 24 concurrent requests of 64 images each against 2 replicas with a batch queue of 2
    body = v2_body(sample_pixels(64)[:, None])

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=24)
        async with httpx.AsyncClient(base_url=ray_service.url, timeout=TIMEOUT, trust_env=False, limits=limits) as c:
            return await asyncio.gather(*(c.post(infer_path(), json=body) for _ in range(24)))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    shed = [r for r in responses if r.status_code == 503]
    assert shed, f"no request was shed: {statuses}"
    for r in shed:
        assert int(r.headers["retry-after"]) >= 1
    assert 200 in statuses
    with httpx.Client(base_url=ray_service.url, timeout=TIMEOUT, trust_env=False) as c:
        assert c.get("/v2/health/ready").status_code == 200



@pytestmark_ray
def test_router_escalates_to_ray_serve(ray_service):
    from edge_model.runtime import OnnxClassifier
    from router import Router
    from router.policy import parse_policy

    policy = parse_policy({
        "mode": "cloud_only",
        "default_deadline_ms": 10_000,  # a hang bound on a busy 2-core machine, not a speed goal
        "cloud": {"endpoints": [{"name": "ray", "url": ray_service.url, "model": MODEL}], "per_try_timeout_ms": 10_000},
        "decision_log": False,
    })
    pixels = sample_pixels(8)
    expected = OnnxClassifier(ray_service.settings.model.manifest).classify(list(pixels))
    with Router(policy) as router:
        predictions = router.predict_batch(list(pixels))
    for p, want in zip(predictions, expected):
        assert p.source == "cloud" and not p.fallback and p.endpoint == "ray", p
        np.testing.assert_allclose(p.probabilities, want, atol=1e-5)
