"""Shared bits of the reliability benches (``fault_matrix.py``, ``soak.py``): process gauges from
/proc, test images the shipped edge model is sure / unsure about, and percentiles.

Only the public router API is used (``Router``, ``Prediction`` fields), so the benches keep
measuring what an app sees while the internals change.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Gauges:
    rss_kb: int      # VmRSS: resident memory of this process
    fds: int         # open file descriptors
    os_threads: int  # kernel threads (incl. onnxruntime's and the router's I/O thread)
    py_threads: int  # threading.active_count()


def _status_field(name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {name} (Linux only)")


def gauges() -> Gauges:
    return Gauges(rss_kb=_status_field("VmRSS"), fds=len(os.listdir("/proc/self/fd")),
                  os_threads=_status_field("Threads"), py_threads=threading.active_count())


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C (``with`` blocks run), so a stopped bench stops its service too."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (``q`` in [0, 1]); NaN for no values."""
    if not values:
        return math.nan
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


def split_by_confidence(router, images: np.ndarray, want_confident: int, want_unsure: int):
    """Images the router answers on-device (``confident``) and images it escalates (``unsure``).

    Asked through the router itself in ``edge_only`` mode, so the split uses its own thresholds
    (per-class ones included) without touching any internals; ``edge_only`` never opens a socket.
    """
    threshold = router.policy.confidence_threshold
    overrides = router.policy.class_thresholds
    confident, unsure = [], []
    for img in images:
        p = router.predict(img, mode="edge_only")
        t = float(overrides.get(p.label, overrides.get(str(p.class_index), threshold)))
        (confident if p.confidence >= t else unsure).append(img)
        if len(confident) >= want_confident and len(unsure) >= want_unsure:
            break
    return confident[:max(want_confident, 1)], unsure[:max(want_unsure, 1)]


def test_images(limit: int = 4000) -> np.ndarray:
    """The first ``limit`` images of the shipped Fashion-MNIST test split (uint8 28x28)."""
    from router_tools.datasets import load_test

    return load_test().images[:limit]
