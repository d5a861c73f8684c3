"""Prototypical and Matching networks, and the distillation loss: math and learning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax as mj
from metajax.algorithms.protonet import class_prototypes


def test_prototypes_are_masked_class_means_and_logits_are_negative_squared_distances():
    emb = jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [9.0, 9.0]])
    labels = jnp.array([0, 0, 1, 1])
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])  # the last example is padding
    protos, present = class_prototypes(emb, labels, 4, mask)
    np.testing.assert_allclose(protos[:2], [[1.0, 0.0], [0.0, 4.0]])
    assert present.tolist() == [True, True, False, False]
    proto = mj.ProtoNet(lambda p, x: x)
    query = jnp.array([[1.0, 1.0]])
    logits = proto.logits({}, emb, labels, mask, query)
    np.testing.assert_allclose(logits[0, :2], [-1.0, -10.0])
    assert float(jnp.max(logits[0, 2:])) < -1e8  # absent classes can never win


def test_protonet_cosine_option_and_bad_distance():
    proto = mj.ProtoNet(lambda p, x: x, distance="cosine", cosine_scale=1.0)
    logits = proto.logits({}, jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([0, 1]), None,
                          jnp.array([[3.0, 3.0]]))
    np.testing.assert_allclose(logits[0], [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
    with pytest.raises(ValueError, match="distance must be"):
        mj.ProtoNet(lambda p, x: x, distance="manhattan")


def test_matching_attention_sums_to_one_and_ignores_masked_slots():
    key = jax.random.split(jax.random.key(0), 2)
    q, s = jax.random.normal(key[0], (5, 8)), jax.random.normal(key[1], (6, 8))
    mask = jnp.array([1, 1, 1, 1, 0, 0], jnp.float32)
    weights = mj.algorithms.attention_weights(q, s, mask)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(weights[:, 4:], 0.0)
    match = mj.MatchingNet(lambda p, x: x)
    logits = match.logits({}, s, jnp.array([0, 0, 1, 1, 2, 2]), mask, q)
    probs = jnp.exp(logits)
    np.testing.assert_allclose(probs[:, :2].sum(axis=1), 1.0, rtol=1e-5)  # class 2 is masked out


def _separable_tasks(key, tasks=16, ways=5, shots=2, query=4, dim=16, classes=40,
                     dataset_labels=False):
    """Classes differ only in 2 low-variance dimensions; the other 14 are loud noise.

    An untrained random projection mixes in the noise (near chance); a learned embedding
    that keeps the 2 informative dimensions classifies well.
    """
    means = jax.random.normal(jax.random.key(123), (classes, 2)) * 1.5
    k_cls, k_noise = jax.random.split(key)
    chosen = jax.vmap(lambda k: jax.random.choice(k, classes, (ways,), replace=False))(
        jax.random.split(k_cls, tasks))
    per_class = shots + query
    centres = jnp.repeat(means[chosen], per_class, axis=1)  # (T, ways*per_class, 2)
    noise = jax.random.normal(k_noise, centres.shape[:2] + (dim,))
    x = jnp.concatenate([centres + 0.3 * noise[..., :2], 4.0 * noise[..., 2:]], axis=-1)
    y = jnp.tile(jnp.repeat(jnp.arange(ways), per_class), (tasks, 1))
    if dataset_labels:  # the class ids, as EpisodeSampler(labels="dataset") gives them
        y = jnp.repeat(chosen, per_class, axis=1)
    x = x.reshape(tasks, ways, per_class, dim)
    y = y.reshape(tasks, ways, per_class)
    flat = lambda a, lo, hi: a[:, :, lo:hi].reshape((tasks, -1) + a.shape[3:])
    return mj.TaskBatch(flat(x, 0, shots), flat(y, 0, shots), flat(x, shots, None), flat(y, shots, None))


@pytest.mark.parametrize("learner", ["protonet", "matching", "matching_fce"])
def test_metric_learners_learn_well_above_chance(learner):
    embed = lambda p, x: x @ p["w"]
    params = {"w": jax.random.normal(jax.random.key(1), (16, 8)) * 0.5}
    algo = {"protonet": mj.ProtoNet(embed), "matching": mj.MatchingNet(embed, scale=10.0),
            "matching_fce": mj.MatchingNet(embed, full_context=True, scale=10.0)}[learner]
    meta = algo.init(params, embedding_dim=8) if learner == "matching_fce" else algo.init(params)
    optimizer = optax.adam(1e-2)
    state = mj.create_train_state(meta, optimizer, jax.random.key(2))
    loop = mj.make_train_loop(algo.meta_loss, optimizer, _separable_tasks, steps_per_call=150)
    test_batch = _separable_tasks(jax.random.key(77), tasks=64)
    before = float(algo.evaluate(state.params, test_batch)["accuracy"].mean())
    state, _ = loop(state)
    after = float(algo.evaluate(state.params, test_batch)["accuracy"].mean())
    assert before < 0.5, before  # chance is 0.2
    assert after > 0.6 and after > before + 0.3, (before, after)  # chance is 0.2


def test_joint_embedding_uses_one_batch_for_support_and_query():
    batch = _separable_tasks(jax.random.key(5), tasks=2)
    params = {"w": jax.random.normal(jax.random.key(1), (16, 8))}
    per_example = lambda p, x: x @ p["w"]  # no batch statistics: joint == separate
    batch_normed = lambda p, x: mj.models.layers.batch_norm(x @ p["w"], axes=(0,))
    for embed, same in ((per_example, True), (batch_normed, False)):
        separate = mj.ProtoNet(embed).evaluate({"model": params}, batch)["loss"]
        joint = mj.ProtoNet(embed, embed_jointly=True).evaluate({"model": params}, batch)["loss"]
        assert np.allclose(separate, joint, atol=1e-5) == same
    # Jointly, the support embeddings are normalised with the whole episode's statistics.
    task = jax.tree_util.tree_map(lambda x: x[0], mj.core.tasks.as_tasks(batch))
    both = batch_normed(params, jnp.concatenate([task.support_inputs, task.query_inputs]))
    n = task.support_inputs.shape[0]
    expected = mj.ProtoNet(batch_normed).logits({"model": params}, both[:n], task.support_targets,
                                                None, both[n:])
    np.testing.assert_allclose(
        mj.ProtoNet(batch_normed, embed_jointly=True).task_logits({"model": params}, task),
        expected, rtol=1e-5, atol=1e-5)


def test_distillation_loss_interpolates_hard_and_soft_terms():
    z_student = jnp.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    z_teacher = jnp.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    targets = {"labels": jnp.array([0, 1]), "teacher_logits": z_teacher}
    hard = optax.softmax_cross_entropy_with_integer_labels(z_student, targets["labels"])
    np.testing.assert_allclose(mj.algorithms.distillation_loss(2.0, 0.0)(z_student, targets), hard,
                               rtol=1e-6)
    t = 2.0
    p_t = jax.nn.softmax(z_teacher / t)
    kl = jnp.sum(p_t * (jnp.log(p_t) - jax.nn.log_softmax(z_student / t)), -1) * t * t
    np.testing.assert_allclose(mj.algorithms.distillation_loss(t, 1.0)(z_student, targets), kl, rtol=1e-5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mj.algorithms.distillation_loss(0.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        mj.algorithms.distillation_loss(2.0, 1.5)
