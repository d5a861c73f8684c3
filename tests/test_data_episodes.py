"""The on-device episode sampler: sampling laws, masks, rotations, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metajax import TaskBatch, masked_mean
from metajax.data import (ClassDataset, EpisodeConfigError, EpisodeSampler,
                          class_splitter, normalize_images, sample_without_replacement)
from metajax.algorithms.protonet import class_prototypes
from metajax.data.episodes import EpisodeSpec


def coded_dataset(num_classes=12, max_examples=10, counts=None, size=6, channels=1):
    """Images whose pixels (0,0), (0,1) encode the class and (0,2) the example slot."""
    images = np.zeros((num_classes, max_examples, size, size, channels), np.uint8)
    for c in range(num_classes):
        for e in range(max_examples):
            images[c, e, 0, 0] = c % 256
            images[c, e, 0, 1] = c // 256
            images[c, e, 0, 2] = e + 1
    counts = np.full(num_classes, max_examples) if counts is None else np.asarray(counts)
    return ClassDataset(images, counts, [f"c{i}" for i in range(num_classes)])


def decode(x):
    """(…, H, W, C) float in [0,1] -> (class, example) of the coded images (unrotated)."""
    p = np.rint(np.asarray(x)[..., 0, :3, 0] * 255).astype(int)
    return p[..., 0] + 256 * p[..., 1], p[..., 2] - 1


def test_shapes_labels_and_validate():
    sampler = EpisodeSampler(coded_dataset(), n_way=4, k_shot=2, n_query=3, meta_batch_size=5)
    b = sampler(jax.random.key(0))
    assert isinstance(b, TaskBatch) and b.validate().num_tasks == 5
    assert b.support_inputs.shape == (5, 8, 6, 6, 1) and b.support_inputs.dtype == jnp.float32
    assert b.query_inputs.shape == (5, 12, 6, 6, 1)
    assert b.support_targets.dtype == jnp.int32
    np.testing.assert_array_equal(b.support_targets[0], np.repeat(np.arange(4), 2))
    np.testing.assert_array_equal(b.query_targets[3], np.repeat(np.arange(4), 3))
    assert b.support_mask is None and b.query_mask is None
    assert float(b.support_inputs.min()) >= 0 and float(b.support_inputs.max()) <= 1


def test_no_overlap_and_consistent_relabelling():
    ds = coded_dataset(num_classes=30, max_examples=8)
    sampler = EpisodeSampler(ds, n_way=5, k_shot=3, n_query=5, meta_batch_size=64)
    b = sampler(jax.random.key(1))
    s_cls, s_ex = decode(b.support_inputs)
    q_cls, q_ex = decode(b.query_inputs)
    s_lab, q_lab = np.asarray(b.support_targets), np.asarray(b.query_targets)
    for t in range(64):
        classes = {lab: set(s_cls[t][s_lab[t] == lab]) for lab in range(5)}
        assert all(len(v) == 1 for v in classes.values()), "one class per label"
        assert len({next(iter(v)) for v in classes.values()}) == 5, "distinct classes per task"
        for lab in range(5):
            assert set(q_cls[t][q_lab[t] == lab]) == classes[lab], "query shares support's class"
            s = set(s_ex[t][s_lab[t] == lab])
            q = set(q_ex[t][q_lab[t] == lab])
            assert len(s) == 3 and len(q) == 5 and not s & q, "examples disjoint"
    # the indices the sampler reports are the ones it used
    idx = sampler.indices(jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(idx.classes)[:, :, None].repeat(3, -1).reshape(64, 15),
                                  s_cls)


def test_same_key_same_batch_different_key_different():
    sampler = EpisodeSampler(coded_dataset(), n_way=3, k_shot=1, n_query=2, meta_batch_size=8)
    a, b = sampler(jax.random.key(7)), sampler(jax.random.key(7))
    c = sampler(jax.random.key(8))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.query_inputs, c.query_inputs)
    legacy = sampler(jax.random.PRNGKey(7))  # raw uint32 keys work too
    assert legacy.support_inputs.shape == a.support_inputs.shape


def test_variable_counts_never_sample_padding():
    counts = [3, 10, 4, 7, 5, 6]
    ds = coded_dataset(num_classes=6, max_examples=10, counts=counts)
    sampler = EpisodeSampler(ds, n_way=4, k_shot=1, n_query=2, meta_batch_size=200)
    b = sampler(jax.random.key(3))
    for x in (b.support_inputs, b.query_inputs):
        cls, ex = decode(x)
        assert (ex >= 0).all() and (ex < np.asarray(counts)[cls]).all()


def test_imbalanced_masks_losses_and_prototypes():
    ds = coded_dataset(num_classes=10, max_examples=12)
    sampler = EpisodeSampler(ds, n_way=4, k_shot=5, n_query=4, meta_batch_size=50,
                             min_shot=1, min_query=2)
    b = sampler(jax.random.key(4)).validate()
    s_mask = np.asarray(b.support_mask).reshape(50, 4, 5)
    q_mask = np.asarray(b.query_mask).reshape(50, 4, 4)
    shots, queries = s_mask.sum(-1), q_mask.sum(-1)
    assert shots.min() == 1 and shots.max() == 5 and len(np.unique(shots)) == 5
    assert queries.min() == 2 and queries.max() == 4
    # real examples first in each class block, padding zeroed
    assert (np.diff(s_mask, axis=-1) <= 0).all()
    x = np.asarray(b.support_inputs).reshape(50, 4, 5, -1)
    assert (x[s_mask == 0] == 0).all() and (x[s_mask == 1].max(-1) > 0).all()
    # a masked loss ignores the padded slots entirely
    per_example = jnp.where(jnp.asarray(b.support_mask[0]) > 0, 1.0, 1e6)
    assert float(masked_mean(per_example, b.support_mask[0])) == 1.0
    # prototypes average only real support examples
    emb = jnp.asarray(b.support_inputs[0]).reshape(20, -1)
    protos, _ = class_prototypes(emb, b.support_targets[0], 4, b.support_mask[0])
    m = s_mask[0]
    expect = (x[0] * m[..., None]).sum(1) / m.sum(1)[:, None]
    np.testing.assert_allclose(protos, expect, rtol=1e-6)


def test_on_device_rotation_matches_rot90():
    ds = coded_dataset(num_classes=3, max_examples=4, size=5)
    rng = np.random.default_rng(0)
    images = ds.images.copy()
    images[..., 1:, :, :] = rng.integers(0, 256, images[..., 1:, :, :].shape, dtype=np.uint8)
    ds = ClassDataset(images, ds.counts, ds.class_names).with_rotations()
    assert ds.num_classes == 12
    sampler = EpisodeSampler(ds, n_way=12, k_shot=1, n_query=3, meta_batch_size=2)
    b = sampler(jax.random.key(5))
    idx = sampler.indices(jax.random.key(5))
    classes, examples = np.asarray(idx.classes), np.asarray(idx.examples)
    got = np.rint(np.asarray(b.query_inputs) * 255).astype(np.uint8).reshape(2, 12, 3, 5, 5, 1)
    for t in range(2):
        for j in range(12):
            base, turns = divmod(classes[t, j], 4)
            for i in range(3):
                want = np.rot90(images[base, examples[t, j, 1 + i]], turns, axes=(0, 1))
                np.testing.assert_array_equal(got[t, j, i], want)
    # storing the rotated copies on the host gives the same classes
    mat = ds.materialize_rotations()
    assert mat.num_classes == 12 and mat.all_class_names == ds.all_class_names
    np.testing.assert_array_equal(mat.images[4 * 2 + 3], np.rot90(images[2], 3, axes=(1, 2)))


def test_normalisation_mean_std():
    ds = coded_dataset(num_classes=5, channels=3)
    plain = EpisodeSampler(ds, 2, 1, 1, 4)(jax.random.key(0))
    norm = EpisodeSampler(ds, 2, 1, 1, 4, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))(
        jax.random.key(0))
    want = (np.asarray(plain.support_inputs) - np.array([0.5, 0.4, 0.3])) / np.array([.2, .25, .5])
    np.testing.assert_allclose(norm.support_inputs, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="std must be positive"):
        EpisodeSampler(ds, 2, 1, 1, 4, std=0.0)


def test_class_splitter_is_the_sampler():
    ds = coded_dataset(num_classes=8, max_examples=6)
    b = class_splitter(ds, 5, num_train_per_class=2, num_test_per_class=4, meta_batch_size=3)(
        jax.random.key(0))
    assert b.num_support == 10 and b.num_query == 20


def test_errors_name_problem_and_fix():
    ds = coded_dataset(num_classes=6, max_examples=10, counts=[10, 10, 10, 10, 10, 4])
    with pytest.raises(EpisodeConfigError, match="n_way=7 but the dataset has only 6 classes"):
        EpisodeSampler(ds, n_way=7, k_shot=1, n_query=1)
    with pytest.raises(EpisodeConfigError, match=r"= 5 examples per class.*'c5'.*"
                                                 r"drop_small_classes\(5\)"):
        EpisodeSampler(ds, n_way=2, k_shot=2, n_query=3)
    EpisodeSampler(ds.drop_small_classes(5), n_way=2, k_shot=2, n_query=3)
    with pytest.raises(EpisodeConfigError, match="k_shot must be a positive int"):
        EpisodeSampler(ds, n_way=2, k_shot=0, n_query=3)
    with pytest.raises(EpisodeConfigError, match=r"min_shot must be an int in \[1, k_shot=2\]"):
        EpisodeSpec(2, 2, 3, min_shot=3)
    with pytest.raises(ValueError, match="uint8"):
        ClassDataset(np.zeros((2, 2, 2, 2, 1), np.float32), [2, 2], ["a", "b"])


@pytest.mark.parametrize("population,max_size", [(7, 7), (500, 500)])
def test_sample_without_replacement_is_uniform(population, max_size):
    m, rows = 3, 8000
    x = np.asarray(sample_without_replacement(jax.random.key(0), jnp.full((rows,), population),
                                              m, max_size))
    assert ((x >= 0) & (x < population)).all()
    assert (x[:, 0] != x[:, 1]).all() and (x[:, 1] != x[:, 2]).all() and (x[:, 0] != x[:, 2]).all()
    for pos in range(m):  # every position is uniform over the population
        counts = np.bincount(x[:, pos], minlength=population)
        expected = rows / population
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < population + 6 * np.sqrt(2 * population), chi2


def test_from_labeled_and_class_lists_pad():
    images = np.arange(5 * 2 * 2, dtype=np.uint8).reshape(5, 2, 2)
    ds = ClassDataset.from_labeled(images, np.array([1, 0, 1, 1, 0]), ["a", "b"])
    assert ds.counts.tolist() == [2, 3] and ds.images.shape == (2, 3, 2, 2, 1)
    np.testing.assert_array_equal(ds.images[1, :, ..., 0], images[[0, 2, 3]])
    lists = ClassDataset.from_class_lists([images[:1], images[1:4]])
    assert lists.counts.tolist() == [1, 3] and (lists.images[0, 1:] == 0).all()
    assert ds.select_names(["b"]).counts.tolist() == [3]
    with pytest.raises(KeyError, match="not in this dataset"):
        ds.select_names(["zebra"])


def test_real_omniglot_sampler(omniglot_full):
    from metajax.data.omniglot import omniglot_split

    train = omniglot_split(omniglot_full, "vinyals", "train", rotations=True)
    sampler = EpisodeSampler(train, n_way=5, k_shot=5, n_query=15, meta_batch_size=4)
    b = sampler(jax.random.key(0)).validate()
    assert b.support_inputs.shape == (4, 25, 28, 28, 1)
    assert 0.0 < float(b.query_inputs.mean()) < 0.5 and float(b.query_inputs.max()) == 1.0
    with pytest.raises(EpisodeConfigError, match="k_shot \\+ n_query = 5 \\+ 16 = 21"):
        EpisodeSampler(train, n_way=5, k_shot=5, n_query=16)


@pytest.mark.parametrize("size", [5, 6])  # 25-byte rows (uint8 table), 36-byte rows (uint32 table)
def test_uint8_output_rotation_modes_and_normalize_images(size):
    ds = coded_dataset(num_classes=6, max_examples=7, size=size)
    rng = np.random.default_rng(1)
    images = ds.images.copy()
    images[..., 1:, :, :] = rng.integers(0, 256, images[..., 1:, :, :].shape, dtype=np.uint8)
    ds = ClassDataset(images, np.array([7, 5, 6, 7, 4, 7]), ds.class_names).with_rotations()
    kw = dict(n_way=5, k_shot=2, n_query=2, meta_batch_size=3, min_shot=1, min_query=1)
    key = jax.random.key(3)
    f32 = EpisodeSampler(ds, **kw)(key)
    fly = EpisodeSampler(ds, **kw, materialize_rotations=False)
    u8 = EpisodeSampler(ds, **kw, output_dtype="uint8")(key)
    u8_fly = EpisodeSampler(ds, **kw, output_dtype="uint8", materialize_rotations=False)(key)
    assert fly.materialize_rotations is False
    assert u8.support_inputs.dtype == jnp.uint8 and u8.query_inputs.shape == f32.query_inputs.shape
    for a, b in ((f32, fly(key)), (u8, u8_fly)):  # rotations stored or on the fly: same batch
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(x, y)
    for part in ("support", "query"):
        x8 = np.asarray(getattr(u8, f"{part}_inputs"))
        x32 = np.asarray(getattr(f32, f"{part}_inputs"))
        np.testing.assert_array_equal(x8, np.rint(x32 * 255).astype(np.uint8))
        np.testing.assert_array_equal(normalize_images(jnp.asarray(x8)), x32)  # bit-exact
        np.testing.assert_array_equal(getattr(u8, f"{part}_mask"), getattr(f32, f"{part}_mask"))
        np.testing.assert_array_equal(getattr(u8, f"{part}_targets"),
                                      getattr(f32, f"{part}_targets"))
    assert (np.asarray(u8.support_mask) == 0).any()  # imbalanced: masked slots are zero
    assert (np.asarray(u8.support_inputs)[np.asarray(u8.support_mask) == 0] == 0).all()
    np.testing.assert_allclose(normalize_images(u8.query_inputs, mean=0.5, std=0.25),
                               (np.asarray(f32.query_inputs) - 0.5) / 0.25, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="normalize_images"):
        EpisodeSampler(ds, **kw, output_dtype="uint8", mean=0.5)
    with pytest.raises(ValueError, match="output_dtype"):
        EpisodeSampler(ds, **kw, output_dtype="float16")


def test_sample_many_stacks_the_split_keys_batches():
    sampler = EpisodeSampler(coded_dataset(), n_way=4, k_shot=2, n_query=3, meta_batch_size=5,
                             output_dtype="uint8")
    key = jax.random.key(7)
    many = sampler.sample_many(key, 3)
    assert many.support_inputs.shape == (3, 5, 8, 6, 6, 1)
    for i, k in enumerate(jax.random.split(key, 3)):
        one = sampler(k)
        for x, y in zip(jax.tree_util.tree_leaves(many), jax.tree_util.tree_leaves(one)):
            np.testing.assert_array_equal(x[i], y)


def test_unrolled_threefry_bits_match_jax_random_bits():
    from metajax.data.episodes import _random_bits
    for key in (jax.random.key(11), jax.random.PRNGKey(12), jax.random.fold_in(jax.random.key(1), 3)):
        for size in (1, 7, 300):
            np.testing.assert_array_equal(_random_bits(key, size),
                                          jax.random.bits(key, (size,), jnp.uint32))
    rbg = jax.random.key(0, impl="rbg")  # other PRNG implementations take jax.random.bits
    np.testing.assert_array_equal(_random_bits(rbg, 5), jax.random.bits(rbg, (5,), jnp.uint32))
    sampler = EpisodeSampler(coded_dataset(), n_way=3, k_shot=1, n_query=2, meta_batch_size=4)
    assert sampler(rbg).query_inputs.shape == (4, 6, 6, 6, 1)


@pytest.mark.parametrize("output_dtype", ["uint8", "float32"])
def test_auto_layout_batches_equal_default_layout_and_traced_calls(output_dtype):
    ds = coded_dataset(num_classes=9, max_examples=8).with_rotations()
    kw = dict(n_way=4, k_shot=3, n_query=2, meta_batch_size=3, min_shot=1, output_dtype=output_dtype)
    fast = EpisodeSampler(ds, **kw, auto_layout=True)
    plain = EpisodeSampler(ds, **kw, auto_layout=False)
    assert fast.auto_layout and not plain.auto_layout and fast.table.dtype == jnp.uint8
    key = jax.random.key(5)
    want = plain(key)
    traced = jax.jit(fast)(key)  # inside a trace the default-layout jit is used
    vmapped = jax.vmap(fast)(jax.random.split(key, 2))
    for got in (fast(key), traced):
        for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(x, y)
    second = plain(jax.random.split(key, 2)[1])
    for got in (vmapped, fast.sample_many(key, 2), plain.sample_many(key, 2)):
        for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(second)):
            np.testing.assert_array_equal(x[1], y)
    # the auto-layout arrays are ordinary arrays to every consumer
    x = fast(key).support_inputs
    total = jax.jit(lambda v: v.astype(jnp.float32).sum())(x)
    np.testing.assert_allclose(total, np.asarray(want.support_inputs, np.float64).sum(), rtol=1e-6)
    np.testing.assert_array_equal(jnp.stack([x, x])[1], want.support_inputs)
    with pytest.raises(ValueError, match="materialize_rotations=True"):
        EpisodeSampler(ds, **kw, auto_layout=True, materialize_rotations=False)
