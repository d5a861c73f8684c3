"""On-device N-way K-shot episode sampling from class-indexed uint8 arrays.

The images of a :class:`~metajax.data.class_dataset.ClassDataset` ``(C, E, H, W, Ch)``
uint8 and their per-class ``counts`` are put on the device once. One
jit-compiled function ``key -> TaskBatch`` then samples a meta-batch of ``T``
tasks; for each task it

1. draws ``n_way`` distinct classes uniformly (without replacement);
2. draws ``k_shot + n_query`` distinct examples of each class uniformly among
   that class's ``counts[c]`` real examples (padding slots are never drawn);
   the first ``k_shot`` go to the support set, the rest to the query set, so
   support and query never share an example;
3. relabels the chosen classes ``0..n_way-1`` in the (random) order drawn;
4. rotates rotation-augmented classes (class ``c*4 + r`` of a dataset with
   ``num_rotations=4`` is base class ``c`` turned by ``r*90`` degrees, ``np.rot90``
   direction): the sampler stores the rotated copies on the device when they fit
   (``materialize_rotations``, default up to 1 GiB), else rotates on the fly;
5. normalises to float32 in ``[0, 1]`` (``x / 255``), then optionally
   ``(x - mean) / std`` per channel -- or, with ``output_dtype="uint8"``, returns
   the raw pixels for the model to normalise with :func:`normalize_images`.

**Fast path.** Writing the meta-batch is the cost (a 20-way 5-shot 15-query
meta-batch of 32 is 10 MB of uint8 pixels, 40 MB as float32). With
``output_dtype="uint8"`` the sampler writes 4x fewer bytes and measured about
4-7x more tasks/s on a 2-core CPU (``benchmarks/sampler.py``); apply
``normalize_images(x)`` at the top of the model's apply function, inside the
jitted step, where XLA fuses the conversion into the first layer. With
``auto_layout=True`` the sampler gathers whole flat rows and lets XLA choose the
output layout, so on CPU the gather writes the outputs directly, with no copy pass.

Everything is a pure function of the key: the same key gives the same batch.
Inputs come out NHWC, ``(T, n_way * k_shot, H, W, Ch)`` float32, ordered class
by class (all shots of label 0, then label 1, ...); targets are int32.

**Imbalanced tasks.** With ``min_shot`` (and/or ``min_query``) each class of
each task gets its own shot count, uniform in ``[min_shot, k_shot]``. Arrays
keep the fixed ``k_shot`` slots per class; ``support_mask`` / ``query_mask``
``(T, N)`` float32 mark the real examples (1) and the unused slots (0), whose
inputs are zeroed. The core's masked losses and accuracies and
:func:`metajax.algorithms.protonet.class_prototypes` honour the masks. Balanced batches have no masks
(``None``).

Example:
  >>> import jax, numpy as np
  >>> from metajax.data import ClassDataset, EpisodeSampler
  >>> ds = ClassDataset(np.zeros((10, 20, 28, 28, 1), np.uint8), np.full(10, 20), [str(i) for i in range(10)])
  >>> sampler = EpisodeSampler(ds, n_way=5, k_shot=1, n_query=15, meta_batch_size=32)
  >>> batch = sampler(jax.random.key(0))
  >>> batch.support_inputs.shape, batch.query_targets.shape
  ((32, 5, 28, 28, 1), (32, 75))
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental.layout import Format, Layout, with_layout_constraint

from metajax.core.tasks import TaskBatch
from metajax.data.class_dataset import ClassDataset
from metajax.data.errors import EpisodeConfigError


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    """The shape of a meta-batch: ``meta_batch_size`` tasks of ``n_way`` classes.

    ``k_shot`` / ``n_query`` are the support / query examples per class (the
    maxima when ``min_shot`` / ``min_query`` make tasks imbalanced).
    """

    n_way: int
    k_shot: int
    n_query: int
    meta_batch_size: int = 32
    min_shot: Optional[int] = None
    min_query: Optional[int] = None

    def __post_init__(self):
        for name in ("n_way", "k_shot", "n_query", "meta_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise EpisodeConfigError(f"{name} must be a positive int, got {value!r}.")
        for name, top in (("min_shot", "k_shot"), ("min_query", "n_query")):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer))
                                      or not 1 <= value <= getattr(self, top)):
                raise EpisodeConfigError(f"{name} must be an int in [1, {top}="
                                         f"{getattr(self, top)}], got {value!r}.")

    @property
    def examples_per_class(self) -> int:
        return self.k_shot + self.n_query

    @property
    def imbalanced(self) -> bool:
        return ((self.min_shot is not None and self.min_shot < self.k_shot) or
                (self.min_query is not None and self.min_query < self.n_query))


@struct.dataclass
class EpisodeIndices:
    """What a meta-batch is made of (all int32).

    ``classes (T, N)``: class ids (rotation-augmented ids when ``num_rotations > 1``);
    ``examples (T, N, K + Q)``: example slots, first ``K`` support then ``Q`` query;
    ``support_shots`` / ``query_shots`` ``(T, N)``: real examples per class.
    """

    classes: jax.Array
    examples: jax.Array
    support_shots: jax.Array
    query_shots: jax.Array


def check_episode_spec(spec: EpisodeSpec, dataset: ClassDataset) -> None:
    """Raises :class:`EpisodeConfigError` if ``dataset`` cannot supply ``spec``'s tasks."""
    if spec.n_way > dataset.num_classes:
        raise EpisodeConfigError(
            f"n_way={spec.n_way} but the dataset has only {dataset.num_classes} classes; lower "
            "n_way or use a split with more classes (e.g. rotations=True for Omniglot).")
    need = spec.examples_per_class
    short = np.flatnonzero(dataset.counts < need)
    if short.size:
        names = [dataset.class_names[i] for i in short[:3]]
        raise EpisodeConfigError(
            f"k_shot + n_query = {spec.k_shot} + {spec.n_query} = {need} examples per class, but "
            f"{short.size} classes have fewer (e.g. {names} with "
            f"{dataset.counts[short[:3]].tolist()}); lower k_shot/n_query, or keep only classes "
            f"with enough examples: dataset.drop_small_classes({need}).")


