"""Memory of image decoding in the real service (issue #10.3): RSS baseline, peak and after.

Starts ``python -m cloud_service`` (``LocalService``, default settings unless overridden) and
posts a small PNG that decodes huge -- RGBA 4999x4999, just under the 25 M pixel limit, about
100 MB once decoded -- to ``/v1/classify``: once, then N at the same time. The service's RSS is
sampled from ``/proc/<pid>/status`` every 5 ms by a thread of this script; "after" is read once
the last answer is in and RSS has stopped falling (bounded wait).

    .venv/bin/python bench/decode_memory.py                 # 1 and 8 concurrent
    .venv/bin/python bench/decode_memory.py --concurrency 16 --size 4000

Before the memory bound (issue #10.3) one such PNG cost +794 MB and eight at once peaked at
4.3 GB. Goals: one <= +200 MB, eight <= +400 MB, after <= baseline + 50 MB. Linux only.
"""

from __future__ import annotations

import argparse
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud_service.launch import LocalService  # noqa: E402


def rgba_png(size: int) -> bytes:
    """RGBA ``size`` x ``size``: a noisy stripe pattern on transparency, compressed row by row."""
    comp = zlib.compressobj(9)
    rows = []
    for y in range(size):
        alpha = 255 if (y // 64) % 2 else 0
        row = bytes([0]) + bytes([(y * 7) & 255, 120, 200, alpha]) * size
        rows.append(comp.compress(row))
    idat = b"".join(rows) + comp.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Sampler:
    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(0.005)

    def __enter__(self) -> "Sampler":
        self.peak = rss_mb(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def settled_rss(pid: int, timeout: float = 10.0) -> float:
    """RSS once it stops falling (freed memory returned), within ``timeout``."""
    deadline = time.monotonic() + timeout
    last = rss_mb(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = rss_mb(pid)
        if now >= last - 1:
            return now
        last = now
    return last


def run_round(svc: LocalService, png: bytes, n: int) -> tuple[float, float, float, list[int]]:
    url = svc.url + "/v1/classify"
    base = settled_rss(svc.pid)

    def post(_):
        return httpx.post(url, content=png, headers={"content-type": "image/png"}, timeout=120, trust_env=False).status_code

    with Sampler(svc.pid) as sampler:
        with ThreadPoolExecutor(n) as pool:
            statuses = list(pool.map(post, range(n)))
    after = settled_rss(svc.pid)
    return base, sampler.peak, after, statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4999, help="image side in pixels (default 4999)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--override", action="append", default=[], metavar="DOTTED=VALUE",
                        help="service setting, e.g. limits.decode_budget_bytes=536870912")
    args = parser.parse_args()
    overrides = {}
    for item in args.override:
        key, _, value = item.partition("=")
        overrides[key] = int(value) if value.isdigit() else value
    png = rgba_png(args.size)
    print(f"image: RGBA {args.size}x{args.size}, {len(png) / 1024:.0f} KB encoded, "
          f"{args.size * args.size * 4 / 2**20:.0f} MB decoded")
    with LocalService(overrides=overrides) as svc:
        small = rgba_png(64)
        httpx.post(svc.url + "/v1/classify", content=small, timeout=30, trust_env=False).raise_for_status()
        print(f"{'concurrent':>10} {'baseline MB':>12} {'peak MB':>9} {'peak +MB':>9} {'after MB':>9} {'after +MB':>10}  statuses")
        for n in args.concurrency:
            base, peak, after, statuses = run_round(svc, png, n)
            counts = {s: statuses.count(s) for s in sorted(set(statuses))}
            print(f"{n:>10} {base:>12.0f} {peak:>9.0f} {peak - base:>+9.0f} {after:>9.0f} {after - base:>+10.0f}  {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
