"""A persistent XLA compilation cache for training scripts and notebooks.

Compiling the second-order Conv4 MAML step on CPU takes 10-15 s, and XLA's code
generation is also the memory peak of a CPU run: about 380 MiB of transient
allocations on top of the ~350 MiB the process holds before it
(``benchmarks/maml_step.py`` prints both). With the cache, a rerun with the same
program, shapes, flags and jax version loads the compiled executable from disk
instead: well under a second, and no compile-time peak.

The cache holds executable code, so it must be trusted: it is created private to the
user (mode ``0700``); never point it at a folder others can write to.

Example:
  >>> import tempfile, jax, jax.numpy as jnp
  >>> path = enable_compilation_cache(tempfile.mkdtemp())
  >>> float(jax.jit(lambda x: x * 2)(jnp.ones(())))
  2.0
  >>> disable_compilation_cache()
"""

from __future__ import annotations

import os
from typing import Optional

import jax
from jax.experimental.compilation_cache import compilation_cache as _jax_cache

DISABLED = ("off", "none", "")


def default_compilation_cache_dir() -> str:
    """``$METAJAX_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/metajax/xla`` (``~/.cache/metajax/xla``).

    ``METAJAX_COMPILE_CACHE=off`` turns the scripts' default cache off (the tests do that).
    """
    if os.environ.get("METAJAX_COMPILE_CACHE") is not None:
        return os.path.expanduser(os.environ["METAJAX_COMPILE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "metajax", "xla")


def enable_compilation_cache(cache_dir: Optional[str] = None, *,
                             min_compile_time_s: float = 1.0) -> str:
    """Stores every compile that took at least ``min_compile_time_s`` in ``cache_dir`` and
    loads it from there on later runs. Returns the absolute cache folder.

    Call it before the first ``jit`` whose compile should be cached (it is process-wide
    JAX configuration). ``cache_dir=None`` uses :func:`default_compilation_cache_dir`.
    The cache key covers the program, shapes, compile options, XLA flags and the
    jax/jaxlib versions, so a stale entry is never loaded for a changed program.
    """
    if min_compile_time_s < 0:
        raise ValueError(f"min_compile_time_s must be >= 0 seconds, got {min_compile_time_s}.")
    path = os.path.abspath(os.path.expanduser(cache_dir or default_compilation_cache_dir()))
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the compilation cache folder {path!r} ({err}); pass a "
                         f"writable folder, or 'off' to compile without a cache.") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"the compilation cache folder {path!r} is not writable; pass a writable "
                         f"folder, or 'off' to compile without a cache.")
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    _jax_cache.set_cache_dir(path)
    _jax_cache.reset_cache()  # re-initialise on the next compile, in case another folder was in use
    return path


def disable_compilation_cache() -> None:
    """Compiles without the persistent cache from now on (the files stay on disk)."""
    jax.config.update("jax_enable_compilation_cache", False)
    _jax_cache.reset_cache()


def configure_compilation_cache(setting: Optional[str]) -> Optional[str]:
    """The ``--compile-cache`` flag of the experiment scripts: ``"off"`` (or ``"none"``)
    disables the cache, ``None`` or ``"default"`` uses :func:`default_compilation_cache_dir`
    (which may itself be ``"off"``), anything else is the folder. Returns the folder in use,
    or ``None`` when disabled."""
    folder = default_compilation_cache_dir() if setting in (None, "default") else setting
    if folder.strip().lower() in DISABLED:
        disable_compilation_cache()
        return None
    return enable_compilation_cache(folder)
