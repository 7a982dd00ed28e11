"""Privacy means no socket at all: no connect, no DNS lookup, no probe -- checked with a Python
audit hook (it sees every socket created, connected or resolved, from any thread) in a fresh
interpreter, so no other test's servers can blur the count."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def _run(policy: dict, call_kwargs: dict, n: int = 200) -> dict:
    code = textwrap.dedent(
        f"""
        import json, sys
        events = []
        def hook(event, args):
            if event.startswith("socket."):
                events.append(event)
        sys.addaudithook(hook)

        from router_tools.datasets import load_test
        from router import Router
        from router.policy import parse_policy

        policy = parse_policy(json.loads({json.dumps(json.dumps(policy))}))
        test = load_test()
        with Router(policy) as r:
            preds = [r.predict(img, **json.loads({json.dumps(json.dumps(call_kwargs))})) for img in test.images[:{n}]]
            preds += r.predict_batch(list(test.images[{n}:{n} + 50]), **json.loads({json.dumps(json.dumps(call_kwargs))}))
        import threading
        network_work = sorted(m for m in sys.modules if m.startswith(("anyio._backends", "httpcore._backends")))
        network_work += [t.name for t in threading.enumerate() if t.name == "router-io"]
        print(json.dumps({{"events": events, "network_work": network_work, "reasons": sorted({{p.reason.value for p in preds}}),
                           "sources": sorted({{p.source for p in preds}}),
                           "min_conf": min(p.confidence for p in preds)}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


# An endpoint that would be reachable by name (DNS) and a probe that would run every 10 ms.
NETWORKED = {"cloud": {"endpoints": [{"url": "http://cloud.example.invalid:8000"}], "health_probe_interval_s": 0.01},
             "confidence_threshold": 0.999}


def test_privacy_mode_opens_no_socket():
    result = _run({**NETWORKED, "privacy_mode": True}, {})
    assert result["events"] == []
    assert result["network_work"] == []  # no async network stack loaded, no I/O thread
    assert result["sources"] == ["edge"] and result["reasons"] == ["privacy"]
    assert result["min_conf"] < 0.999  # low-confidence requests were among them, and still stayed local


def test_per_call_privacy_opens_no_socket():
    result = _run(NETWORKED, {"privacy": True})
    assert result["events"] == []
    assert "router-io" not in result["network_work"]  # (privacy off in the policy: the stack is warmed, unused)
    assert result["reasons"] == ["privacy"]


def test_the_audit_hook_does_see_an_escalation():
    # The same harness without privacy must record socket activity, or the tests above prove nothing.
    result = _run({**NETWORKED, "cloud": {**NETWORKED["cloud"], "endpoints": [{"url": "http://127.0.0.1:9"}]}},
                  {"deadline_ms": 200}, n=5)
    assert any(e in ("socket.__new__", "socket.connect") for e in result["events"])
