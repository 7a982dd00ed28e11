"""Give the C heap's free pages back to the OS: glibc's ``malloc_trim(0)`` and, for a long-running
server, a fixed trim threshold (``mallopt(M_TRIM_THRESHOLD)``).

glibc keeps freed memory in its arenas (one per thread that allocated), so after a burst of
large decodes or batches the RSS stays at the peak with nothing holding it. ``malloc_trim``
returns every whole free page in the arenas' free lists -- but not the free *top* of a thread's
arena, which glibc gives back only when it exceeds the trim threshold, and glibc raises that
threshold each time a large memory-mapped block is freed (up to 64 MiB). Written by hand (ctypes
calls on glibc's soname) because no maintained library wraps them. Where the C library is not
glibc (musl, macOS, Windows) there is nothing to call and both functions return False.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Callable, Optional


def _load(name: str, argtypes: list) -> Optional[Callable[..., int]]:
    # The soname directly: ctypes.util.find_library would run `ldconfig -p` in a subprocess
    # (10-40 ms of every import, i.e. of the router's cold start).
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None  # musl and others: no malloc_trim
        fn = getattr(ctypes.CDLL("libc.so.6"), name)
    except (ValueError, OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_MALLOC_TRIM = _load("malloc_trim", [ctypes.c_size_t])
_MALLOPT = _load("mallopt", [ctypes.c_int, ctypes.c_int])
_M_TRIM_THRESHOLD = -1  # <malloc.h>


def trim() -> bool:
    """``malloc_trim(0)``: True if it ran (glibc), False where there is nothing to call."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def fix_trim_threshold(nbytes: int = 128 * 1024) -> bool:
    """``mallopt(M_TRIM_THRESHOLD, nbytes)`` (glibc's default, but fixed): a thread's arena then
    gives its free top back as soon as it exceeds ``nbytes``. Left to adjust itself, the threshold
    rose with the service's large frees, and after a flood the inference threads' arenas kept
    16-28 MiB of free memory resident in about one run of three, which no ``malloc_trim`` returns.
    Fixing it also stops glibc moving the mmap threshold (it stays where it is). For a process
    that runs for long and sees bursts (the cloud service); True if it ran (glibc)."""
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(_M_TRIM_THRESHOLD, int(nbytes)))