def sample_episode_indices(key: jax.Array, counts: jax.Array, spec: EpisodeSpec,
                           max_examples: int, num_rotations: int = 1) -> EpisodeIndices:
    """Draws classes, examples and shot counts of a meta-batch (jittable; ints static).

    ``counts (C,)`` are the real examples per base class, ``max_examples`` the
    padded example axis ``E``; the sampler draws among ``C * num_rotations`` classes.
    """
    t, n, kq = spec.meta_batch_size, spec.n_way, spec.examples_per_class
    num_classes = counts.shape[0] * num_rotations
    cls_shapes = _swr_uniform_shapes(t, n, num_classes)
    ex_shapes = _swr_uniform_shapes(t * n, kq, max_examples)
    u = _uniforms(key, cls_shapes + ex_shapes + [(t, n), (t, n)])
    u_cls, u_ex = u[:len(cls_shapes)], u[len(cls_shapes):-2]
    classes = _swr_batch_last(u_cls, jnp.full((t,), num_classes, jnp.int32), n, num_classes).T
    sizes = counts[classes.reshape(-1) // num_rotations]
    examples = _swr_batch_last(u_ex, sizes, kq, max_examples).T.reshape(t, n, kq)
    return EpisodeIndices(
        classes=classes, examples=examples,
        support_shots=_shots(u[-2], spec.min_shot, spec.k_shot),
        query_shots=_shots(u[-1], spec.min_query, spec.n_query))


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array,
                  x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds) of counters ``(x0, x1)`` under key ``(k0, k1)``, unrolled.

    The same function as JAX's ``threefry2x32`` primitive, whose CPU lowering is a
    5-step ``while`` loop: XLA runs each step as separate kernels, which cost
    more than the hash itself; unrolled, the whole hash is one fused elementwise loop.
    """
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _threefry_key_words(key: jax.Array) -> Optional[jax.Array]:
    """``uint32[2]`` of a threefry key (typed or raw), or None for other PRNG implementations."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key) if str(jax.random.key_impl(key)) == "threefry2x32" else None
    return key if key.shape == (2,) and key.dtype == jnp.uint32 else None


