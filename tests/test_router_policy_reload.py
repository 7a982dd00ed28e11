"""Policy reload under an editor that rewrites the file in place (issue 10.1).

The subprocess tests run a fresh interpreter with a Python audit hook counting every socket
event (as tests/test_router_privacy.py does): a writer thread keeps rewriting the policy file in
place -- truncate, then line by line with flushes, pausing at random mid-file and between
rewrites, so empty and partial files stay on disk long enough to look at rest -- while 4 threads
call predict on images that would all escalate. The file only ever says privacy_mode: true.
Bounded by time, not iterations. Unit tests drive :class:`router.reload.PolicyWatcher` with fake clocks.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from router.errors import ConfigError
from router.policy import load_policy, parse_policy, parse_policy_text
from router.reload import PolicyWatcher, guard_privacy

ROOT = Path(__file__).resolve().parent.parent

_TORN = textwrap.dedent(
    """
    import json, logging, os, random, sys, threading, time
    events = []
    def hook(event, args):
        if event.startswith("socket."):
            events.append(event)
    sys.addaudithook(hook)

    from router_tools.datasets import load_test
    from router import Router

    path, pinned, seconds = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
    def lines(k):
        # privacy_mode last: every partial file lacks it; an endpoint every request would use
        return ["mode: prefer_edge\\n", "confidence_threshold: 1.0\\n", f"default_deadline_ms: {150 + k % 7}\\n",
                "reload_check_interval_s: 0.001\\n",
                "cloud:\\n", "  health_probe_interval_s: 0.01\\n", "  endpoints:\\n", "    - url: http://127.0.0.1:9\\n",
                "privacy_mode: true\\n"]
    with open(path, "w") as fh:
        fh.writelines(lines(0))
    time.sleep(0.1)  # the first version at rest before the router reads it

    reloads = []
    class Count(logging.Handler):
        def emit(self, record):
            if "reloaded" in record.getMessage():
                reloads.append(1)
    logging.getLogger("router").addHandler(Count())
    logging.getLogger("router").setLevel(logging.INFO)

    router = Router.from_config(path, privacy=pinned)
    test = load_test()
    stop = threading.Event()
    rng = random.Random(0)
    rewrites = [0]

    def writer():
        k = 0
        with open(path, "r+") as fh:
            while not stop.is_set():
                k += 1
                fh.seek(0)
                fh.truncate()
                fh.flush()
                pause_at = rng.choice([8, 8, rng.randrange(0, 9)])  # mostly just before privacy_mode
                for j, line in enumerate(lines(k)):
                    if j == pause_at and rng.random() < 0.3:
                        time.sleep(rng.uniform(0.0, 0.12))  # a stalled editor: partial file at rest
                    fh.write(line)
                    fh.flush()
                rewrites[0] += 1
                time.sleep(rng.uniform(0.0, 0.1))

    sources, reasons, count = set(), set(), [0]
    lock = threading.Lock()
    def caller(offset):
        i = offset
        while not stop.is_set():
            p = router.predict(test.images[i % 2000], deadline_ms=100)
            with lock:
                sources.add(p.source); reasons.add(p.reason.value); count[0] += 1
            i += 4

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=caller, args=(o,)) for o in range(4)]
    for t in threads:
        t.start()
    time.sleep(seconds)  # the test's time bound
    stop.set()
    for t in threads:
        t.join(10)
    stats = router.stats()
    router.close()
    print(json.dumps({"events": events, "sources": sorted(sources), "reasons": sorted(reasons), "predictions": count[0],
                      "rewrites": rewrites[0], "reloads": len(reloads), "privacy": stats["policy"]["privacy_mode"]}))
    """
)


def _torn(tmp_path: Path, pinned: bool, seconds: float = 3.0) -> dict:
    out = subprocess.run([sys.executable, "-c", _TORN, str(tmp_path / "policy.yaml"), "1" if pinned else "0",
                          str(seconds)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("pinned", [False, True], ids=["privacy-from-the-file", "privacy-pinned-in-code"])
def test_in_place_rewrites_never_open_a_socket(tmp_path, pinned):
    r = _torn(tmp_path, pinned)
    assert r["events"] == []
    assert r["sources"] == ["edge"] and r["reasons"] == ["privacy"] and r["privacy"] is True
    assert r["predictions"] > 0 and r["rewrites"] > 1
    assert r["reloads"] >= 1  # complete versions were adopted: the reload path really ran


# ----------------------------------------------------------------------------- units


class Clocks:
    """A monotonic and a wall clock moved together; file mtimes are set on the wall clock."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.wall = 1_700_000_000.0

    def advance(self, s: float) -> None:
        self.t += s
        self.wall += s


