"""Chen et al.'s Baseline / Baseline++: head fitting, prototype initialisation, learning."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax as mj
from metajax.data import ClassDataset, EpisodeSampler
from test_metric_learners import _separable_tasks

EMBED = lambda p, x: x @ p["w"]


def _params():
    return {"w": jax.random.normal(jax.random.key(1), (16, 8)) * 0.5}


def test_linear_head_fit_equals_gradient_descent_on_frozen_features():
    algo = mj.ClassifierBaseline(EMBED, num_classes=40,
                                 finetune=mj.InnerLoop(steps=7, learning_rate=0.3))
    meta = algo.init(_params(), feature_dim=8, key=jax.random.key(0))
    batch = _separable_tasks(jax.random.key(5), tasks=3)
    out = algo.evaluate(meta, batch)
    for t in range(3):
        fs, fq = EMBED(meta["model"], batch.support_inputs[t]), EMBED(meta["model"], batch.query_inputs[t])
        slots = batch.support_targets.shape[1]
        head = {"kernel": jnp.zeros((8, slots)), "bias": jnp.zeros(slots)}
        present = jnp.zeros(slots, bool).at[batch.support_targets[t]].set(True)
        logits = lambda h, f: f @ h["kernel"] + h["bias"] + jnp.where(present, 0.0, -1e9)
        loss = lambda h, f, y: jnp.mean(mj.cross_entropy(logits(h, f), y))
        grad = jax.jit(jax.grad(loss))
        for _ in range(7):
            g = grad(head, fs, batch.support_targets[t])
            head = jax.tree_util.tree_map(lambda a, b: a - 0.3 * b, head, g)
        np.testing.assert_allclose(out["loss"][t, -1], loss(head, fq, batch.query_targets[t]),
                                   rtol=1e-5)


def test_cosine_head_starts_as_a_cosine_prototype_classifier():
    batch = _separable_tasks(jax.random.key(6), tasks=8)
    meta = {"model": _params()}
    plus = mj.ClassifierBaseline(EMBED, num_classes=40, classifier="cosine",
                                 finetune=mj.InnerLoop(steps=3, learning_rate=0.1),
                                 metric_fns={"accuracy": mj.accuracy})
    proto = mj.ProtoNet(EMBED, distance="cosine", cosine_scale=plus.cosine_scale)
    np.testing.assert_allclose(plus.evaluate(meta, batch)["accuracy"][:, 0],
                               proto.evaluate(meta, batch)["accuracy"][:, 0])


def test_bad_classifier_settings_are_named():
    with pytest.raises(ValueError, match="classifier must be one of"):
        mj.ClassifierBaseline(EMBED, num_classes=4, classifier="rbf")
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        mj.ClassifierBaseline(EMBED, num_classes=1)


def test_sampler_dataset_labels_are_the_class_ids():
    images = np.arange(6)[:, None, None, None, None].repeat(4, 1).repeat(2, 2).repeat(2, 3)
    ds = ClassDataset(images.astype(np.uint8), np.full(6, 4), list("abcdef"))
    sampler = EpisodeSampler(ds, n_way=3, k_shot=1, n_query=2, meta_batch_size=4, labels="dataset",
                             output_dtype="uint8")
    batch = sampler(jax.random.key(0))
    # Every image of class c is filled with the value c, so pixels name the class.
    np.testing.assert_array_equal(batch.support_inputs[..., 0, 0, 0], batch.support_targets)
    np.testing.assert_array_equal(batch.query_inputs[..., 0, 0, 0], batch.query_targets)
    with pytest.raises(ValueError, match="labels must be 'episode'"):
        EpisodeSampler(ds, n_way=3, k_shot=1, n_query=2, labels="global")


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_classifier_baselines_learn_well_above_chance(classifier):
    algo = mj.ClassifierBaseline(EMBED, num_classes=40, classifier=classifier,
                                 finetune=mj.InnerLoop(steps=30, learning_rate=0.1),
                                 metric_fns={"accuracy": mj.accuracy})
    meta = algo.init(_params(), feature_dim=8, key=jax.random.key(3))
    optimizer = optax.adam(3e-2)
    state = mj.create_train_state(meta, optimizer, jax.random.key(2))
    sample = functools.partial(_separable_tasks, dataset_labels=True)
    loop = mj.make_train_loop(algo.meta_loss, optimizer, sample, steps_per_call=300)
    test_batch = _separable_tasks(jax.random.key(77), tasks=64)
    before = float(algo.evaluate(state.params, test_batch)["accuracy"][:, -1].mean())
    state, _ = loop(state)
    after = float(algo.evaluate(state.params, test_batch)["accuracy"][:, -1].mean())
    assert before < 0.5, before  # chance is 0.2
    assert after > 0.6 and after > before + 0.3, (before, after)
