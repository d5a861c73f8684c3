"""mini-ImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 splits) from files you provide.

mini-ImageNet cannot be downloaded automatically (ImageNet's terms), so this
reader takes the two common layouts, in ``<data root>/miniimagenet/`` (data root
= ``data_dir``, else ``$METAJAX_DATA``, else ``~/.metajax/data``):

**Pickles** (as distributed for learn2learn and others):
``mini-imagenet-cache-{train,val,test}.pkl``, each a dict with ``image_data``
uint8 ``(N, 84, 84, 3)`` and ``class_dict`` ``{class name: [row indices]}``.
Pickles can run code when loaded: only read files you trust.

**Images + Ravi & Larochelle csv files**: ``{train,val,test}.csv`` with a
header ``filename,label`` and one row per image, and the images in
``images/<filename>`` (or ``images/<label>/<filename>``). Images are read with
PIL, converted to RGB and resized to ``image_size`` (bilinear; 84x84 by
default, a no-op for the usual pre-resized files). The decoded arrays are
cached like Omniglot's (:mod:`metajax.data.cache`).

Either way the result is a :class:`~metajax.data.class_dataset.ClassDataset`
with classes sorted by name and examples in file order (600 per class in the
standard splits: 64 / 16 / 20 classes).

Example (needs the files):
  >>> train = load_miniimagenet("/data", "train")          # doctest: +SKIP
  >>> train.images.shape                                    # doctest: +SKIP
  (64, 600, 84, 84, 3)
"""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from metajax.data import cache as _cache
from metajax.data import paths as _paths
from metajax.data.class_dataset import ClassDataset
from metajax.data.errors import CorruptDatasetError, DatasetNotFoundError, UnknownSplitError

SPLITS = ("train", "val", "test")
PICKLE_NAME = "mini-imagenet-cache-{split}.pkl"
CSV_NAME = "{split}.csv"


def miniimagenet_dir(data_dir: Optional[_paths.PathLike] = None) -> Path:
    """The folder holding the mini-ImageNet files (``<data root>/miniimagenet``)."""
    markers = [PICKLE_NAME.format(split=s) for s in SPLITS] + [CSV_NAME.format(split=s)
                                                               for s in SPLITS]
    return _paths.dataset_dir("miniimagenet", data_dir, markers=markers)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UnknownSplitError(f"unknown mini-ImageNet split {split!r}; valid splits are "
                                f"{list(SPLITS)}.")