def _random_bits(key: jax.Array, size: int) -> jax.Array:
    """``jax.random.bits(key, (size,), jnp.uint32)``, bit for bit, as one fused kernel.

    The same words as JAX's default (partitionable) threefry bits, at about half
    the cost on CPU (see :func:`_threefry2x32`); keys of other PRNG
    implementations go through ``jax.random.bits``.
    """
    words = _threefry_key_words(key)
    if words is None:
        return jax.random.bits(key, (size,), jnp.uint32)
    counter = jnp.arange(size, dtype=jnp.uint32)
    hi_bits, lo_bits = _threefry2x32(words[0], words[1], jnp.zeros_like(counter), counter)
    return hi_bits ^ lo_bits


def _uniforms(key: jax.Array, shapes: Sequence[tuple[int, ...]]) -> list[jax.Array]:
    """Uniform [0, 1) float32 arrays of the given shapes from one flat draw of random bits.

    One 1-D draw keeps compile time low: with JAX's default partitionable
    threefry, every multi-dimensional draw costs seconds of XLA compile on CPU.
    """
    sizes = [int(np.prod(s)) for s in shapes]
    bits = _random_bits(key, sum(sizes))
    # 23 random mantissa bits -> a float in [1, 2) -> [0, 1).
    flat = jax.lax.bitcast_convert_type((bits >> 9) | np.uint32(0x3F800000), jnp.float32) - 1.0
    offsets = np.cumsum([0] + sizes)
    return [flat[lo:hi].reshape(shape) for lo, hi, shape in zip(offsets[:-1], offsets[1:], shapes)]


_RANK_MAX_POPULATION = 64


def _ranks(u: jax.Array) -> jax.Array:
    """Rank of each row of ``u (L, B)`` within its column (ties broken by row).

    Batch-last, with the comparisons unrolled over rows: every term is an
    elementwise op on contiguous ``B``-long rows, which XLA's CPU backend
    vectorises, and the ``L`` row reads make XLA compute ``u`` (the hash) once
    instead of fusing it into a reduction that would recompute it ``2 L`` times.
    """
    row = jnp.arange(u.shape[0])[:, None]
    return sum(((u[j] < u) | ((u[j] == u) & (j < row))).astype(jnp.int32)
               for j in range(u.shape[0]))


def _take_by_rank(values: jax.Array, ranks: jax.Array, m: int) -> jax.Array:
    """``out[r, b] = values[i, b]`` where ``ranks[i, b] == r``, for ``r < m`` (batch-last).

    ``ranks`` holds a permutation of ``0..L-1`` in every column (see :func:`_ranks`),
    so this is a scatter with unique indices: one write per element. XLA's CPU
    backend runs it as one cheap loop; the equivalent one-hot reduction
    (``sum_i where(ranks[i] == r, values[i], 0)``) got the rank computation fused
    into it, recomputing all ``L^2`` comparisons for each of the ``m`` outputs: about
    1.7x slower for a whole 5-way 1-shot 15-query meta-batch.
    """
    length, batch = ranks.shape
    columns = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[None, :], (length, batch))
    out = jnp.zeros((length, batch), jnp.int32).at[ranks, columns].set(
        values.astype(jnp.int32), unique_indices=True, mode="promise_in_bounds")
    return out[:m]


def _swr_uniform_shapes(batch: int, m: int, max_size: int) -> list:
    if max_size <= _RANK_MAX_POPULATION:
        return [(max_size, batch)]
    return [(m, batch), (m, batch)]


def _swr_batch_last(u: Sequence[jax.Array], sizes: jax.Array, m: int,
                    max_size: int) -> jax.Array:
    """``(m, B)`` draws without replacement from ``[0, sizes[b])`` (see ``_swr_uniform_shapes``)."""
    sizes = sizes.astype(jnp.int32)
    if max_size <= _RANK_MAX_POPULATION:
        # Rank max_size uniforms; slots past the size score 2, so they rank last.
        slots = jnp.arange(max_size, dtype=jnp.int32)[:, None]
        scores = jnp.where(slots < sizes, u[0], 2.0)
        return _take_by_rank(jnp.broadcast_to(slots, scores.shape), _ranks(scores), m)
    u_pick, u_order = u
    chosen = []
    for s in range(m):  # Floyd: the s-th step picks from [0, sizes - m + s]
        top = sizes - m + s
        pick = jnp.minimum(jnp.floor(u_pick[s] * (top + 1)).astype(jnp.int32), top)
        seen = jnp.any(jnp.stack(chosen) == pick, axis=0) if chosen else False
        chosen.append(jnp.where(seen, top, pick))
    return _take_by_rank(jnp.stack(chosen), _ranks(u_order), m)  # Floyd's order is not uniform


