"""Keep a long run's heap from creeping: fewer glibc malloc arenas.

glibc gives threads their own malloc arenas (up to 8 per core). A run allocates from many threads at
once (image decoding, torch's intra-op threads, Arrow's writers), and freed blocks spread over many
arenas are rarely handed back: measuring 30,000 images with the activation store, resident memory
crept from 954 to 1,029 MiB while nothing per image was kept (issue 16). With two arenas it stayed at
~950 MiB over the same run, peaking at 982 MiB instead of 1,050, and the run was no slower on 2 cores.

The limit applies to arenas created after the call (``mallopt(M_ARENA_MAX)``, as the
``MALLOC_ARENA_MAX`` environment variable does at start-up, which a user's setting still overrides).
Elsewhere than glibc (macOS, Windows, musl) nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: glibc's ``M_ARENA_MAX`` option of ``mallopt``
_M_ARENA_MAX = -8
#: the arenas a run uses; measured on 2 cores (module docstring)
ARENAS = 2
_done = False


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Limit glibc's malloc arenas to ``arenas`` for the rest of the process, once; True if it was set (not on
    glibc, or with ``MALLOC_ARENA_MAX`` set by the user, nothing is changed)."""
    global _done
    if _done or not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_ARENA_MAX, int(arenas)))
    return _done
