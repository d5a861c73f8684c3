"""The C allocator of the process: fewer glibc malloc arenas for a lower peak RSS.

glibc gives each thread that allocates concurrently its own malloc arena (up to 8 per core),
and memory freed in one arena is not reused by another. XLA compiles and runs on thread pools,
so a Conv4 MAML compile leaves freed memory spread over many arenas and the process's peak
resident size grows by it. One arena removes that: on the 2-core machine it lowered the peak
RSS of ``benchmarks/maml_step.py`` by 50-110 MiB (README "Malloc arenas").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


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
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl has mallopt as a no-op stub
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(_M_ARENA_MAX, count) == 1