def sample_without_replacement(key: jax.Array, sizes: jax.Array, m: int,
                               max_size: int) -> jax.Array:
    """``m`` distinct ints in ``[0, sizes[i])`` per entry of ``sizes``, uniformly and in random order.

    Returns ``sizes.shape + (m,)`` int32; needs ``m <= sizes <= max_size``. Small
    populations (``max_size <= 64``) rank ``max_size`` uniforms; larger ones use
    Floyd's algorithm (O(m^2) work, independent of the population) plus a shuffle.
    Both avoid sorting, which is slow on CPU.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = sample_without_replacement(jax.random.key(0), jnp.array([10, 10]), 3, 10)
      >>> x.shape, bool((x[0, 0] != x[0, 1]) & (x[0, 1] != x[0, 2]) & (x[0, 0] != x[0, 2]))
      ((2, 3), True)
    """
    sizes = jnp.asarray(sizes)
    flat = sizes.reshape(-1)
    u = _uniforms(key, _swr_uniform_shapes(flat.shape[0], m, max_size))
    return _swr_batch_last(u, flat, m, max_size).T.reshape(sizes.shape + (m,))


def _shots(u: jax.Array, low: Optional[int], high: int) -> jax.Array:
    """Per-class counts, uniform in ``[low, high]`` (all ``high`` when ``low`` is None)."""
    if low is None or low == high:
        return jnp.full(u.shape, high, jnp.int32)
    return jnp.minimum(low + jnp.floor(u * (high - low + 1)).astype(jnp.int32), high)


def _rotate(x: jax.Array, quarter_turns: jax.Array) -> jax.Array:
    """Rotates each image of ``x (M, H, W, Ch)`` by ``quarter_turns (M,)`` (``np.rot90`` sense).

    A select among the four rotations: XLA fuses it into the float conversion as
    index arithmetic, which measured faster on CPU than a pixel gather and about
    as fast as storing the rotated copies (without the 4x memory).
    """
    r = quarter_turns[:, None, None, None]
    rot = lambda k: jnp.rot90(x, k, axes=(1, 2))
    return jnp.where(r == 0, x, jnp.where(r == 1, rot(1), jnp.where(r == 2, rot(2), rot(3))))


def _normalize(x: jax.Array, mean: Optional[tuple], std: Optional[tuple]) -> jax.Array:
    x = x.astype(jnp.float32) * (1.0 / 255.0)
    if mean is not None:
        x = x - jnp.asarray(mean, jnp.float32)
    if std is not None:
        x = x * jnp.asarray(1.0 / np.asarray(std, np.float32))
    return x


OUTPUT_DTYPES = ("float32", "uint8")


def _check_output_dtype(output_dtype, mean, std) -> str:
    name = jnp.dtype(output_dtype).name if output_dtype is not None else "float32"
    if name not in OUTPUT_DTYPES:
        raise ValueError(f"output_dtype must be one of {OUTPUT_DTYPES}, got {output_dtype!r}.")
    if name == "uint8" and (mean is not None or std is not None):
        raise ValueError("mean/std normalise float outputs; with output_dtype='uint8' pass them "
                         "to normalize_images(x, mean, std) in the model instead.")
    return name


def pack_image_rows(images: np.ndarray) -> np.ndarray:
    """``(C, E, H, W, Ch)`` uint8 -> the row table ``(C*E, H*W*Ch/4)`` uint32 the sampler gathers from.

    Each image is one row, viewed as uint32 words when its byte count is a
    multiple of 4 (else left as uint8 bytes): XLA's CPU gather copies word by
    word, so 4-byte rows move about 4x fewer elements than a uint8 gather.
    """
    rows = np.ascontiguousarray(images).reshape(images.shape[0] * images.shape[1], -1)
    return rows.view(np.uint32) if rows.shape[1] % 4 == 0 else rows


def _unpack_rows(x: jax.Array, image_shape: tuple) -> jax.Array:
    if x.dtype != jnp.uint8:  # (M, row/4) uint32 -> (M, row/4, 4) uint8: a bitcast, no copy
        x = jax.lax.bitcast_convert_type(x, jnp.uint8)
    return x.reshape((-1,) + tuple(image_shape))


