"""Where datasets and caches live on disk.

Data root resolution (first match wins):

1. an explicit ``data_dir`` argument: either the dataset folder itself
   (``.../omniglot``) or a data root holding one folder per dataset;
2. the ``METAJAX_DATA`` environment variable, naming a data root (so
   ``METAJAX_DATA=../shared/data`` finds ``../shared/data/omniglot``);
3. the default root ``~/.metajax/data`` (:data:`DEFAULT_DATA_ROOT`).

Cache resolution: an explicit ``cache_dir``; else ``METAJAX_CACHE``; else
``<dataset dir>/cache`` when the dataset folder is writable; else
``~/.cache/metajax`` (:data:`DEFAULT_CACHE_DIR`).

Example:
  >>> import os, tempfile
  >>> root = tempfile.mkdtemp(); os.makedirs(os.path.join(root, "omniglot"))
  >>> str(dataset_dir("omniglot", root)) == os.path.join(root, "omniglot")
  True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

DATA_ENV = "METAJAX_DATA"
CACHE_ENV = "METAJAX_CACHE"
DEFAULT_DATA_ROOT = Path("~/.metajax/data")
DEFAULT_CACHE_DIR = Path("~/.cache/metajax")


def data_root(data_dir: Optional[PathLike] = None) -> Path:
    """The data root: ``data_dir``, else ``$METAJAX_DATA``, else ``~/.metajax/data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return DEFAULT_DATA_ROOT.expanduser()


def dataset_dir(name: str, data_dir: Optional[PathLike] = None,
                markers: Sequence[str] = ()) -> Path:
    """The folder of dataset ``name``: ``<root>/<name>``.

    ``data_dir`` may also name the dataset folder itself: when its last
    component is ``name`` or it directly holds one of the ``markers`` files.
    """
    root = data_root(data_dir)
    if data_dir is not None and (root.name == name or any((root / m).exists() for m in markers)):
        return root
    return root / name


def cache_dir(dataset_folder: PathLike, cache_dir: Optional[PathLike] = None) -> Path:
    """Where to write the decoded-array cache of a dataset (see the module docstring)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    folder = Path(dataset_folder)
    if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK):
        cache = folder / "cache"
        if not cache.exists() or os.access(cache, os.W_OK | os.X_OK):
            return cache
    return DEFAULT_CACHE_DIR.expanduser()
