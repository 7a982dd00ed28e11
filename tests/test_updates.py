"""Signed edge-model updates end to end: a real TUF repository published by ``router_tools.release``
in a temporary folder, served by a real static HTTP server on 127.0.0.1, read by the router's
``EdgeUpdater`` (python-tuf's ngclient over httpx). Every wait is a condition with a time bound."""

from __future__ import annotations

import functools
import http.server
import json
import select
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tuf", reason="the updates extra is not installed")

from edge_model.runtime import ARTIFACTS_DIR  # noqa: E402
from router import Router  # noqa: E402
from router.errors import ConfigError, PrivacyViolation  # noqa: E402
from router.policy import parse_policy  # noqa: E402
from router.updates import (ChannelUnavailable, GoldenSetMismatch, LabelMismatch, MetadataExpired,  # noqa: E402
                            NothingToRollBack, ReleaseReplayed, TamperedArtifact, TamperedMetadata, UpdateError,
                            choose_release, cohort_value, in_rollout)
from router_tools import release as rel  # noqa: E402
from router_tools.datasets import load_test  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = json.loads((ARTIFACTS_DIR / "edge-int8.json").read_text())["version"]
WAIT_S = 30.0


def wait_for(cond, timeout=WAIT_S, what="condition"):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)  # polling step, not a wait for an outcome: bounded by the deadline above


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def images():
    return list(load_test().images[:64])


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """The FP32 edge model's own answers on 32 test images (what `release publish` ships)."""
    return rel.golden_from_test_split(ARTIFACTS_DIR / "edge-fp32.json", 32)


