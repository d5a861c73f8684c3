"""The C allocator of the process: glibc settings for a lower peak RSS.

glibc gives each thread that allocates concurrently its own malloc arena (up to 8 per core),
and memory freed in one arena is not reused by another. XLA compiles and runs on thread pools,
so a Conv4 MAML compile leaves freed memory spread over many arenas and the process's peak
resident size grows by it. One arena removes that: on the 2-core machine it lowered the peak
RSS of ``benchmarks/maml_step.py`` by 50-110 MiB (README "Malloc arenas"). glibc also raises
its mmap threshold each time a large mmapped block is freed, after which such blocks come
from the heap and stay there: a fixed threshold (:func:`fix_malloc_mmap_threshold`) stops the
peak creeping up over the training steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_ARENA_MAX = -8  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


def limit_malloc_arenas(count: int = 1) -> bool:
    """Caps glibc's malloc arenas at ``count`` for threads that start allocating later.

    The same as starting the process with ``MALLOC_ARENA_MAX=count``, from inside it: call it
    first thing, before JAX runs its first computation (its thread pools start then), as
    ``benchmarks/maml_step.py --malloc-arenas 1`` and ``experiments/omniglot.py
    --malloc-arenas 1`` do. Threads that already have an arena keep it.

    Args:
      count: the most arenas glibc may create (1: every thread shares the main one).

    Returns:
      True if glibc took the setting; False where the C library is not glibc (macOS, musl),
      which have no such arenas: nothing changes there.

    Raises:
      ValueError: ``count`` is not a positive int.

      >>> import metajax as mj
      >>> mj.limit_malloc_arenas(0)
      Traceback (most recent call last):
      ...
      ValueError: limit_malloc_arenas needs a positive int count, got 0.
    """
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"limit_malloc_arenas needs a positive int count, got {count!r}.")
    return _mallopt(_M_ARENA_MAX, count)


def fix_malloc_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serves every allocation of ``nbytes`` or more by its own mmap, from now on.

    glibc starts at 128 KiB and raises the threshold to the size of each mmapped block freed
    (up to 32 MiB), so after a few steps XLA's large buffers come from the heap, whose freed
    space the process keeps: the peak RSS grows over tens of steps although the live memory
    does not. A fixed threshold returns them to the system on free (the same as starting
    with ``MALLOC_MMAP_THRESHOLD_=nbytes``). Measured on the Conv4 step: peak RSS of config
    (c) 412 instead of 437-510 MiB; step time within 1-4% (README "Malloc arenas").

    Args:
      nbytes: the threshold in bytes, from 4096 to 32 MiB (glibc's maximum on 64 bits).

    Returns:
      True if glibc took the setting; False where the C library is not glibc.

    Raises:
      ValueError: ``nbytes`` is not an int in that range.

      >>> import metajax as mj
      >>> mj.fix_malloc_mmap_threshold(64 << 20)
      Traceback (most recent call last):
      ...
      ValueError: fix_malloc_mmap_threshold needs an int from 4096 to 33554432 bytes, got 67108864.
    """
    if (not isinstance(nbytes, int) or isinstance(nbytes, bool)
            or not 4096 <= nbytes <= _MMAP_THRESHOLD_MAX):
        raise ValueError(f"fix_malloc_mmap_threshold needs an int from 4096 to "
                         f"{_MMAP_THRESHOLD_MAX} bytes, got {nbytes!r}.")
    return _mallopt(_M_MMAP_THRESHOLD, nbytes)


def configure_malloc(arenas: int = 0, mmap_threshold_mib: int = 0) -> None:
    """Both settings at once, 0 leaving either at glibc's default; checks both before either.

    What ``--malloc-arenas`` and ``--malloc-mmap-threshold-mib`` of
    ``benchmarks/maml_step.py`` and ``experiments/omniglot.py`` call, before JAX runs.

    Raises:
      ValueError: ``arenas`` is negative, or ``mmap_threshold_mib`` is outside 0-32.

      >>> import metajax as mj
      >>> mj.configure_malloc(mmap_threshold_mib=64)
      Traceback (most recent call last):
      ...
      ValueError: malloc mmap threshold (--malloc-mmap-threshold-mib) must be 0 (glibc's default) or 1-32 MiB, got 64.
    """
    if not isinstance(arenas, int) or isinstance(arenas, bool) or arenas < 0:
        raise ValueError(f"malloc arenas (--malloc-arenas) must be 0 (glibc's default) or a "
                         f"positive count, got {arenas!r}.")
    if (not isinstance(mmap_threshold_mib, int) or isinstance(mmap_threshold_mib, bool)
            or not 0 <= mmap_threshold_mib <= _MMAP_THRESHOLD_MAX >> 20):
        raise ValueError(f"malloc mmap threshold (--malloc-mmap-threshold-mib) must be 0 (glibc's "
                         f"default) or 1-{_MMAP_THRESHOLD_MAX >> 20} MiB, got {mmap_threshold_mib!r}.")
    if arenas:
        limit_malloc_arenas(arenas)
    if mmap_threshold_mib:
        fix_malloc_mmap_threshold(mmap_threshold_mib << 20)


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl has mallopt as a no-op stub
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(param, value) == 1
