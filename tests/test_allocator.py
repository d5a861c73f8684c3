"""metajax.limit_malloc_arenas: the glibc arena cap takes effect for threads started later."""

import subprocess
import sys
import textwrap

import pytest

import metajax as mj

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc arenas are Linux")

# Four threads allocate at once (malloc'd bytearrays, above pymalloc's 512-byte limit), then
# glibc's malloc_stats() prints one "Arena N:" block per arena to stderr.
_CHILD = textwrap.dedent("""
    import ctypes, sys, threading
    import metajax as mj
    if sys.argv[1] == "limit":
        assert mj.limit_malloc_arenas(1)
    barrier = threading.Barrier(4)
    def work():
        barrier.wait()
        keep = [bytearray(4096) for _ in range(2000)]
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    ctypes.CDLL("libc.so.6").malloc_stats()
""")


def _arenas(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return sum(line.startswith("Arena ") for line in proc.stderr.splitlines())


@glibc
def test_one_arena_for_all_threads():
    assert _arenas("default") > 1  # the test can fail: without the cap threads get their own
    assert _arenas("limit") == 1


@pytest.mark.parametrize("count", [0, -1, 1.5, True, "1"])
def test_bad_count_is_rejected(count):
    with pytest.raises(ValueError, match="positive int count"):
        mj.limit_malloc_arenas(count)