def candidate(folder: Path, version: str, base: str = "edge-fp32.json", **changes) -> Path:
    """A release candidate: a shipped edge model (FP32 by default) under another version (and other fields)."""
    out = folder / f"cand-{version}-{len(changes)}-{base}"
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((ARTIFACTS_DIR / base).read_text())
    manifest.update(version=version, **changes)
    shutil.copy(ARTIFACTS_DIR / manifest["file"], out / manifest["file"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out / "manifest.json"


class StaticServer:
    """`python -m http.server` in a thread: the published folder as plain static files."""

    def __init__(self, directory: Path, port: int = 0):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.paths = []  # every path requested, in order
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        getattr(self.server, "paths", []).append(self.path)
        super().do_GET()


class Channel:
    def __init__(self, tmp: Path, golden):
        self.tmp = tmp
        self.repo = rel.Repo.at(tmp / "repo")
        rel.create_keys(self.repo)
        self.golden = golden
        self.server = StaticServer(self.repo.public)

    def publish(self, version: str, rollout: float = 1.0, *, golden=True, **kw) -> dict:
        g = rel.golden_bytes(*self.golden) if golden is True else (golden or None)
        cand = candidate(self.tmp, version, kw.pop("base", "edge-fp32.json"), **kw.pop("manifest", {}))
        return rel.publish(self.repo, cand, rollout=rollout, golden=g, **kw)

    def target_file(self, version: str, suffix: str) -> Path:
        (path,) = (self.repo.targets_dir / "edge" / version).glob(f"*{suffix}")
        return path


@pytest.fixture
def channel(tmp_path, golden):
    ch = Channel(tmp_path, golden)
    yield ch
    ch.server.close()


def policy_for(ch: Channel, tmp: Path, *, url: str | None = None, extra: dict | None = None, **updates):
    return parse_policy({"mode": "edge_only", **(extra or {}), "updates": {
        "enabled": True, "url": url or ch.server.url, "root": str(ch.repo.trust_anchor), "dir": str(tmp / "device"),
        "check_interval_s": 3600, **updates}})


@contextmanager
def router_on(ch: Channel, tmp: Path, *, extra: dict | None = None, **kw):
    r = Router(policy_for(ch, tmp, extra=extra, **kw))
    try:
        wait_for(lambda: r.updater.checks >= 1 and not r.updater._cycle_lock.locked(), what="the first check")
        yield r
    finally:
        r.close()


def version_of(r: Router) -> str:
    return r.stats()["edge"]["version"]


# ---------------------------------------------------------------------- live update under load


def test_release_is_swapped_in_while_four_threads_predict_with_no_failed_answer(channel, tmp_path, images):
    with router_on(channel, tmp_path) as r:
        assert r.updater.last_result == "no_release" and version_of(r) == BUNDLED
        answers: list = []
        errors: list = []
        stop = threading.Event()

        def work(k):
            i = k
            while not stop.is_set():
                try:
                    answers.append(r.predict(images[i % len(images)]))
                except Exception as exc:  # noqa: BLE001 - any failure is what this test counts
                    errors.append(exc)
                i += 4

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(answers) >= 40, what="answers before the release")
            channel.publish("2.0.0")
            r.updater.wake()
            wait_for(lambda: version_of(r) == "2.0.0", what="the swap")
            seen = len(answers)
            wait_for(lambda: len(answers) >= seen + 40, what="answers after the swap")
        finally:
            stop.set()
            for t in threads:
                t.join(WAIT_S)
        assert errors == []
        versions = {a.model_version for a in answers}
        assert {BUNDLED, "2.0.0"} <= versions and {a.source for a in answers} == {"edge"}
        assert r.updater.status()["active"] == "2.0.0" and r.updater.last_error is None


# ---------------------------------------------------------------------- refusals: the current model stays


def _tamper_onnx(ch: Channel):
    ch.publish("3.0.0")
    path = ch.target_file("3.0.0", ".onnx")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length, other bytes
    path.write_bytes(bytes(data))


def _tamper_targets(ch: Channel):
    out = ch.publish("3.0.0")
    path = ch.repo.metadata_dir / f"{out['targets_version']}.targets.json"
    md = json.loads(path.read_text())
    md["signed"]["targets"]["edge/3.0.0/manifest.json"]["length"] += 1  # signatures no longer match
    path.write_text(json.dumps(md))


def _expired_timestamp(ch: Channel):
    ch.publish("3.0.0", timestamp_days=-1)


def _replayed(ch: Channel, r: Router):
    old = ch.tmp / "old-public"
    shutil.copytree(ch.repo.public, old)  # what an attacker recorded while 2.0.0 was current
    ch.publish("3.0.0")
    assert r.updater.check_now() == "updated:3.0.0"
    shutil.rmtree(ch.repo.public)
    shutil.copytree(old, ch.repo.public)  # the mirror now replays the older, validly signed state


def _labels(ch: Channel):
    # A release brings its own labels, but this one drops "Shirt", which the policy's class_thresholds name.
    labels = json.loads((ARTIFACTS_DIR / "edge-fp32.json").read_text())["labels"]
    ch.publish("3.0.0", manifest={"labels": [x if x != "Shirt" else "Top" for x in labels]})


def _golden(ch: Channel):
    x, labels = ch.golden
    ch.publish("3.0.0", golden=rel.golden_bytes(x, (labels + 1) % 10))


REFUSALS = {
    "tampered_onnx": (_tamper_onnx, TamperedArtifact, "2.0.0"),
    "tampered_targets_metadata": (_tamper_targets, TamperedMetadata, "2.0.0"),
    "expired_timestamp": (_expired_timestamp, MetadataExpired, "2.0.0"),
    "replayed_older_release": (_replayed, ReleaseReplayed, "3.0.0"),
    "label_mismatch": (_labels, LabelMismatch, "2.0.0"),
    "golden_set_mismatch": (_golden, GoldenSetMismatch, "2.0.0"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_release_is_refused_with_a_typed_error_and_the_current_model_keeps_answering(case, channel, tmp_path,
                                                                                           images):
    make_bad, error, stays = REFUSALS[case]
    channel.publish("2.0.0")
    with router_on(channel, tmp_path, extra={"class_thresholds": {"Shirt": 0.9}}) as r:
        assert version_of(r) == "2.0.0"
        if case == "replayed_older_release":
            make_bad(channel, r)
        else:
            make_bad(channel)
        with pytest.raises(error) as info:
            r.updater.check_now()
        assert "\n" not in str(info.value)
        assert version_of(r) == stays and r.updater.status()["active"] == stays
        assert isinstance(r.updater.last_error, error)
        p = r.predict(images[0])
        assert p.source == "edge" and p.model_version == stays
        if error in (LabelMismatch, GoldenSetMismatch):
            # refused on this device: not retried, not kept on disk
            assert "3.0.0" in r.updater.status()["refused"] and "3.0.0" not in r.updater.on_disk()
            assert r.updater.check_now() == "current:2.0.0"


# ---------------------------------------------------------------------- the operator's command and key rotation


def test_release_command_and_key_rotation_keep_devices_updating(channel, tmp_path, capsys):
    from router_tools.cli import main

    repo = str(channel.repo.root_dir)
    keys = channel.repo.keys_dir
    assert {f.name for f in keys.glob("*.pem")} == {"root.pem", "targets.pem", "snapshot.pem", "timestamp.pem"}
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in keys.glob("*.pem")) and keys.stat().st_mode & 0o777 == 0o700
    assert not list(channel.repo.public.rglob("*.pem"))  # nothing private is served
    assert main(["release", "keys", "--repo", repo]) == 2  # never overwrites keys
    assert "rotate-key" in capsys.readouterr().err
    assert main(["release", "publish", "--repo", repo, "--manifest", str(candidate(tmp_path, "2.0.0")),
                 "--rollout", "1", "--golden-samples", "16"]) == 0
    with router_on(channel, tmp_path) as r:
        assert version_of(r) == "2.0.0"
        for role in ("timestamp", "targets", "snapshot", "root"):
            assert main(["release", "rotate-key", role, "--repo", repo]) == 0
        assert len(list((keys / "retired").glob("*.pem"))) == 4
        assert main(["release", "publish", "--repo", repo, "--manifest", str(candidate(tmp_path, "3.0.0")),
                     "--no-golden"]) == 0
        assert r.updater.check_now() == "updated:3.0.0"  # root v5 reached through the chain of signed roots
        assert json.loads((tmp_path / "device" / "metadata" / "root.json").read_text())["signed"]["version"] == 5
    capsys.readouterr()
    assert main(["release", "status", "--repo", repo]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["latest"] == "3.0.0" and set(status["releases"]) == {"2.0.0", "3.0.0"}


# ---------------------------------------------------------------------- staged rollout


def test_rollout_share_zero_then_one(channel, tmp_path):
    channel.publish("2.0.0", rollout=0.0)
    with router_on(channel, tmp_path) as r:
        assert r.updater.last_result == "not_in_cohort" and version_of(r) == BUNDLED
        channel.publish("2.0.0", rollout=1.0)  # the same release, widened: only the channel file changes
        assert r.updater.check_now() == "updated:2.0.0"


def test_cohort_is_a_stable_uniform_hash_that_widens_monotonically():
    ids = [f"device-{i}" for i in range(20_000)]
    assert cohort_value("a", "2.0.0") == cohort_value("a", "2.0.0")
    at5 = {d for d in ids if in_rollout(d, "2.0.0", 0.05)}
    at25 = {d for d in ids if in_rollout(d, "2.0.0", 0.25)}
    assert at5 <= at25  # 5 % -> 25 %: nobody who had the release loses it
    assert 0.04 < len(at5) / len(ids) < 0.06 and 0.23 < len(at25) / len(ids) < 0.27
    other = {d for d in ids if in_rollout(d, "3.0.0", 0.05)}
    assert len(at5 & other) < len(at5) * 0.2  # each release draws its own cohort
    assert not any(in_rollout(d, "2.0.0", 0.0) for d in ids) and all(in_rollout(d, "2.0.0", 1.0) for d in ids)
    channel = {"releases": {"1": {"seq": 1, "rollout": 1.0}, "2": {"seq": 2, "rollout": 0.0}}}
    assert choose_release(channel, "x") == "1" and choose_release(channel, "x", pin="2") == "2"
    assert choose_release({"releases": {"2": {"seq": 2, "rollout": 1.0}}}, "x", refused={"2"}) is None
    with pytest.raises(UpdateError):
        choose_release(channel, "x", pin="9")


def test_device_id_is_generated_once_and_kept(channel, tmp_path):
    with router_on(channel, tmp_path) as r:
        first = r.updater.device_id
    with router_on(channel, tmp_path) as r:
        assert r.updater.device_id == first and len(first) == 32


def test_a_device_holding_the_base_downloads_only_the_zstd_patch(channel, tmp_path, images):
    channel.publish("2.0.0")
    with router_on(channel, tmp_path) as r:
        assert version_of(r) == "2.0.0"
        entry = channel.publish("3.0.0", base="edge-int8.json", golden=False, delta_from=("2.0.0",))
        patch = channel.target_file("3.0.0", ".zst")
        assert entry["deltas"]["2.0.0"]["path"].endswith(".from-2.0.0.zst")
        del channel.server.httpd.paths[:]
        assert r.updater.check_now() == "updated:3.0.0"
        fetched = channel.server.httpd.paths
        assert any(p.endswith(".zst") for p in fetched) and not any(p.endswith(".onnx") for p in fetched)
        assert r.updater.status()["last_delta"].startswith("3.0.0 from 2.0.0")
        assert r.predict(images[0]).model_version == "3.0.0"
        print(f"\nzstd patch 2.0.0 -> 3.0.0: {patch.stat().st_size} bytes for a "
              f"{(ARTIFACTS_DIR / 'edge-int8.onnx').stat().st_size}-byte model")


# ---------------------------------------------------------------------- versions on disk, pin, rollback


def test_keep_versions_pin_and_manual_rollback(channel, tmp_path, images):
    channel.publish("2.0.0")
    with router_on(channel, tmp_path, keep_versions=2) as r:
        for v in ("3.0.0", "4.0.0"):
            channel.publish(v)
            assert r.updater.check_now() == f"updated:{v}"
        assert r.updater.on_disk() == ["3.0.0", "4.0.0"]  # the last two
        assert r.rollback_edge() == "3.0.0" and version_of(r) == "3.0.0"
        assert r.predict(images[0]).model_version == "3.0.0"
        assert r.updater.check_now() == "current:3.0.0"  # the rolled-back release is not taken again
        assert r.rollback_edge() == BUNDLED  # nothing older on disk: the bundled model
        with pytest.raises(NothingToRollBack):
            r.rollback_edge()
    # A pinned release is taken whatever its rollout share (here: one pruned, downloaded again).
    with router_on(channel, tmp_path, pin="2.0.0") as r:
        assert version_of(r) == "2.0.0" and r.updater.last_result == "updated:2.0.0"


def test_the_active_release_is_restored_from_disk_at_start(channel, tmp_path):
    channel.publish("2.0.0")
    with router_on(channel, tmp_path) as r:
        assert version_of(r) == "2.0.0"
    channel.server.close()  # the channel is gone: the device still starts on its release
    r = Router(policy_for(channel, tmp_path))
    try:
        assert version_of(r) == "2.0.0"
        wait_for(lambda: r.updater.checks >= 1 and not r.updater._cycle_lock.locked(), what="the first check")
        assert isinstance(r.updater.last_error, ChannelUnavailable)
    finally:
        r.close()
        channel.server = StaticServer(channel.repo.public)  # for the fixture's teardown


def test_rollback_without_updates_is_a_config_error():
    with Router(parse_policy({"mode": "edge_only"})) as r:
        with pytest.raises(ConfigError, match="updates.enabled"):
            r.rollback_edge()


def test_missing_extra_names_the_install_command(monkeypatch):
    import router.updates as updates

    monkeypatch.setattr(updates.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'hybrid-edge-router\[updates\]'") as info:
        updates.require_tuf()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------- a server killed mid-download

_CUTTING_SERVER = textwrap.dedent("""
    import http.server, sys, time
    directory = sys.argv[1]
    class H(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=directory, **k)
        def log_message(self, *a):
            pass
        def do_GET(self):
            if not self.path.endswith(".onnx"):
                return super().do_GET()
            data = open(self.translate_path(self.path), "rb").read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            print("MID", flush=True)
            time.sleep(600)  # until the test kills this process
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    print("PORT", srv.server_address[1], flush=True)
    srv.serve_forever()
""")


def _read_line(proc, timeout=WAIT_S) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the server printed nothing in time"
    return proc.stdout.readline().strip()


def test_server_killed_mid_download_then_a_later_update_succeeds(channel, tmp_path, images):
    channel.publish("2.0.0")
    proc = subprocess.Popen([sys.executable, "-c", _CUTTING_SERVER, str(channel.repo.public)],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(_read_line(proc).split()[1])
        r = Router(policy_for(channel, tmp_path, url=f"http://127.0.0.1:{port}"))
        try:
            assert _read_line(proc) == "MID"  # the updater is inside the model download
            assert r.predict(images[0]).model_version == BUNDLED  # answering meanwhile
            proc.kill()
            proc.wait(WAIT_S)
            wait_for(lambda: isinstance(r.updater.last_error, ChannelUnavailable), what="the failed check")
            assert version_of(r) == BUNDLED and r.updater.on_disk() == []  # nothing half-written kept
            server = StaticServer(channel.repo.public, port=port)  # back on the same address
            try:
                assert r.updater.check_now() == "updated:2.0.0"
            finally:
                server.close()
            assert r.predict(images[0]).model_version == "2.0.0"
        finally:
            r.close()
    finally:
        proc.kill()
        proc.wait(WAIT_S)


# ---------------------------------------------------------------------- no model yet


@pytest.mark.slow
def test_no_model_yet_answers_from_the_cloud_then_swaps_the_release_in(channel, tmp_path, images):
    from tests.support.cloud import running_service

    channel.publish("2.0.0")
    with running_service() as svc:
        policy = parse_policy({
            "mode": "prefer_edge", "default_deadline_ms": 5000, "confidence_threshold": 0.0,
            "edge": {"manifest": str(tmp_path / "missing.json")},
            "cloud": {"url": svc.url, "per_try_timeout_ms": 5000, "connect_timeout_ms": 2000},
            "updates": {"enabled": True, "url": channel.server.url, "root": str(channel.repo.trust_anchor),
                        "dir": str(tmp_path / "device"), "check_interval_s": 3600}})
        # Hold the channel back until the router has answered once without a model.
        gate = threading.Event()

        class Gated(_QuietHandler):
            def do_GET(self):
                gate.wait(WAIT_S)
                super().do_GET()

        channel.server.httpd.RequestHandlerClass = functools.partial(Gated, directory=str(channel.repo.public))
        with Router(policy) as r:
            assert r.edge_model is None
            p = r.predict(images[0])
            assert p.source == "cloud" and p.reason.value == "edge_error"
            gate.set()
            wait_for(lambda: version_of(r) == "2.0.0", what="the first model")
            p = r.predict(images[0])
            assert p.source == "edge" and p.model_version == "2.0.0"


# ---------------------------------------------------------------------- privacy: no socket at all


def _privacy_run(policy: dict, *, check: bool) -> dict:
    code = textwrap.dedent(f"""
        import json, sys, threading, time
        events = []
        sys.addaudithook(lambda e, a: events.append(e) if e.startswith("socket.") else None)
        from router import Router
        from router.errors import PrivacyViolation
        from router.policy import parse_policy
        from router_tools.datasets import load_test
        images = list(load_test().images[:50])
        with Router(parse_policy(json.loads({json.dumps(json.dumps(policy))}))) as r:
            preds = [r.predict(img) for img in images]
            outcome = None
            if {check!r}:
                try:
                    outcome = r.updater.check_now()
                except PrivacyViolation as exc:
                    outcome = "PrivacyViolation"
                except Exception as exc:
                    outcome = type(exc).__name__
            threads = sorted(t.name for t in threading.enumerate())
        print(json.dumps({{"events": sorted(set(events)), "outcome": outcome, "threads": threads,
                           "reasons": sorted({{p.reason.value for p in preds}})}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_privacy_mode_with_the_updater_configured_opens_no_socket(channel, tmp_path):
    channel.publish("2.0.0")
    updates = {"enabled": True, "url": channel.server.url, "root": str(channel.repo.trust_anchor),
               "dir": str(tmp_path / "device"), "check_interval_s": 0.01}
    result = _privacy_run({"privacy_mode": True, "updates": updates}, check=True)
    assert result["events"] == []
    assert result["outcome"] == "PrivacyViolation" and "router-updates" not in result["threads"]
    assert result["reasons"] == ["privacy"]
    # The same harness without privacy sees the updater's sockets, or the assertion above proves nothing.
    result = _privacy_run({"mode": "edge_only", "updates": updates}, check=True)
    assert "socket.connect" in result["events"] and result["outcome"] in ("updated:2.0.0", "current:2.0.0")


# ---------------------------------------------------------------------- a release brings its labels and calibration


def _unsure_rate(r: Router, images) -> float:
    """Share of edge answers under the threshold in force (field stats of the answering version)."""
    version = version_of(r)
    before = r.stats()["field"]["versions"].get(version, {})
    n0 = before.get("requests", 0)
    u0 = (before.get("unsure_rate") or 0.0) * n0
    for img in images:
        r.predict(img)
    after = r.stats()["field"]["versions"][version]
    return (after["unsure_rate"] * after["requests"] - u0) / (after["requests"] - n0)


def test_a_release_brings_its_calibration_unless_the_policy_pins_thresholds(channel, tmp_path, images):
    # The policy's threshold (0.9999) leaves almost every answer unsure; the release's (0.0) none.
    channel.publish("2.0.0", manifest={"calibration": {"threshold": 0.0, "expected_escalation": 0.0,
                                                       "split": "validation"}})
    extra = {"confidence_threshold": 0.9999, "decision_log": False}
    with router_on(channel, tmp_path, extra=extra) as r:
        assert version_of(r) == "2.0.0"
        assert _unsure_rate(r, images[:40]) == 0.0
        assert r.stats()["field"]["expected_escalation"] == 0.0  # the drift band is the release's
        assert r.rollback_edge() == BUNDLED  # the bundled model: the policy's threshold again
        assert _unsure_rate(r, images[:40]) > 0.5 and r.stats()["field"]["expected_escalation"] is None
    shutil.rmtree(tmp_path / "device")
    with router_on(channel, tmp_path, extra=extra, calibration="policy") as r:
        assert version_of(r) == "2.0.0"
        assert _unsure_rate(r, images[:40]) > 0.5  # pinned: the policy's threshold, and no band from the release
        assert r.stats()["field"]["expected_escalation"] is None


def test_a_policy_reload_that_changes_edge_keeps_the_installed_release(channel, tmp_path, images, caplog):
    channel.publish("2.0.0")
    channel.publish("3.0.0", rollout=0.0)  # reachable by pin only
    path = tmp_path / "policy.yaml"

    def write(edge_manifest: str, pin: str | None = None):
        updates = {"enabled": True, "url": channel.server.url, "root": str(channel.repo.trust_anchor),
                   "dir": str(tmp_path / "device"), "check_interval_s": 3600, "pin": pin}
        path.write_text(json.dumps({"mode": "edge_only", "reload_check_interval_s": 0, "decision_log": False,
                                    "edge": {"manifest": edge_manifest}, "updates": updates}))

    write(str(ARTIFACTS_DIR / "edge-int8.json"))
    r = Router(policy_path=path)
    try:
        wait_for(lambda: version_of(r) == "2.0.0", what="the release")
        write(str(ARTIFACTS_DIR / "edge-fp32.json"))
        with caplog.at_level("WARNING", logger="router"):
            r.reload_policy()
        assert version_of(r) == "2.0.0" and r.predict(images[0]).model_version == "2.0.0"
        assert any("the installed release 2.0.0 keeps answering" in rec.getMessage() for rec in caplog.records)
        # The policy's new model is what a rollback returns to.
        assert r.rollback_edge() == BUNDLED and r.edge_model.manifest.precision == "fp32"
        write(str(ARTIFACTS_DIR / "edge-fp32.json"), pin="3.0.0")  # a pin replaces it, at once
        r.reload_policy()
        wait_for(lambda: version_of(r) == "3.0.0", what="the pinned release")
    finally:
        r.close()


@pytest.mark.slow
def test_a_release_with_other_labels_answers_with_them_and_rechecks_the_real_service(channel, tmp_path, images):
    from tests.support.cloud import running_service

    labels = json.loads((ARTIFACTS_DIR / "edge-fp32.json").read_text())["labels"]
    renamed = [f"class-{i}" for i in range(len(labels))]
    with running_service() as svc:
        pol = parse_policy({
            "mode": "prefer_edge", "default_deadline_ms": 5000, "decision_log": False,
            "cloud": {"endpoints": [{"url": svc.url, "name": "svc"}], "per_try_timeout_ms": 5000},
            "updates": {"enabled": True, "url": channel.server.url, "root": str(channel.repo.trust_anchor),
                        "dir": str(tmp_path / "device"), "check_interval_s": 3600}})
        with Router(pol) as r:
            wait_for(lambda: r.updater.checks >= 1 and not r.updater._cycle_lock.locked(), what="the first check")
            assert r.connect() == {"svc": "ok"}
            p = r.predict(images[0], threshold=1.0)  # escalated: the service answers under the shared names
            assert p.source == "cloud" and p.label in labels
            channel.publish("2.0.0", manifest={"labels": renamed})
            assert r.updater.check_now() == "updated:2.0.0"
            p = r.predict(images[0])
            assert p.source == "edge" and p.label in renamed and p.model_version == "2.0.0"
            p = r.predict(images[0], threshold=1.0)  # the service's labels no longer match: never asked
            assert p.source == "edge" and p.fallback and p.label in renamed
            assert p.cloud_failure.category == "incompatible" and p.cloud_failure.endpoint == "svc"
            assert "svc" in p.cloud_failure.message and "class-0" in p.cloud_failure.message
            assert "T-shirt/top" in p.cloud_failure.message and "\n" not in p.cloud_failure.message
            channel.publish("3.0.0")  # the shared labels again: the endpoint is usable again
            assert r.updater.check_now() == "updated:3.0.0"
            p = r.predict(images[0], threshold=1.0)
            assert p.source == "cloud" and p.label in labels and not p.fallback


def test_publish_with_target_escalation_ships_the_calibration(channel, tmp_path, capsys):
    from router_tools.cli import main

    repo = str(channel.repo.root_dir)
    assert main(["release", "publish", "--repo", repo, "--manifest", str(candidate(tmp_path, "2.0.0")),
                 "--no-golden", "--target-escalation", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "calibration on validation: threshold 0.89" in out and "escalation 25.0%" in out
    assert main(["release", "publish", "--repo", repo, "--manifest", str(candidate(tmp_path, "3.0.0")),
                 "--no-golden", "--target-escalation", "1.5"]) == 2
    assert "--target-escalation must be within [0, 1]" in capsys.readouterr().err
    with router_on(channel, tmp_path) as r:
        assert version_of(r) == "2.0.0"
        cal = r.edge_model.manifest.calibration
        assert cal.split == "validation" and cal.expected_escalation == 0.25 and 0.85 < cal.threshold < 0.95
        assert r.stats()["field"]["expected_escalation"] == 0.25
