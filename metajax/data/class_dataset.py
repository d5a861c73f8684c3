"""Class-indexed image arrays: the host-side form every few-shot dataset loads into.

A :class:`ClassDataset` holds ``images`` of shape ``(C, E, H, W, Ch)`` uint8
(class, example, height, width, channels), ``counts`` ``(C,)`` (how many of the
``E`` example slots of each class are real; the rest is zero padding, so
classes may have different example counts), and ``class_names``.

``num_rotations=4`` turns on the standard Omniglot rotation augmentation
without storing 4x the data: class id ``c * 4 + r`` is base class ``c`` rotated
by ``r * 90`` degrees counter-clockwise (``np.rot90(image, r)``). The episode
sampler applies the rotation on device when it samples
(:mod:`metajax.data.episodes`); :meth:`ClassDataset.materialize_rotations`
makes the 4x array on the host if you want it.

Example:
  >>> import numpy as np
  >>> ds = ClassDataset.from_labeled(np.zeros((6, 4, 4, 1), np.uint8), np.array([0, 1, 1, 2, 2, 2]))
  >>> ds.images.shape, ds.counts.tolist(), ds.num_classes
  ((3, 3, 4, 4, 1), [1, 2, 3], 3)
  >>> ds.with_rotations().num_classes
  12
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

ROTATION_CHOICES = (1, 4)


@dataclasses.dataclass(frozen=True, eq=False)
class ClassDataset:
    """Class-indexed uint8 images (see the module docstring)."""

    images: np.ndarray
    counts: np.ndarray
    class_names: tuple[str, ...]
    num_rotations: int = 1

    def __post_init__(self):
        images = np.asarray(self.images)
        if images.ndim != 5 or images.dtype != np.uint8:
            raise ValueError(
                f"ClassDataset.images must be uint8 of shape (classes, examples, H, W, channels); "
                f"got {images.dtype} {images.shape}. Use ClassDataset.from_labeled or "
                "from_class_lists to build one from flat or per-class arrays.")
        counts = np.asarray(self.counts, dtype=np.int32)
        if counts.shape != images.shape[:1]:
            raise ValueError(f"counts has shape {counts.shape}; expected ({images.shape[0]},), "
                             "one count per class.")
        if counts.size and (counts.min() < 0 or counts.max() > images.shape[1]):
            raise ValueError(f"counts must lie in [0, {images.shape[1]}] (the example axis); got "
                             f"min {counts.min()}, max {counts.max()}.")
        names = tuple(str(n) for n in self.class_names)
        if len(names) != images.shape[0]:
            raise ValueError(f"{len(names)} class names for {images.shape[0]} classes.")
        if self.num_rotations not in ROTATION_CHOICES:
            raise ValueError(f"num_rotations must be one of {ROTATION_CHOICES}, got "
                             f"{self.num_rotations!r}.")
        if self.num_rotations > 1 and images.shape[2] != images.shape[3]:
            raise ValueError(f"rotation augmentation needs square images; got "
                             f"{images.shape[2]}x{images.shape[3]}.")
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "class_names", names)

    # ----------------------------------------------------------------- shapes
    @property
    def num_base_classes(self) -> int:
        """Classes stored in ``images`` (before rotation augmentation)."""
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """Classes a sampler draws from: base classes x ``num_rotations``."""
        return self.num_base_classes * self.num_rotations

    @property
    def max_examples(self) -> int:
        """The padded example axis ``E``."""
        return int(self.images.shape[1])

    @property
    def min_examples(self) -> int:
        """The smallest per-class example count."""
        return int(self.counts.min()) if self.counts.size else 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, channels)``."""
        return tuple(int(d) for d in self.images.shape[2:])

    @property
    def all_class_names(self) -> tuple[str, ...]:
        """Names of all ``num_classes`` classes, ``'<name>/rot090'`` etc. with rotations."""
        if self.num_rotations == 1:
            return self.class_names
        return tuple(f"{n}/rot{90 * r:03d}" for n in self.class_names
                     for r in range(self.num_rotations))

    def __repr__(self) -> str:
        return (f"ClassDataset(classes={self.num_base_classes}, rotations={self.num_rotations}, "
                f"examples<={self.max_examples}, image_shape={self.image_shape})")

    # ------------------------------------------------------------- selection
    def select(self, indices: Sequence[int]) -> "ClassDataset":
        """The base classes at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(self, images=self.images[idx], counts=self.counts[idx],
                                   class_names=tuple(self.class_names[i] for i in idx))

    def select_names(self, names: Sequence[str]) -> "ClassDataset":
        """The base classes called ``names``; unknown names raise ``KeyError`` listing them."""
        index = {n: i for i, n in enumerate(self.class_names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise KeyError(f"{len(missing)} class names are not in this dataset, e.g. "
                           f"{missing[:5]}; known names look like {list(self.class_names[:3])}.")
        return self.select([index[n] for n in names])

    def with_rotations(self, enabled: bool = True) -> "ClassDataset":
        """The same data with rotation augmentation (4x classes) turned on or off."""
        return dataclasses.replace(self, num_rotations=4 if enabled else 1)

    def drop_small_classes(self, min_examples: int) -> "ClassDataset":
        """Keeps only the classes with at least ``min_examples`` examples."""
        return self.select(np.flatnonzero(self.counts >= min_examples))

    def materialize_rotations(self) -> "ClassDataset":
        """Stores the rotated copies (class ``c*R + r``) on the host; ``num_rotations`` becomes 1."""
        if self.num_rotations == 1:
            return self
        rots = [np.rot90(self.images, r, axes=(2, 3)) for r in range(self.num_rotations)]
        images = np.stack(rots, axis=1).reshape((-1,) + self.images.shape[1:])
        counts = np.repeat(self.counts, self.num_rotations)
        return ClassDataset(np.ascontiguousarray(images), counts, self.all_class_names)

    # ---------------------------------------------------------- construction
    @classmethod
    def from_class_lists(cls, per_class: Sequence[np.ndarray],
                         class_names: Optional[Sequence[str]] = None) -> "ClassDataset":
        """Pads a list of ``(n_c, H, W[, Ch])`` uint8 arrays, one per class, to one array."""
        if not per_class:
            raise ValueError("no classes given.")
        arrays = [_nhwc(np.asarray(a)) for a in per_class]
        shape = arrays[0].shape[1:]
        for i, a in enumerate(arrays):
            if a.shape[1:] != shape:
                raise ValueError(f"class {i} has images of shape {a.shape[1:]}, class 0 has {shape}; "
                                 "resize them to one shape first.")
        counts = np.array([a.shape[0] for a in arrays], dtype=np.int32)
        images = np.zeros((len(arrays), int(counts.max())) + shape, np.uint8)
        for i, a in enumerate(arrays):
            images[i, :a.shape[0]] = a
        names = class_names if class_names is not None else [str(i) for i in range(len(arrays))]
        return cls(images, counts, tuple(names))

    @classmethod
    def from_labeled(cls, images: np.ndarray, labels: np.ndarray,
                     class_names: Optional[Sequence[str]] = None) -> "ClassDataset":
        """Groups flat ``(N, H, W[, Ch])`` images by integer ``labels`` (class ``i`` = label ``i``).

        Labels must be ``0..C-1``; ``class_names[label]`` names each class. Examples
        keep their order within a class.
        """
        images = _nhwc(np.asarray(images))
        labels = np.asarray(labels).astype(np.int64)
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{labels.shape[0] if labels.ndim else 0} labels for "
                             f"{images.shape[0]} images.")
        if labels.size == 0:
            raise ValueError("no images given.")
        if labels.min() < 0:
            raise ValueError(f"labels must be >= 0, got {labels.min()}.")
        num_classes = int(labels.max()) + 1 if class_names is None else len(class_names)
        if labels.max() >= num_classes:
            raise ValueError(f"label {labels.max()} but only {num_classes} class names.")
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=num_classes).astype(np.int32)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.arange(labels.size) - starts[labels[order]]
        out = np.zeros((num_classes, int(counts.max())) + images.shape[1:], np.uint8)
        out[labels[order], slot] = images[order]
        names = class_names if class_names is not None else [str(i) for i in range(num_classes)]
        return cls(out, counts, tuple(names))


def _nhwc(a: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` -> ``(N, H, W, 1)``; checks uint8."""
    if a.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {a.dtype}; convert with "
                         "np.clip(x, 0, 255).astype(np.uint8) or (x * 255).round() for [0, 1] floats.")
    if a.ndim == 3:
        return a[..., None]
    if a.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W) or (N, H, W, C), got {a.shape}.")
    return a