def _tile_stats(stats: Optional[tuple], pixels: int) -> Optional[tuple]:
    """Per-channel stats -> per-column stats of flat ``(H*W*Ch)`` rows (channels minor)."""
    return None if stats is None else tuple(stats) * pixels


def _finish_rows(x: jax.Array, mask: Optional[jax.Array], output_dtype: str, mean,
                 std, pixels: int) -> jax.Array:
    """Normalises and masks flat image rows ``(M, H*W*Ch)`` uint8, staying 2-D.

    The layout constraint keeps XLA from fusing the final reshape to
    ``(T, M/T, H, W, Ch)`` into this loop: a 2-D loop copies each row with wide
    vector moves, while a 5-D loop ending in a 28-wide (or size-1 channel) axis
    runs several times slower on CPU. The reshape is then a free bitcast, provided
    the output layout is left to XLA (``Layout.AUTO``, see :class:`EpisodeSampler`).
    """
    if output_dtype == "float32":
        x = _normalize(x, _tile_stats(mean, pixels), _tile_stats(std, pixels))
    if mask is not None:
        x = jnp.where(mask.reshape(-1, 1), x, jnp.zeros((), x.dtype))
    return with_layout_constraint(x, Layout(major_to_minor=(0, 1)))


def _gather_part(table: jax.Array, image_shape: tuple, num_examples: int,
                 indices: EpisodeIndices, lo: int, hi: int, shots: jax.Array, masked: bool,
                 num_rotations: int, rotate: bool, output_dtype: str, mean, std,
                 flat_rows: bool = False):
    """Inputs ``(T, N*(hi-lo), H, W, Ch)`` of example slots ``lo:hi``, and the mask.

    ``table`` holds one image per row (:func:`pack_image_rows`); with ``rotate``
    it holds the base classes and rotations are applied here, else it holds all
    ``C * num_rotations`` classes (rotations materialised). ``flat_rows``: ``table``
    is uint8 rows and the work stays on 2-D rows (:func:`_finish_rows`).
    """
    t, n = indices.classes.shape
    m = hi - lo
    cls = indices.classes // num_rotations if rotate else indices.classes
    rows = (cls[..., None] * num_examples + indices.examples[..., lo:hi]).reshape(-1)
    mask = (jnp.arange(m) < shots[..., None]).reshape(t, n * m) if masked else None
    # A row gather is much faster on CPU than a multi-index gather; without the bounds
    # checks (indices are in range by construction) XLA emits a plain copy loop.
    x = table.at[rows].get(mode="promise_in_bounds")
    if flat_rows and not (rotate and num_rotations > 1):
        pixels = int(np.prod(image_shape[:-1]))
        x = _finish_rows(x, mask, output_dtype, mean, std, pixels)
        x = x.reshape((t, n * m) + tuple(image_shape))
        return x, None if mask is None else mask.astype(jnp.float32)
    x = _unpack_rows(x, image_shape)
    if rotate and num_rotations > 1:
        turns = jnp.broadcast_to((indices.classes % num_rotations)[..., None], (t, n, m))
        x = _rotate(x, turns.reshape(-1))
    x = x.reshape((t, n * m) + tuple(image_shape))
    if output_dtype == "float32":
        x = _normalize(x, mean, std)
    if not masked:
        return x, None
    x = jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))
    return x, mask.astype(jnp.float32)


def _gather_table(table: jax.Array, image_shape: tuple, num_examples: int,
                  indices: EpisodeIndices, spec: EpisodeSpec, num_rotations: int, rotate: bool,
                  output_dtype: str, mean, std, dataset_labels: bool = False,
                  flat_rows: bool = False) -> TaskBatch:
    t, n, k, q = spec.meta_batch_size, spec.n_way, spec.k_shot, spec.n_query
    masked = spec.imbalanced
    args = (masked, num_rotations, rotate, output_dtype, mean, std, flat_rows)
    # Support and query are gathered separately, each straight into its own output.
    s_x, s_mask = _gather_part(table, image_shape, num_examples, indices, 0, k,
                               indices.support_shots, *args)
    q_x, q_mask = _gather_part(table, image_shape, num_examples, indices, k, k + q,
                               indices.query_shots, *args)
    if dataset_labels:  # the dataset's class ids, for classifiers over all classes
        labels = indices.classes.astype(jnp.int32)[:, :, None]
    else:
        labels = jnp.arange(n, dtype=jnp.int32)[None, :, None]
    return TaskBatch(
        support_inputs=s_x, support_targets=jnp.broadcast_to(labels, (t, n, k)).reshape(t, n * k),
        query_inputs=q_x, query_targets=jnp.broadcast_to(labels, (t, n, q)).reshape(t, n * q),
        support_mask=s_mask, query_mask=q_mask)


