"""ResNet-12: the standard size, features mode, and the MAML meta-gradient on both conv paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metajax as mj
from metajax.models import ResNet12, init_resnet12
from metajax.models.conv4 import with_conv_impl


def test_standard_resnet12_has_the_published_size():
    shapes = jax.eval_shape(ResNet12(ways=None).init, jax.random.key(0), jnp.zeros((2, 84, 84, 3)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert count == 12_424_320  # widths 64-160-320-640, convs + BN, no head
    out = jax.eval_shape(lambda v, x: ResNet12(ways=None).apply(v, x), shapes,
                         jnp.zeros((7, 84, 84, 3)))
    assert out.shape == (7, 640)


@pytest.mark.slow  # about a minute of XLA compile on 2 CPU cores; Conv4 tests cover the layers
def test_small_resnet12_meta_gradient_agrees_across_conv_paths():
    apply_fn, params = init_resnet12(jax.random.key(0), ways=3, widths=(4, 6, 6, 8), image_size=16,
                                     conv_impl="lax")
    k1, k2 = jax.random.split(jax.random.key(1))
    batch = mj.TaskBatch(jax.random.normal(k1, (1, 6, 16, 16, 3)), jnp.tile(jnp.arange(3), (1, 2)),
                         jax.random.normal(k2, (1, 6, 16, 16, 3)), jnp.tile(jnp.arange(3), (1, 2)))
    inner = mj.InnerLoop(steps=1, learning_rate=0.1)

    def meta_grad(fn):
        return jax.jit(jax.grad(lambda p: mj.meta_batch_loss(p, batch, apply_fn=fn, loss_fn=mj.cross_entropy,
                                                     inner=inner)[0]))(params)

    reference = meta_grad(apply_fn)
    fast = meta_grad(with_conv_impl(apply_fn, "patches"))
    chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)
    jax.tree_util.tree_map(chex_close, fast, reference)
    assert float(jnp.abs(reference["head_kernel"]).sum()) > 0


def test_resnet12_bad_settings_are_named():
    with pytest.raises(ValueError, match="4 residual blocks"):
        init_resnet12(jax.random.key(0), widths=(8, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        init_resnet12(jax.random.key(0), image_size=8)
