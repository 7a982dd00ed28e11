"""Give the C heap's free pages back to the OS: glibc's ``malloc_trim(0)``.

glibc keeps freed memory in its arenas (one per thread that allocated), so after a burst of
large decodes or batches the RSS stays at the peak with nothing holding it. ``malloc_trim``
returns every whole free page. Written by hand (a ctypes call on glibc's soname) because no
maintained library wraps it. Where the C library is not glibc (musl, macOS, Windows) there is
nothing to call and :func:`trim` returns False.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Callable, Optional


def _load() -> Optional[Callable[[int], int]]:
    # The soname directly: ctypes.util.find_library would run `ldconfig -p` in a subprocess
    # (10-40 ms of every import, i.e. of the router's cold start).
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None  # musl and others: no malloc_trim
        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (ValueError, OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_MALLOC_TRIM = _load()


def trim() -> bool:
    """``malloc_trim(0)``: True if it ran (glibc), False where there is nothing to call."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
