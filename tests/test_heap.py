"""glibc's malloc arenas are limited for a run (:mod:`fluency.core.run.heap`), counted with ``malloc_info``.

Each case runs in a fresh interpreter: eight threads allocate at once, then glibc's own report of its
heaps (``malloc_info``'s ``<heap nr=…>`` entries) is counted. Without the limit the threads get arenas
of their own; with it there are at most two.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")

SCRIPT = textwrap.dedent("""
    import ctypes, os, sys, tempfile, threading
    from fluency.core.run.heap import limit_malloc_arenas
    limited = limit_malloc_arenas() if sys.argv[1] == "limit" else False
    again = limit_malloc_arenas() if sys.argv[1] == "limit" else False
    barrier = threading.Barrier(8)
    def work():
        barrier.wait()
        kept = [bytearray(4096) for _ in range(2000)]  # small blocks: from the thread's arena, not mmap
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    path = tempfile.mktemp()
    fp = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    heaps = open(path).read().count("<heap nr=")
    os.unlink(path)
    print(limited, again, heaps)
""")


def _run(mode: str, **env: str) -> tuple[str, str, int]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in {**os.environ, **env}.items() if v}, check=True)
    limited, again, heaps = done.stdout.split()
    return limited, again, int(heaps)


def test_a_run_uses_at_most_two_arenas_once_limited() -> None:
    assert _run("free", MALLOC_ARENA_MAX="")[2] > 2  # the threads spread over arenas of their own
    limited, again, heaps = _run("limit", MALLOC_ARENA_MAX="")
    assert (limited, again) == ("True", "False")  # set once
    assert heaps <= 2


def test_the_users_setting_wins() -> None:
    limited, _, heaps = _run("limit", MALLOC_ARENA_MAX="4")
    assert limited == "False" and 2 < heaps <= 4
