"""Policy reload from a file that an operator (or an editor) may be rewriting right now.

An editor that rewrites a file in place truncates it and writes it back piece by piece; a read
in between sees an empty or partial document, which may well be valid YAML ("mode: prefer_edge"
alone) and would silently put every other field back to its default -- privacy off among them.
So a changed file is only adopted once it is *at rest*: not modified for ``settle_s`` by its own
mtime, or the same size, mtime and content hash on two reads at least ``settle_s`` apart (for a
clock that disagrees with the file system's) -- and the document valid. Until then the last good policy stays; an invalid stable file is
logged once. Nothing here sleeps on a request's path: :meth:`PolicyWatcher.poll` remembers the
first read and compares on a later call. Written by hand: watchdog and friends report *that* a
file changed, not when it is complete.

Privacy never drops by omission: a file that no longer mentions ``privacy_mode`` (a partial
read, or a deleted line) keeps privacy on when it was on; only ``privacy_mode: false`` lifts
file-set privacy. Privacy set in code (``Router(privacy=True)``, or a policy object with
``privacy_mode: true`` given to the constructor) is pinned: no file can lift it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from router.errors import ConfigError
from router.policy import RoutingPolicy, parse_policy_text

log = logging.getLogger("router")

SETTLE_S = 0.05  # a complete write is at rest this long before it is trusted
LOG_UNSTABLE_AFTER_S = 2.0


@dataclass(frozen=True)
class FileRead:
    size: int
    mtime_ns: int
    digest: str
    text: str

    @property
    def signature(self) -> tuple[int, int, str]:
        return self.size, self.mtime_ns, self.digest


def read_file(path: Path) -> FileRead:
    """One read: content and the stat of the same open file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
            st = os.fstat(fh.fileno())
    except FileNotFoundError:
        raise ConfigError(f"{path}: policy file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read policy ({exc})") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: policy is not UTF-8 text ({exc})") from None
    return FileRead(len(data), st.st_mtime_ns, hashlib.sha256(data).hexdigest(), text)


def guard_privacy(old: RoutingPolicy, new: RoutingPolicy, pinned: bool, source: str) -> RoutingPolicy:
    """The privacy rules above, applied to a policy about to replace ``old``."""
    if new.privacy_mode:
        return new
    if pinned:
        return new.model_copy(update={"privacy_mode": True})
    if old.privacy_mode and "privacy_mode" not in new.model_fields_set:
        log.warning("%s no longer sets privacy_mode; privacy stays on until the file says privacy_mode: false", source)
        return new.model_copy(update={"privacy_mode": True})
    return new


class PolicyWatcher:
    """Tracks one policy file; :meth:`poll` returns a new policy once a change is stable and valid."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, settle_s: float = SETTLE_S) -> None:
        self.path = Path(path)
        self._clock, self._wall, self.settle_s = clock, wall, settle_s
        self._current: Optional[tuple[int, int, str]] = None  # signature of the file as last adopted
        self._pending: Optional[FileRead] = None
        self._pending_since = 0.0  # first read of the pending signature
        self._changing_since = 0.0  # first read that differed from the adopted file
        self._logged: set[str] = set()  # digests (or "unstable") already reported

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def load(self, timeout_s: float = 2.0) -> RoutingPolicy:
        """Blocking: wait (up to ``timeout_s``) for a stable file and return its policy.
        Raises ConfigError if it is invalid or keeps changing. For construction and explicit reloads."""
        end = self._clock() + timeout_s
        first = read_file(self.path)
        waited = False
        if not self._at_rest(first):
            time.sleep(self.settle_s)  # not on a request's path: construction or reload_policy()
            waited = True
        while True:
            second = read_file(self.path)
            if second.signature == first.signature and (waited or self._at_rest(second)):
                policy = parse_policy_text(second.text, str(self.path))
                self._current, self._pending = second.signature, None
                return policy
            if self._clock() >= end:
                raise ConfigError(f"{self.path}: the policy file kept changing for {timeout_s:g} s; "
                                  f"reload once it is written")
            first, waited = second, True
            time.sleep(self.settle_s)

    def baseline(self) -> None:
        """Take the file as it is now as the adopted one (the router was given its policy in code)."""
        try:
            self._current = read_file(self.path).signature
        except ConfigError:
            self._current = None

    def _at_rest(self, read: FileRead) -> bool:
        return self._wall() - read.mtime_ns / 1e9 >= self.settle_s

    def poll(self) -> Optional[RoutingPolicy]:
        """Non-blocking; call now and then (the router: on a request, when a check is due)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None  # a file being replaced may be briefly absent: keep the policy
        if self._pending is None and self._current is not None and (st.st_size, st.st_mtime_ns) == self._current[:2]:
            return None
        try:
            read = read_file(self.path)
        except ConfigError:
            return None
        now = self._clock()
        if self._current is not None and read.digest == self._current[2]:
            self._current, self._pending = read.signature, None  # touched, not changed
            return None
        at_rest = self._at_rest(read)
        if self._pending is None or self._pending.signature != read.signature:
            if self._pending is None:
                self._changing_since = now
            elif now - self._changing_since > LOG_UNSTABLE_AFTER_S and "unstable" not in self._logged:
                self._logged.add("unstable")
                log.error("%s keeps changing; keeping the previous policy until it is at rest", self.path)
            self._pending, self._pending_since = read, now
            if not at_rest:
                return None
        elif not (at_rest or now - self._pending_since >= self.settle_s):
            return None
        self._pending = None
        self._logged.discard("unstable")
        try:
            policy = parse_policy_text(read.text, str(self.path))
        except ConfigError as exc:
            self._current = read.signature  # do not re-read and re-log the same bad file
            if read.digest not in self._logged:
                self._logged.add(read.digest)
                log.error("policy file changed but is invalid; keeping the previous policy: %s", exc)
            return None
        self._current = read.signature
        return policy