def _write(path: Path, text: str, clocks: Clocks) -> None:
    path.write_text(text)
    ns = int(clocks.wall * 1e9)
    os.utime(path, ns=(ns, ns))


@pytest.fixture()
def watched(tmp_path):
    clocks = Clocks()
    path = tmp_path / "p.yaml"
    _write(path, "privacy_mode: true\nconfidence_threshold: 0.5\n", clocks)
    clocks.advance(1.0)
    w = PolicyWatcher(path, clock=lambda: clocks.t, wall=lambda: clocks.wall, settle_s=0.05)
    w.baseline()
    return w, path, clocks


def test_a_change_is_adopted_only_at_rest(watched):
    w, path, clocks = watched
    assert w.poll() is None  # unchanged
    _write(path, "privacy_mode: true\nconfidence_threshold: 0.7\n", clocks)
    assert w.poll() is None and w.pending  # just written: not yet at rest
    clocks.advance(0.06)
    assert w.poll().confidence_threshold == 0.7
    assert not w.pending and w.poll() is None


def test_a_file_still_changing_is_not_adopted(watched):
    w, path, clocks = watched
    for k in range(5):
        _write(path, "privacy_mode: true\n" + "x: 1\n" * k, clocks)  # partial versions, each invalid or new
        assert w.poll() is None
        clocks.advance(0.01)


def test_empty_or_invalid_file_at_rest_keeps_the_policy_and_logs_once(watched, caplog):
    w, path, clocks = watched
    _write(path, "", clocks)
    clocks.advance(0.1)
    with caplog.at_level(logging.ERROR, logger="router"):
        assert w.poll() is None
        assert w.poll() is None
    assert len([r for r in caplog.records if "empty" in r.getMessage()]) == 1


def test_an_empty_document_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        parse_policy_text("# only a comment\n", "p.yaml")
    (tmp_path / "p.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_policy(tmp_path / "p.yaml")


def test_privacy_is_never_dropped_by_omission_and_never_lifted_when_pinned():
    on = parse_policy({"privacy_mode": True})
    silent = parse_policy({"mode": "prefer_edge"})  # a partial file: no privacy_mode at all
    off = parse_policy({"privacy_mode": False})
    assert guard_privacy(on, silent, pinned=False, source="f").privacy_mode is True
    assert guard_privacy(on, off, pinned=False, source="f").privacy_mode is False  # said explicitly
    assert guard_privacy(on, off, pinned=True, source="f").privacy_mode is True
    assert guard_privacy(off, silent, pinned=False, source="f").privacy_mode is False


def test_router_privacy_set_in_code_survives_a_file_reload(tmp_path):
    from router import Router

    path = tmp_path / "p.yaml"
    path.write_text("privacy_mode: false\nreload_check_interval_s: 0\n")
    with Router.from_config(path, privacy=True) as r:
        assert r.policy.privacy_mode
        r.reload_policy()
        assert r.policy.privacy_mode
    with Router(parse_policy({"privacy_mode": True}), policy_path=path) as r:
        r.reload_policy()
        assert r.policy.privacy_mode