def gather_episodes(images: jax.Array, indices: EpisodeIndices, spec: EpisodeSpec,
                    num_rotations: int = 1, mean: Optional[tuple] = None,
                    std: Optional[tuple] = None, output_dtype: str = "float32") -> TaskBatch:
    """Builds the :class:`~metajax.TaskBatch` of ``indices`` from ``images (C, E, H, W, Ch)`` uint8.

    Masked (unused) slots of imbalanced tasks have zero inputs. ``output_dtype``
    ``"uint8"`` returns the raw pixels (see :func:`normalize_images`).
    """
    output_dtype = _check_output_dtype(output_dtype, mean, std)
    table = images.reshape(images.shape[0] * images.shape[1], -1)
    return _gather_table(table, images.shape[2:], images.shape[1], indices, spec, num_rotations,
                         True, output_dtype, mean, std)


def normalize_images(x: jax.Array, mean=None, std=None, dtype=jnp.float32) -> jax.Array:
    """uint8 pixels -> ``dtype`` in ``[0, 1]`` (``x / 255``), then optionally ``(x - mean) / std``.

    The consumer's half of ``EpisodeSampler(..., output_dtype="uint8")``: call it
    at the top of the model's apply function, inside the jitted step, where XLA
    fuses it into the first layer instead of writing a 4x larger float array.
    ``normalize_images(uint8_batch_inputs)`` equals the float32 sampler's inputs
    exactly (same key); float inputs pass through unchanged.

    Example:
      >>> import jax.numpy as jnp
      >>> [round(v, 4) for v in normalize_images(jnp.array([0, 51, 255], jnp.uint8)).tolist()]
      [0.0, 0.2, 1.0]
    """
    if not jnp.issubdtype(x.dtype, jnp.integer):
        return x
    mean = _channel_stats(mean, x.shape[-1], "mean")
    std = _channel_stats(std, x.shape[-1], "std")
    return _normalize(x, mean, std).astype(dtype)


def sample_episodes(key: jax.Array, images: jax.Array, counts: jax.Array, spec: EpisodeSpec,
                    num_rotations: int = 1, mean: Optional[np.ndarray] = None,
                    std: Optional[np.ndarray] = None, output_dtype: str = "float32") -> TaskBatch:
    """One meta-batch of tasks: :func:`sample_episode_indices` then :func:`gather_episodes`.

    Pure and jittable with ``spec``, ``num_rotations``, ``mean``, ``std``,
    ``output_dtype`` static; :class:`EpisodeSampler` wraps it with the checks,
    a packed image table and the jit.
    """
    indices = sample_episode_indices(key, counts, spec, images.shape[1], num_rotations)
    return gather_episodes(images, indices, spec, num_rotations, mean, std, output_dtype)


def _sample_table(key, table, counts, spec, image_shape, num_examples, num_rotations, rotate,
                  output_dtype, mean, std, dataset_labels, flat_rows=False) -> TaskBatch:
    indices = sample_episode_indices(key, counts, spec, num_examples, num_rotations)
    return _gather_table(table, image_shape, num_examples, indices, spec, num_rotations, rotate,
                         output_dtype, mean, std, dataset_labels, flat_rows)


def _sample_many(keys, table, counts, *static) -> TaskBatch:
    return jax.vmap(lambda k: _sample_table(k, table, counts, *static))(keys)


