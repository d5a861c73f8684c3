"""The Conv4 backbones of few-shot learning (Flax linen).

:class:`Conv4` covers both standard variants:

* **Omniglot** (``init_omniglot_conv4``): 4 x [conv3x3, 64 filters, stride 2, pad 1
  -> batch norm -> ReLU], 28x28x1 input (28 -> 14 -> 7 -> 4 -> 2), spatial mean, linear
  head. The same network and initialisation as learn2learn's ``OmniglotCNN``
  (112,261 parameters for 5 ways): xavier-uniform conv weights and zero conv biases,
  batch-norm scales ~ U(0, 1) and zero shifts, head weights ~ N(0, 1) and zero bias.
* **mini-ImageNet** (``init_miniimagenet_conv4``): 4 x [conv3x3, 32 filters, stride 1,
  pad 1 -> batch norm -> ReLU -> 2x2 max-pool], 84x84x3 input (84 -> 42 -> 21 -> 10 -> 5),
  flatten (800 features), linear head; learn2learn's ``MiniImagenetCNN``.

**Batch norm, the MAML convention.** Every batch-norm layer normalises with the mean
and variance of the batch it is applied to, always: in the inner loop (the support
set's statistics), for the query loss (the query set's statistics), and at
meta-test/evaluation time alike. There are no running averages, so nothing leaks
across tasks or from meta-training into meta-testing, and the model is a pure function
``apply(params, x)`` that the core can differentiate to second order. The batch-norm
scale and shift are ordinary parameters: they are meta-learned and adapted in the inner
loop like the conv weights. (This is what learn2learn's MAML examples effectively do:
their BN modules run in training mode and keep running statistics only as an unused
side effect.) A consequence to know: predictions for one example depend on the other
examples of the same batch, so evaluate on whole query sets, not example by example.

The convolutions go through :func:`metajax.models.layers.conv2d`; ``conv_impl``
selects ``"lax"`` / ``"patches"`` / ``"fused"`` / ``"auto"`` (fused on CPU, lax on
accelerators).

Example:
  >>> import jax, jax.numpy as jnp
  >>> apply_fn, params = init_omniglot_conv4(jax.random.key(0), ways=5)
  >>> apply_fn(params, jnp.zeros((10, 28, 28, 1))).shape
  (10, 5)
  >>> embed_fn, body = init_omniglot_conv4(jax.random.key(0), ways=None)  # no head
  >>> embed_fn(body, jnp.zeros((10, 28, 28, 1))).shape
  (10, 64)
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from metajax.models.functional import FunctionalModel
from metajax.models.layers import conv_bn_relu, conv_bn_statistics, max_pool2d

BN_MODES = ("batch", "running", "collect")
POOLS = ("auto", "mean", "flatten")


def _uniform01(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype)


class Conv4(nn.Module):
    """Four conv -> batch-norm -> ReLU blocks and a linear head.

    Attributes:
      ways: number of output classes; ``None``: no head, the network returns its features
        (64 per example for Omniglot, 800 for mini-ImageNet), the embedding of
        Prototypical/Matching networks and of the classifier baselines.
      hidden: filters per conv layer (64 for Omniglot, 32 for mini-ImageNet).
      layers: number of conv blocks.
      max_pool: ``False``: stride-2 convs and a spatial mean before the head (Omniglot).
        ``True``: stride-1 convs, 2x2 max-pool after each block, flatten (mini-ImageNet).
      pool: how the last feature map becomes the feature vector: ``"mean"`` (spatial
        mean, ``hidden`` features), ``"flatten"`` (``H*W*hidden`` features, keeps where
        each feature is), or ``"auto"``: ``"flatten"`` with ``max_pool``, else ``"mean"``
        (the two published networks). With ``ways=None``, ``"flatten"`` on the Omniglot
        network gives a 256-d embedding (2x2x64) instead of 64-d, at no extra compute.
      conv_impl: ``"auto"``, ``"fused"``, ``"patches"`` or ``"lax"`` (see
        :mod:`metajax.models.layers`).
      bn_eps: batch-norm epsilon (PyTorch's default 1e-5).
      running_stats: also create batch-norm running statistics ``bn{i}_mean`` (zeros) and
        ``bn{i}_var`` (ones) as parameters. They are state, not weights: in ``"batch"``
        mode the output does not depend on them (so their gradient is zero), and an
        algorithm updates them by averaging (MAML++'s per-step running statistics).
      bn_mode: ``"batch"`` (default: normalise with the batch's statistics, the MAML
        convention), ``"running"`` (normalise with ``bn{i}_mean`` / ``bn{i}_var``; needs
        ``running_stats``), or ``"collect"`` (run as ``"batch"`` but return
        ``{"bn{i}": (mean, unbiased var)}`` of every batch-norm input instead of the output).
    """

    ways: Optional[int] = 5
    hidden: int = 64
    layers: int = 4
    max_pool: bool = False
    pool: str = "auto"
    conv_impl: str = "auto"
    bn_eps: float = 1e-5
    running_stats: bool = False
    bn_mode: str = "batch"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {self.bn_mode!r}.")
        if self.bn_mode == "running" and not self.running_stats:
            raise ValueError("bn_mode='running' needs running_stats=True (the model has no "
                             "bn{i}_mean / bn{i}_var to normalise with).")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}.")
        if x.ndim == 3:  # (N, H, W) grayscale
            x = x[..., None]
        stride = 1 if self.max_pool else 2
        collected = {}
        for i in range(self.layers):
            cin = x.shape[-1]
            kernel = self.param(f"conv{i}_kernel", nn.initializers.xavier_uniform(),
                                (3, 3, cin, self.hidden))
            bias = self.param(f"conv{i}_bias", nn.initializers.zeros, (self.hidden,))
            scale = self.param(f"bn{i}_scale", _uniform01, (self.hidden,))
            shift = self.param(f"bn{i}_bias", nn.initializers.zeros, (self.hidden,))
            stats = None
            if self.running_stats:
                running = (self.param(f"bn{i}_mean", nn.initializers.zeros, (self.hidden,)),
                           self.param(f"bn{i}_var", nn.initializers.ones, (self.hidden,)))
                stats = running if self.bn_mode == "running" else None
            if self.bn_mode == "collect":
                collected[f"bn{i}"] = conv_bn_statistics(x, kernel, bias, stride=stride,
                                                         padding=1, impl=self.conv_impl)
            x = conv_bn_relu(x, kernel, bias, scale, shift, stride=stride, padding=1,
                             eps=self.bn_eps, impl=self.conv_impl, stats=stats)
            if self.max_pool:
                x = max_pool2d(x, 2)
        if self.bn_mode == "collect":
            return collected
        if self.pool == "flatten" or (self.pool == "auto" and self.max_pool):
            x = x.reshape(x.shape[0], -1)
        else:
            x = jnp.mean(x, axis=(1, 2))
        if self.ways is None:
            return x
        kernel = self.param("head_kernel", nn.initializers.normal(1.0), (x.shape[-1], self.ways))
        bias = self.param("head_bias", nn.initializers.zeros, (self.ways,))
        return x @ kernel + bias


def init_omniglot_conv4(key: jax.Array, ways: Optional[int] = 5, hidden: int = 64,
                        conv_impl: str = "auto", image_size: int = 28,
                        channels: int = 1, running_stats: bool = False, pool: str = "mean"
                        ) -> tuple[FunctionalModel, Any]:
    """learn2learn's ``OmniglotCNN`` as ``(apply_fn, params)`` (inputs ``(N, 28, 28, 1)``).

    ``pool="flatten"`` keeps the 2x2 spatial layout of the last block (see :class:`Conv4`).
    """
    module = Conv4(ways=ways, hidden=hidden, max_pool=False, pool=pool, conv_impl=conv_impl,
                   running_stats=running_stats)
    return init_conv4(module, key, (image_size, image_size, channels))


def init_miniimagenet_conv4(key: jax.Array, ways: Optional[int] = 5, hidden: int = 32,
                            conv_impl: str = "auto", image_size: int = 84,
                            channels: int = 3) -> tuple[FunctionalModel, Any]:
    """learn2learn's ``MiniImagenetCNN`` as ``(apply_fn, params)`` (inputs ``(N, 84, 84, 3)``)."""
    module = Conv4(ways=ways, hidden=hidden, max_pool=True, conv_impl=conv_impl)
    return init_conv4(module, key, (image_size, image_size, channels))


def init_conv4(module: Conv4, key: jax.Array,
               input_shape: tuple[int, int, int]) -> tuple[FunctionalModel, Any]:
    """``(apply_fn, params)`` for any :class:`Conv4` on ``(H, W, C)`` inputs (jitted init)."""
    variables = jax.jit(module.init)(key, jnp.zeros((2,) + tuple(input_shape)))
    return FunctionalModel(module, "linen"), variables["params"]


def with_conv_impl(apply_fn: FunctionalModel, conv_impl: str) -> FunctionalModel:
    """The same model (same params) with another convolution implementation."""
    import dataclasses
    module = apply_fn.module.clone(conv_impl=conv_impl)
    return dataclasses.replace(apply_fn, module=module)


def with_bn_mode(apply_fn: FunctionalModel, bn_mode: str) -> FunctionalModel:
    """The same model (same params) with another batch-norm mode (see :class:`Conv4`)."""
    import dataclasses
    module = getattr(apply_fn, "module", None)
    if not hasattr(module, "bn_mode"):
        raise ValueError(f"with_bn_mode needs a Conv4-like FunctionalModel with a bn_mode "
                         f"attribute; got {apply_fn!r}.")
    return dataclasses.replace(apply_fn, module=module.clone(bn_mode=bn_mode))
