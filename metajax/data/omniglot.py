"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015) from Lake's zip files, decoded once and cached.

Files: ``images_background.zip`` (30 alphabets, 964 characters) and
``images_evaluation.zip`` (20 alphabets, 659 characters), 20 drawings of each
character, 105x105 1-bit PNGs, from https://github.com/brendenlake/omniglot
(folder ``python/``). Put them in ``<data root>/omniglot/``; the data root is
``data_dir``, else ``$METAJAX_DATA``, else ``~/.metajax/data`` (see
:mod:`metajax.data.paths`). The small subsets ``images_background_small1.zip``
and ``images_background_small2.zip`` load the same way (``parts=("small1",)``).

Decoding reads each PNG straight from the zip (no extraction), converts it to
8-bit grey, resizes it with PIL's **Lanczos** filter by default
(``resample="bilinear"`` is the other choice), and by default inverts it so
that **strokes are 255 and the background 0** (as Finn et al.'s MAML and
learn2learn feed it; ``invert=False`` keeps Lake's white background). The
result is cached as an uncompressed ``.npz`` (:mod:`metajax.data.cache`,
~25 MB at 28x28) in the cache dir, so later loads take well under a second.
A cold decode of all 32,460 images runs on up to 2 cores (a worker script
plus this process).

Classes come in a fixed order: background then evaluation, each sorted by
alphabet then character folder, named ``'background/Greek/character01'``.
Splits (``lake``, ``vinyals``, ``maml``) are in :mod:`metajax.data.splits`.

Example (needs the files):
  >>> ds = load_omniglot("../shared/data")                  # doctest: +SKIP
  >>> ds.num_classes, ds.images.shape                       # doctest: +SKIP
  (1623, (1623, 20, 28, 28, 1))
  >>> train = omniglot_split(ds, "vinyals", "train", rotations=True)  # doctest: +SKIP
  >>> train.num_classes                                     # doctest: +SKIP
  4112
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from metajax.data import _png_worker
from metajax.data import cache as _cache
from metajax.data import paths as _paths
from metajax.data.class_dataset import ClassDataset
from metajax.data.errors import CorruptDatasetError, DatasetNotFoundError

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot (folder python/)"
OMNIGLOT_PARTS = {
    "background": "images_background.zip",
    "evaluation": "images_evaluation.zip",
    "small1": "images_background_small1.zip",
    "small2": "images_background_small2.zip",
}
DEFAULT_PARTS = ("background", "evaluation")
RESAMPLE_FILTERS = ("lanczos", "bilinear")
_MIN_IMAGES_FOR_WORKERS = 4000


def omniglot_dir(data_dir: Optional[_paths.PathLike] = None) -> Path:
    """The folder holding the Omniglot zips (``<data root>/omniglot``)."""
    return _paths.dataset_dir("omniglot", data_dir, markers=tuple(OMNIGLOT_PARTS.values()))


def _size2(image_size: Union[int, Sequence[int]]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any((not isinstance(s, (int, np.integer))) or s < 1 for s in size):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}.")
    return int(size[0]), int(size[1])


def _zip_paths(folder: Path, parts: Sequence[str]) -> dict[str, Path]:
    unknown = [p for p in parts if p not in OMNIGLOT_PARTS]
    if unknown or not parts:
        raise ValueError(f"unknown Omniglot parts {unknown or list(parts)}; choose from "
                         f"{list(OMNIGLOT_PARTS)}.")
    paths = {p: folder / OMNIGLOT_PARTS[p] for p in parts}
    missing = [str(path.name) for path in paths.values() if not path.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Omniglot file(s) {', '.join(missing)} not found in {folder}. Download "
            f"{', '.join(missing)} from {OMNIGLOT_URL} and put them (unextracted) in {folder}; "
            f"or pass data_dir=, or set {_paths.DATA_ENV} to a data root that holds an "
            "omniglot/ folder (e.g. METAJAX_DATA=../shared/data).")
    return paths


def _list_entries(zip_path: Path) -> list[tuple[str, str, str]]:
    """``(alphabet, character, entry name)`` of every PNG in an Omniglot zip, sorted."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CorruptDatasetError(
            f"{zip_path} is not a readable zip ({e}); the file is truncated or corrupt. Download "
            f"{zip_path.name} again from {OMNIGLOT_URL}.") from e
    entries = []
    for name in names:
        parts = name.split("/")
        if name.endswith(".png") and len(parts) == 4:
            entries.append((parts[1], parts[2], name))
    if not entries:
        raise CorruptDatasetError(
            f"{zip_path} holds no '<top>/<alphabet>/<character>/<file>.png' entries; it is not "
            f"an Omniglot zip. Download {zip_path.name} again from {OMNIGLOT_URL}.")
    return sorted(entries)


def _shard(jobs: list[tuple[str, list[str]]], num_shards: int) -> list[list[tuple[str, list[str]]]]:
    """Splits ``[(zip, entries), ...]`` into ``num_shards`` contiguous pieces of similar size."""
    flat = [(zp, name) for zp, names in jobs for name in names]
    bounds = np.linspace(0, len(flat), num_shards + 1).astype(int)
    shards = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        shard: list[tuple[str, list[str]]] = []
        for zp, name in flat[lo:hi]:
            if not shard or shard[-1][0] != zp:
                shard.append((zp, []))
            shard[-1][1].append(name)
        shards.append(shard)
    return shards


def _corrupt(message: str, zip_path: str) -> CorruptDatasetError:
    return CorruptDatasetError(f"{message}; the zip is corrupt or truncated. Download "
                               f"{os.path.basename(zip_path)} again from {OMNIGLOT_URL}.")


def _decode_all(jobs: list[tuple[str, list[str]]], size: tuple[int, int], resample: str,
                num_workers: int) -> np.ndarray:
    """Decodes all entries; with ``num_workers > 1`` the first shards go to worker scripts."""
    shards = _shard(jobs, max(1, num_workers))
    procs = []
    with tempfile.TemporaryDirectory(prefix="metajax-decode-") as tmp:
        for i, shard in enumerate(shards[:-1]):
            out = os.path.join(tmp, f"shard{i}.npy")
            proc = subprocess.Popen([sys.executable, _png_worker.__file__], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            proc.stdin.write(json.dumps({"jobs": shard, "size": list(size),
                                         "resample": resample, "out": out}))
            proc.stdin.close()
            procs.append((proc, out, shard))
        try:
            last = _png_worker.decode_jobs(shards[-1], size, resample)
        except _png_worker.DecodeError as e:
            for proc, _, _ in procs:
                proc.kill()
                proc.wait()
            raise _corrupt(str(e), shards[-1][0][0]) from e
        parts = []
        for proc, out, shard in procs:
            err = proc.stderr.read()
            if proc.wait() != 0:
                raise _corrupt(err.strip().splitlines()[-1] if err.strip() else
                               f"decode worker failed (exit {proc.returncode})", shard[0][0])
            parts.append(np.load(out))
    return np.concatenate(parts + [last], axis=0)


def _default_workers(num_images: int) -> int:
    if num_images < _MIN_IMAGES_FOR_WORKERS:
        return 1
    return min(2, os.cpu_count() or 1)


def decode_omniglot(zips: dict[str, Path], image_size: tuple[int, int], resample: str,
                    num_workers: Optional[int] = None) -> tuple[np.ndarray, list[str]]:
    """Decodes the given Omniglot zips: ``(classes, 20, H, W)`` uint8, ink 255, and class names."""
    jobs, labels, class_names = [], [], []
    for part, zip_path in zips.items():
        entries = _list_entries(zip_path)
        names = []
        for alphabet, character, name in entries:
            cls = f"{part}/{alphabet}/{character}"
            if not class_names or class_names[-1] != cls:
                class_names.append(cls)
            labels.append(len(class_names) - 1)
            names.append(name)
        jobs.append((str(zip_path), names))
    workers = _default_workers(len(labels)) if num_workers is None else num_workers
    flat = _decode_all(jobs, image_size, resample, workers)
    np.subtract(255, flat, out=flat)  # ink high
    ds = ClassDataset.from_labeled(flat, np.asarray(labels), class_names)
    return ds.images[..., 0], class_names


def load_omniglot(data_dir: Optional[_paths.PathLike] = None, *,
                  image_size: Union[int, Sequence[int]] = 28, resample: str = "lanczos",
                  invert: bool = True, parts: Sequence[str] = DEFAULT_PARTS,
                  cache_dir: Optional[_paths.PathLike] = None, use_cache: bool = True,
                  on_cache_mismatch: str = "rebuild",
                  num_workers: Optional[int] = None) -> ClassDataset:
    """Loads Omniglot as a :class:`ClassDataset` of shape ``(1623, 20, H, W, 1)`` uint8.

    Args:
      data_dir: the ``omniglot`` folder or a data root holding it (default:
        ``$METAJAX_DATA``, else ``~/.metajax/data``).
      image_size: output size, an int (square) or ``(height, width)``; 105 keeps
        the original resolution.
      resample: PIL filter for resizing, ``"lanczos"`` (default) or ``"bilinear"``.
      invert: strokes 255 on a 0 background (default); ``False`` gives Lake's
        dark strokes on white.
      parts: which zips, in order: ``"background"``, ``"evaluation"``,
        ``"small1"``, ``"small2"``.
      cache_dir: where the decoded ``.npz`` goes (default: ``$METAJAX_CACHE``,
        else ``<omniglot dir>/cache`` if writable, else ``~/.cache/metajax``).
      use_cache: ``False`` decodes without reading or writing a cache.
      on_cache_mismatch: ``"rebuild"`` (default) re-decodes when the cache was
        made from other files or by another cache format version (with a
        warning); ``"error"`` raises :class:`~metajax.data.errors.CacheError`.
      num_workers: decode processes incl. this one (default: 2 for big decodes
        on a multi-core machine, else 1 = in-process).

    Raises:
      DatasetNotFoundError: a zip is missing (the message says where to get it).
      CorruptDatasetError: a zip is truncated or corrupt.
    """
    size = _size2(image_size)
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"resample must be one of {RESAMPLE_FILTERS}, got {resample!r}.")
    folder = omniglot_dir(data_dir)
    zips = _zip_paths(folder, tuple(parts))
    expected = {"dataset": "omniglot", "parts": list(parts), "image_size": list(size),
                "resample": resample, "ink": "high",
                "sources": _cache.file_fingerprint(list(zips.values()))}
    cache_file = (_paths.cache_dir(folder, cache_dir) /
                  f"omniglot-{'+'.join(parts)}-{size[0]}x{size[1]}-{resample}.npz")
    cached = _cache.load_cached(cache_file, expected, on_cache_mismatch) if use_cache else None
    if cached is not None:
        images, class_names = cached[0]["images"], [str(n) for n in cached[0]["class_names"]]
    else:
        images, class_names = decode_omniglot(zips, size, resample, num_workers)
        if use_cache:
            _cache.write_array_cache(cache_file, {"images": images,
                                                  "class_names": np.array(class_names)}, expected)
    if not invert:
        images = 255 - images
    counts = np.full((images.shape[0],), images.shape[1], np.int32)
    return ClassDataset(images[..., None], counts, tuple(class_names))


def omniglot_split(dataset: ClassDataset, split: str = "vinyals", subset: str = "train", *,
                   rotations: bool = False, seed: int = 0) -> ClassDataset:
    """The classes of one subset of a named split of a full Omniglot :class:`ClassDataset`.

    ``split`` is ``"lake"``, ``"vinyals"`` or ``"maml"`` (see
    :mod:`metajax.data.splits` for the definitions and sources); ``rotations=True``
    adds the 90/180/270 degree rotations as new classes (4x classes).
    """
    from metajax.data.splits import omniglot_split_indices

    indices = omniglot_split_indices(dataset.class_names, split, subset, seed=seed)
    return dataset.select(indices).with_rotations(rotations)