def _auto_layout_formats(spec: EpisodeSpec) -> TaskBatch:
    """``out_shardings`` for a top-level sampler call: image arrays in XLA's chosen layout.

    Only for calls outside a trace: inside ``jit``/``vmap`` the caller's
    computation decides layouts (and ``vmap`` of a jit with layouts is an error).
    """
    masks = Format() if spec.imbalanced else None
    return TaskBatch(support_inputs=Format(Layout.AUTO), support_targets=Format(),
                     query_inputs=Format(Layout.AUTO), query_targets=Format(),
                     support_mask=masks, query_mask=masks)


# Rotation-augmented datasets up to this size (all rotations) are stored rotated on the device.
MATERIALIZE_ROTATIONS_MAX_BYTES = 1 << 30


def _channel_stats(value, channels: int, name: str) -> Optional[tuple[float, ...]]:
    if value is None:
        return None
    arr = np.broadcast_to(np.asarray(value, np.float32).reshape(-1), (channels,))
    if name == "std" and np.any(arr <= 0):
        raise ValueError(f"std must be positive, got {value!r}.")
    return tuple(float(v) for v in arr)


class EpisodeSampler:
    """Samples meta-batches of N-way K-shot Q-query tasks on device: ``sampler(key) -> TaskBatch``.

    Args:
      dataset: the classes to sample from (``num_rotations=4`` adds rotated classes).
      n_way, k_shot, n_query, meta_batch_size: the task shape.
      min_shot, min_query: for imbalanced tasks, the smallest per-class support /
        query count (each class gets a uniform count in ``[min, max]``, with masks).
      mean, std: optional per-channel normalisation applied after scaling to [0, 1]
        (float32 output only).
      output_dtype: ``"float32"`` (normalised inputs) or ``"uint8"`` (raw pixels,
        4x less to write: the fast path; normalise in the model with
        :func:`normalize_images`, which gives the float32 inputs exactly).
      materialize_rotations: store the rotated copies of a rotation-augmented
        dataset on the device (4x memory, faster) instead of rotating on the fly;
        default: store them when they take at most ``MATERIALIZE_ROTATIONS_MAX_BYTES``.
        Both give identical batches.
      labels: ``"episode"`` (default): targets ``0..n_way-1`` in the order drawn;
        ``"dataset"``: the dataset's class ids (rotation-augmented ids with rotations),
        for training a classifier over all classes (:class:`metajax.ClassifierBaseline`).
      device: where the arrays live (default: JAX's default device).
      auto_layout: let XLA choose the memory layout of the returned image arrays
        (``Layout.AUTO``; off by default, not with rotations on the fly). For
        stand-alone sampling calls on CPU; a jitted consumer then compiles once more
        for that layout, and inside a trace (a fused training loop) it changes nothing. The bytes
        are row-major either way: XLA only orders the size-1 axes (e.g. ``Ch=1``)
        differently, which saves the copy that XLA's CPU backend otherwise makes
        of every meta-batch (a fifth to a quarter of the sampling time for Omniglot).
        Arrays with such a layout work everywhere (``jax.jit``, NumPy, eager ops).

    Raises:
      EpisodeConfigError: ``n_way`` exceeds the classes, or ``k_shot + n_query``
        exceeds the examples of some class.

    Example:
      >>> import jax, numpy as np
      >>> ds = ClassDataset(np.zeros((8, 10, 4, 4, 3), np.uint8), np.full(8, 10), list("abcdefgh"))
      >>> sampler = EpisodeSampler(ds, n_way=3, k_shot=2, n_query=4, meta_batch_size=2, min_shot=1)
      >>> batch = sampler(jax.random.key(1))
      >>> batch.support_inputs.shape, batch.support_mask.shape
      ((2, 6, 4, 4, 3), (2, 6))
    """

    def __init__(self, dataset: ClassDataset, n_way: int, k_shot: int, n_query: int,
                 meta_batch_size: int = 32, *, min_shot: Optional[int] = None,
                 min_query: Optional[int] = None,
                 mean: Union[None, float, Sequence[float]] = None,
                 std: Union[None, float, Sequence[float]] = None,
                 output_dtype: str = "float32",
                 materialize_rotations: Optional[bool] = None,
                 labels: str = "episode",
                 device: Optional[jax.Device] = None,
                 auto_layout: bool = False):
        if labels not in ("episode", "dataset"):
            raise ValueError(f"labels must be 'episode' (0..n_way-1 per task) or 'dataset' "
                             f"(the dataset's class ids), got {labels!r}.")
        self.labels = labels
        self.spec = EpisodeSpec(n_way, k_shot, n_query, meta_batch_size, min_shot, min_query)
        check_episode_spec(self.spec, dataset)
        self.dataset = dataset
        self.num_rotations = dataset.num_rotations
        channels = dataset.image_shape[-1]
        self.mean = _channel_stats(mean, channels, "mean")
        self.std = _channel_stats(std, channels, "std")
        self.output_dtype = _check_output_dtype(output_dtype, self.mean, self.std)
        if materialize_rotations is None:
            materialize_rotations = (self.num_rotations > 1 and dataset.images.nbytes *
                                     self.num_rotations <= MATERIALIZE_ROTATIONS_MAX_BYTES)
        self.materialize_rotations = bool(materialize_rotations) and self.num_rotations > 1
        images = (dataset.materialize_rotations().images if self.materialize_rotations
                  else dataset.images)
        rotate = self.num_rotations > 1 and not self.materialize_rotations
        if auto_layout and rotate:
            raise ValueError("auto_layout=True works on stored rotations; pass "
                             "materialize_rotations=True (or auto_layout=False) to rotate on the fly.")
        self.auto_layout = bool(auto_layout)
        # Flat uint8 rows for the 2-D path (_finish_rows), else uint32 words (pack_image_rows).
        table = (images.reshape(images.shape[0] * images.shape[1], -1) if self.auto_layout
                 else pack_image_rows(images))
        self.table = jax.device_put(table, device)
        self.counts = jax.device_put(dataset.counts, device)
        self._static = (self.spec, tuple(dataset.image_shape), dataset.max_examples,
                        self.num_rotations, rotate, self.output_dtype, self.mean, self.std,
                        self.labels == "dataset", self.auto_layout)
        static = tuple(range(3, 13))
        self._sample = jax.jit(_sample_table, static_argnums=static)
        self._sample_many = jax.jit(_sample_many, static_argnums=static)
        if self.auto_layout:
            formats = _auto_layout_formats(self.spec)
            self._sample_top = jax.jit(_sample_table, static_argnums=static,
                                       out_shardings=formats)
            self._sample_many_top = jax.jit(_sample_many, static_argnums=static,
                                            out_shardings=formats)
        else:
            self._sample_top, self._sample_many_top = self._sample, self._sample_many
        self._indices = jax.jit(sample_episode_indices, static_argnums=(2, 3, 4))

    def __call__(self, key: jax.Array) -> TaskBatch:
        """A meta-batch of tasks, determined by ``key``."""
        fn = self._sample if isinstance(key, jax.core.Tracer) else self._sample_top
        return fn(key, self.table, self.counts, *self._static)

    def sample_many(self, key: jax.Array, num: int) -> TaskBatch:
        """``num`` meta-batches in one call, stacked on a new leading axis ``(num, T, ...)``.

        Meta-batch ``i`` equals ``self(jax.random.split(key, num)[i])``. One dispatch
        for several steps (less per-call overhead), e.g. to feed a ``lax.scan``.
        """
        fn = self._sample_many if isinstance(key, jax.core.Tracer) else self._sample_many_top
        return fn(jax.random.split(key, num), self.table, self.counts, *self._static)

    def indices(self, key: jax.Array) -> EpisodeIndices:
        """The classes and examples that ``self(key)`` uses (for inspection and tests)."""
        return self._indices(key, self.counts, self.spec, self.dataset.max_examples,
                             self.num_rotations)


def class_splitter(dataset: ClassDataset, n_way: int, num_train_per_class: int,
                   num_test_per_class: int, meta_batch_size: int = 32, **kwargs) -> EpisodeSampler:
    """torchmeta's ``ClassSplitter`` as a sampler: per class, ``num_train_per_class``
    support ("train") and ``num_test_per_class`` query ("test") examples, disjoint.

    Example:
      >>> import jax, numpy as np
      >>> ds = ClassDataset(np.zeros((6, 9, 2, 2, 1), np.uint8), np.full(6, 9), list("abcdef"))
      >>> class_splitter(ds, 5, 2, 3, meta_batch_size=4)(jax.random.key(0)).num_query
      15
    """
    return EpisodeSampler(dataset, n_way, num_train_per_class, num_test_per_class,
                          meta_batch_size, **kwargs)
