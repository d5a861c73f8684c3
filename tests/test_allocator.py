"""metajax.limit_malloc_arenas and fix_malloc_mmap_threshold: the glibc settings take effect."""

import os
import subprocess
import sys
import textwrap

import pytest

import metajax as mj

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc arenas are Linux")

# The children see no MALLOC_* settings from the environment, so their defaults are glibc's.
_ENV = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

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
                          timeout=120, env=_ENV)
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


# A 4 MiB block is mmapped, freed (glibc then raises its threshold to 4 MiB), and allocated
# again: from the heap by default, by a fresh mmap under a fixed 1 MiB threshold. mallinfo2's
# hblks counts the live mmapped blocks.
_MMAP_CHILD = textwrap.dedent("""
    import ctypes, sys
    import metajax as mj
    libc = ctypes.CDLL("libc.so.6")
    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    if sys.argv[1] == "fixed":
        assert mj.fix_malloc_mmap_threshold(1 << 20)
    libc.free(libc.malloc(4 << 20))
    before = libc.mallinfo2().hblks
    block = libc.malloc(4 << 20)
    print(libc.mallinfo2().hblks - before)
    libc.free(block)
""")


def _mmapped_after_reuse(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", _MMAP_CHILD, mode], capture_output=True,
                          text=True, timeout=120, env=_ENV)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


@glibc
def test_fixed_mmap_threshold_keeps_large_blocks_out_of_the_heap():
    assert _mmapped_after_reuse("default") == 0  # glibc's dynamic threshold: from the heap
    assert _mmapped_after_reuse("fixed") == 1


@pytest.mark.parametrize("nbytes", [0, 4095, (32 << 20) + 1, 1.5, True])
def test_bad_mmap_threshold_is_rejected(nbytes):
    with pytest.raises(ValueError, match="fix_malloc_mmap_threshold needs an int"):
        mj.fix_malloc_mmap_threshold(nbytes)