def read_miniimagenet_pickle(path: _paths.PathLike) -> ClassDataset:
    """A :class:`ClassDataset` from one ``image_data`` / ``class_dict`` pickle (trusted files only)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise CorruptDatasetError(f"{path} is not a readable pickle ({type(e).__name__}: {e}); "
                                  "the file is truncated or corrupt: copy it again.") from e
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CorruptDatasetError(f"{path} holds {keys}; expected a dict with 'image_data' "
                                  "(N, H, W, 3) uint8 and 'class_dict' {class: [indices]}.")
    images = np.asarray(data["image_data"])
    if images.dtype != np.uint8 or images.ndim != 4:
        raise CorruptDatasetError(f"{path}: image_data is {images.dtype} {images.shape}; expected "
                                  "uint8 (N, H, W, 3).")
    names = sorted(data["class_dict"])
    per_class = []
    for name in names:
        idx = np.asarray(data["class_dict"][name], dtype=np.int64)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= len(images):
            raise CorruptDatasetError(f"{path}: class {name!r} has indices outside "
                                      f"[0, {len(images)}) or none at all.")
        per_class.append(images[idx])
    return ClassDataset.from_class_lists(per_class, names)


def read_split_csv(path: _paths.PathLike) -> dict[str, list[str]]:
    """``{label: [filename, ...]}`` from a Ravi & Larochelle ``filename,label`` csv file."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise CorruptDatasetError(f"{path} must start with the header 'filename,label' (Ravi & "
                                  f"Larochelle's split files); it starts with {rows[:1]}.")
    by_label: dict[str, list[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise CorruptDatasetError(f"{path}:{line}: expected 'filename,label', got {row}.")
        by_label.setdefault(row[1].strip(), []).append(row[0].strip())
    return by_label


def _image_path(folder: Path, label: str, filename: str) -> Path:
    for candidate in (folder / "images" / filename, folder / "images" / label / filename):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(
        f"image {filename} (class {label}) listed in the split csv is missing: expected "
        f"{folder / 'images' / filename} or {folder / 'images' / label / filename}. Put all "
        "mini-ImageNet images in the images/ folder next to the csv files.")


def _read_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(im)
    except OSError as e:
        raise CorruptDatasetError(f"cannot decode {path} ({e}); replace the file.") from e


def read_miniimagenet_csv(folder: _paths.PathLike, split: str,
                          image_size: Union[int, Sequence[int]] = 84) -> ClassDataset:
    """Decodes the images of one Ravi & Larochelle csv split (no cache)."""
    folder = Path(folder)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    by_label = read_split_csv(folder / CSV_NAME.format(split=split))
    names = sorted(by_label)
    per_class = [np.stack([_read_image(_image_path(folder, label, f), size)
                           for f in by_label[label]]) for label in names]
    return ClassDataset.from_class_lists(per_class, names)


def _missing(folder: Path, split: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"no mini-ImageNet {split!r} split in {folder}. Provide either "
        f"{PICKLE_NAME.format(split=split)} (a pickle with 'image_data' and 'class_dict') or "
        f"{CSV_NAME.format(split=split)} (Ravi & Larochelle's 'filename,label' split file) "
        f"with the images in {folder / 'images'}; or pass data_dir=, or set "
        f"{_paths.DATA_ENV} to a data root holding a miniimagenet/ folder.")


def load_miniimagenet(data_dir: Optional[_paths.PathLike] = None, split: str = "train", *,
                      image_size: Union[int, Sequence[int]] = 84,
                      cache_dir: Optional[_paths.PathLike] = None, use_cache: bool = True,
                      on_cache_mismatch: str = "rebuild") -> ClassDataset:
    """Loads one mini-ImageNet split from the pickle or the csv + images layout.

    The pickle wins when both are present. ``image_size``, ``cache_dir``,
    ``use_cache`` and ``on_cache_mismatch`` apply to the csv + images layout
    (see :func:`metajax.data.omniglot.load_omniglot` for their meaning).

    Raises:
      UnknownSplitError: ``split`` is not train/val/test.
      DatasetNotFoundError: neither layout is there (the message says what to provide).
      CorruptDatasetError: a file cannot be read.
    """
    _check_split(split)
    folder = miniimagenet_dir(data_dir)
    pkl = folder / PICKLE_NAME.format(split=split)
    if pkl.is_file():
        return read_miniimagenet_pickle(pkl)
    csv_path = folder / CSV_NAME.format(split=split)
    if not csv_path.is_file():
        raise _missing(folder, split)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if not use_cache:
        return read_miniimagenet_csv(folder, split, size)
    images_dir = folder / "images"
    expected = {"dataset": "miniimagenet", "split": split, "image_size": list(size),
                "sources": _cache.file_fingerprint([csv_path]),
                "images_mtime_ns": os.stat(images_dir).st_mtime_ns if images_dir.exists() else 0}
    cache_file = (_paths.cache_dir(folder, cache_dir) /
                  f"miniimagenet-{split}-{size[0]}x{size[1]}.npz")
    cached = _cache.load_cached(cache_file, expected, on_cache_mismatch)
    if cached is not None:
        arrays = cached[0]
        return ClassDataset(arrays["images"], arrays["counts"],
                            tuple(str(n) for n in arrays["class_names"]))
    ds = read_miniimagenet_csv(folder, split, size)
    _cache.write_array_cache(cache_file, {"images": ds.images, "counts": ds.counts,
                                          "class_names": np.array(ds.class_names)}, expected)
    return ds
