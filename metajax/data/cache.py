"""A compact on-disk cache of decoded uint8 arrays with a small JSON header.

A cache file is an uncompressed ``.npz`` holding the arrays plus ``__header__``:
a JSON string with ``format_version`` (:data:`CACHE_FORMAT_VERSION`) and
whatever describes how the arrays were made (source file sizes and mtimes,
image size, resampling filter, ...). A reader compares the header with what
it expects; any difference means the cache is stale, and the loader rebuilds it
(or, with ``on_mismatch="error"``, raises :class:`CacheError` naming the
difference). Writes are atomic (temporary file + rename), so an interrupted
decode never leaves a half-written cache behind.

Example:
  >>> import tempfile, numpy as np
  >>> path = tempfile.mkdtemp() + "/demo.npz"
  >>> write_array_cache(path, {"x": np.arange(3, dtype=np.uint8)}, {"size": 3})
  >>> arrays, header = read_array_cache(path)
  >>> arrays["x"].tolist(), header["size"], header["format_version"] == CACHE_FORMAT_VERSION
  ([0, 1, 2], 3, True)
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from metajax.data.errors import CacheError
from metajax.data.paths import PathLike

CACHE_FORMAT_VERSION = 1
_HEADER_KEY = "__header__"


def file_fingerprint(paths: Sequence[PathLike]) -> dict[str, dict[str, int]]:
    """``{basename: {"size": bytes, "mtime_ns": ...}}``: cheap identity of source files."""
    out = {}
    for p in paths:
        st = os.stat(p)
        out[Path(p).name] = {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
    return out


def write_array_cache(path: PathLike, arrays: Mapping[str, np.ndarray],
                      header: Mapping[str, Any]) -> None:
    """Atomically writes ``arrays`` and a JSON ``header`` (format version added) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full_header = {"format_version": CACHE_FORMAT_VERSION, **header}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{_HEADER_KEY: np.array(json.dumps(full_header, sort_keys=True))},
                     **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_array_cache(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads a cache written by :func:`write_array_cache`.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      CacheError: if the file is not a readable cache (truncated, foreign, ...).
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(str(npz[_HEADER_KEY]))
            arrays = {k: npz[k] for k in npz.files if k != _HEADER_KEY}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise CacheError(f"cache file {path} is unreadable ({type(e).__name__}: {e}); delete it "
                         "and it will be rebuilt from the source files.") from e
    return arrays, header


def header_mismatch(header: Mapping[str, Any], expected: Mapping[str, Any]) -> Optional[str]:
    """Why ``header`` does not match ``expected`` (plus the format version), or ``None``."""
    want = {"format_version": CACHE_FORMAT_VERSION, **expected}
    for key, value in want.items():
        # Round-trip through JSON so tuples compare equal to the lists read back.
        value = json.loads(json.dumps(value))
        if header.get(key) != value:
            if key == "format_version":
                return (f"it was written by cache format version {header.get(key)!r}, this "
                        f"metajax reads version {CACHE_FORMAT_VERSION}")
            return f"its {key!r} is {header.get(key)!r}, expected {value!r}"
    return None


def load_cached(path: PathLike, expected: Mapping[str, Any], on_mismatch: str = "rebuild"
                ) -> Optional[tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """The cached arrays if ``path`` holds a cache matching ``expected``, else ``None``.

    ``on_mismatch="error"`` raises :class:`CacheError` for a stale or unreadable cache
    instead of returning ``None`` (which tells the caller to rebuild).
    """
    if on_mismatch not in ("rebuild", "error"):
        raise ValueError(f"on_mismatch must be 'rebuild' or 'error', got {on_mismatch!r}.")
    if not os.path.exists(path):
        return None
    try:
        arrays, header = read_array_cache(path)
    except CacheError as e:
        if on_mismatch == "error":
            raise
        warnings.warn(f"rebuilding the cache: {e}", stacklevel=2)
        return None
    reason = header_mismatch(header, expected)
    if reason is None:
        return arrays, header
    if on_mismatch == "error":
        raise CacheError(f"cache {path} does not match: {reason}. Delete the file (or pass "
                         "on_mismatch='rebuild') to rebuild it from the source files.")
    warnings.warn(f"rebuilding the cache {path}: {reason}.", stacklevel=2)
    return None
