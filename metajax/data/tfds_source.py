"""Any TFDS image-classification split as class-indexed arrays; CIFAR-FS, FC100, Omniglot via TFDS.

Needs ``tensorflow-datasets`` and ``array_record`` (the ``data`` extra), **not**
TensorFlow: datasets are read with ``tfds.data_source``, which serves datasets
prepared with ``file_format="array_record"`` and decodes images with PIL.
Preparing a dataset (``download_and_prepare``) is the user's step, done once,
online, and for most builders it needs TensorFlow (``pip install tensorflow-cpu``)::

    import tensorflow_datasets as tfds
    tfds.builder("cifar100", data_dir=DIR, file_format="array_record").download_and_prepare()

A dataset already prepared in the default ``tfrecord`` format is read with
``tfds.load`` instead, which needs TensorFlow; without it the error says so.

CIFAR-FS and FC100 use all 600 images of each class (CIFAR-100's ``train`` and
``test`` splits together), with the class lists of :mod:`metajax.data.splits`.

Example (needs a prepared TFDS data dir):
  >>> train = load_cifar_fs("train", data_dir="~/tensorflow_datasets")  # doctest: +SKIP
  >>> train.images.shape                                               # doctest: +SKIP
  (64, 600, 32, 32, 3)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from metajax.data.class_dataset import ClassDataset
from metajax.data.errors import DatasetNotFoundError, UnknownSplitError
from metajax.data.splits import cifar_fs_classes, fc100_classes

_PREPARE_HINT = ("prepare it once (online; most builders need TensorFlow: pip install "
                 "tensorflow-cpu) with tfds.builder({name!r}, data_dir={data_dir!r}, "
                 "file_format='array_record').download_and_prepare()")


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("reading TFDS datasets needs tensorflow-datasets and array_record: "
                          "pip install 'metajax[data]' (TensorFlow is not required).") from e
    return tfds


def _tf_available() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def _read_records_tfrecord(tfds, name: str, split: str, data_dir) -> Iterable[dict]:
    ds = tfds.load(name, split=split, data_dir=data_dir, download=False)
    return tfds.as_numpy(ds)


def read_tfds_records(name: str, splits: Sequence[str], data_dir: Optional[Union[str, Path]] = None
                      ) -> tuple[list[dict], Any]:
    """All records of ``splits`` of a prepared TFDS dataset, as numpy dicts, plus its features.

    Raises:
      DatasetNotFoundError: the dataset is not prepared in ``data_dir``.
      UnknownSplitError: a split does not exist (the message lists the valid ones).
    """
    tfds = _import_tfds()
    data_dir = None if data_dir is None else os.path.expanduser(str(data_dir))
    shown = data_dir or "the TFDS default data dir"
    try:
        sources = tfds.data_source(name, data_dir=data_dir, download=False)
        info = next(iter(sources.values())).dataset_info if sources else None
    except NotImplementedError as e:
        prepared = data_dir and any(Path(data_dir, name).glob("**/dataset_info.json"))
        if not prepared:
            raise DatasetNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {shown}; "
                + _PREPARE_HINT.format(name=name, data_dir=data_dir)) from e
        if not _tf_available():
            raise DatasetNotFoundError(
                f"TFDS dataset {name!r} in {shown} was prepared as tfrecord files, which only "
                "TensorFlow can read: pip install tensorflow-cpu, or prepare it again with "
                "file_format='array_record'.") from e
        sources, info = None, tfds.builder(name, data_dir=data_dir).info
    except Exception as e:  # tfds raises assorted errors for unknown names / missing dirs
        if type(e).__name__ in ("DatasetNotFoundError", "DatasetVariantBlockedError"):
            raise DatasetNotFoundError(f"TFDS dataset {name!r} not found in {shown}: {e}") from e
        raise
    available = list(sources) if sources is not None else list(info.splits)
    unknown = [s for s in splits if s not in available]
    if unknown:
        raise UnknownSplitError(f"TFDS dataset {name!r} has no split {unknown[0]!r}; valid "
                                f"splits are {sorted(available)}.")
    records: list[dict] = []
    for split in splits:
        if sources is None:
            records.extend(_read_records_tfrecord(tfds, name, split, data_dir))
        else:
            src = sources[split]
            for lo in range(0, len(src), 1024):
                records.extend(src.__getitems__(list(range(lo, min(lo + 1024, len(src))))))
    return records, info.features


def tfds_class_dataset(name: str, splits: Union[str, Sequence[str]] = "train", *,
                       data_dir: Optional[Union[str, Path]] = None, image_key: str = "image",
                       label_key: str = "label", classes: Optional[Sequence[str]] = None,
                       transform: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                       class_name_fn: Optional[Callable[[dict, Any], str]] = None
                       ) -> ClassDataset:
    """Turns TFDS image-classification splits into a :class:`ClassDataset`.

    Args:
      name: the TFDS dataset name, e.g. ``"cifar100"``.
      splits: one split name or several, concatenated (e.g. ``("train", "test")``).
      data_dir: the TFDS data dir (default: TFDS's own default).
      image_key, label_key: the feature names of the image and the class label.
      classes: keep only these class names, in this order (default: every class
        present, in label order, or sorted by name with ``class_name_fn``).
      transform: applied to each uint8 ``(H, W, C)`` image (e.g. resize); returns uint8.
      class_name_fn: ``(record, features) -> class name`` (default: the label's
        ClassLabel name).

    Example (needs a prepared data dir):
      >>> ds = tfds_class_dataset("cifar100", ("train", "test"))   # doctest: +SKIP
      >>> ds.images.shape                                          # doctest: +SKIP
      (100, 600, 32, 32, 3)
    """
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    records, features = read_tfds_records(name, splits, data_dir)
    if not records:
        raise DatasetNotFoundError(f"TFDS dataset {name!r} splits {splits} hold no records.")
    for key in (image_key,) + (() if class_name_fn else (label_key,)):
        if key not in records[0]:
            raise KeyError(f"TFDS dataset {name!r} has no feature {key!r}; its features are "
                           f"{sorted(records[0])}.")
    if class_name_fn is None:
        label_names = features[label_key].names
        names = [label_names[int(r[label_key])] for r in records]
        present = set(names)
        default_order = [n for n in label_names if n in present]
    else:
        names = [class_name_fn(r, features) for r in records]
        default_order = sorted(set(names))
    order = default_order if classes is None else list(classes)
    missing = sorted(set(order) - set(names))
    if missing:
        raise KeyError(f"{len(missing)} requested classes are not in TFDS {name!r} {splits}, "
                       f"e.g. {missing[:5]}.")
    index = {n: i for i, n in enumerate(order)}
    keep = [i for i, n in enumerate(names) if n in index]
    transform = transform or (lambda x: x)
    images = np.stack([transform(np.asarray(records[i][image_key])) for i in keep])
    labels = np.asarray([index[names[i]] for i in keep])
    return ClassDataset.from_labeled(images, labels, order)


def _cifar_subset(split_classes: Callable[[str], tuple[str, ...]], subset: str, data_dir,
                  dataset_name: str) -> ClassDataset:
    classes = split_classes(subset)  # validates the subset name first
    return tfds_class_dataset(dataset_name, ("train", "test"), data_dir=data_dir, classes=classes)


def load_cifar_fs(subset: str = "train", *, data_dir: Optional[Union[str, Path]] = None,
                  dataset_name: str = "cifar100") -> ClassDataset:
    """CIFAR-FS (Bertinetto et al. 2019) from TFDS ``cifar100``: 64 / 16 / 20 classes x 600."""
    return _cifar_subset(cifar_fs_classes, subset, data_dir, dataset_name)


def load_fc100(subset: str = "train", *, data_dir: Optional[Union[str, Path]] = None,
               dataset_name: str = "cifar100") -> ClassDataset:
    """FC100 (Oreshkin et al. 2018) from TFDS ``cifar100``: 60 / 20 / 20 classes x 600."""
    return _cifar_subset(fc100_classes, subset, data_dir, dataset_name)


_OMNIGLOT_TFDS_PARTS = {"train": "background", "test": "evaluation", "small1": "small1",
                        "small2": "small2"}


def _omniglot_transform(size: tuple[int, int], invert: bool) -> Callable[[np.ndarray], np.ndarray]:
    from PIL import Image

    def transform(image: np.ndarray) -> np.ndarray:
        grey = image[..., 0]
        if grey.max() <= 1:  # data_source + PIL gives {0, 1}; tfds.load gives {0, 255}
            grey = grey * np.uint8(255)
        im = Image.fromarray(grey.astype(np.uint8), mode="L")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.LANCZOS)
        out = np.asarray(im)
        return (255 - out if invert else out)[..., None]

    return transform


def load_omniglot_tfds(split: str = "train", *, data_dir: Optional[Union[str, Path]] = None,
                       image_size: Union[int, Sequence[int]] = 28, invert: bool = True,
                       dataset_name: str = "omniglot") -> ClassDataset:
    """Omniglot from a prepared TFDS ``omniglot`` data dir, like :func:`load_omniglot`'s output.

    TFDS splits: ``train`` (background, 964 characters), ``test`` (evaluation,
    659), ``small1``, ``small2``. Images are grey, Lanczos-resized, strokes 255 by
    default; classes are named ``'<part>/<alphabet>/characterNN'`` (as the zip
    loader names them), so ``train`` + ``test`` together take the named splits.
    """
    if split not in _OMNIGLOT_TFDS_PARTS:
        raise UnknownSplitError(f"unknown TFDS Omniglot split {split!r}; valid splits are "
                                f"{list(_OMNIGLOT_TFDS_PARTS)}.")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    part = _OMNIGLOT_TFDS_PARTS[split]

    def class_name(record: dict, features: Any) -> str:
        alphabet = features["alphabet"].names[int(record["alphabet"])]
        return f"{part}/{alphabet}/character{int(record['alphabet_char_id']) + 1:02d}"

    return tfds_class_dataset(dataset_name, split, data_dir=data_dir, class_name_fn=class_name,
                              transform=_omniglot_transform(size, invert))
