"""ResNet-12, the standard few-shot backbone for mini-ImageNet / CIFAR-FS (Flax linen).

Four residual blocks of widths ``(64, 160, 320, 640)`` (TADAM / MetaOptNet; the "wide" variant
used since Lee et al. 2019); each block is three [conv3x3 -> batch norm -> LeakyReLU(0.1)]
layers (the last without the activation), a 1x1 conv + batch norm shortcut, the sum, a
LeakyReLU and a 2x2 max-pool. 84x84 inputs give a 5x5x640 map, averaged to 640 features, then
an optional linear head (``ways=None``: features only, for ProtoNet / Baseline++).

Batch norm follows the library's MAML convention (see :mod:`metajax.models.conv4`): the
statistics of the current batch, always; no running averages. So the model is a pure
``apply(params, x)`` that the core differentiates to any order. DropBlock, which
MetaOptNet adds for long supervised training, is left out (it makes ``apply`` random).

Example:
  >>> import jax, jax.numpy as jnp
  >>> apply_fn, params = init_resnet12(jax.random.key(0), ways=5, widths=(8, 16, 16, 32),
  ...                                  image_size=16, conv_impl="lax")
  >>> jax.jit(apply_fn)(params, jnp.zeros((4, 16, 16, 3))).shape
  (4, 5)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metajax.models.functional import FunctionalModel
from metajax.models.layers import batch_norm, conv2d, max_pool2d


class ResidualBlock(nn.Module):
    """Three 3x3 conv + BN layers with a 1x1 conv + BN shortcut, LeakyReLU, 2x2 max-pool."""

    width: int
    conv_impl: str = "auto"
    negative_slope: float = 0.1
    bn_eps: float = 1e-5

    def _conv_bn(self, x, name: str, size: int):
        kernel = self.param(f"{name}_kernel", nn.initializers.kaiming_normal(),
                            (size, size, x.shape[-1], self.width))
        scale = self.param(f"{name}_bn_scale", nn.initializers.ones, (self.width,))
        shift = self.param(f"{name}_bn_bias", nn.initializers.zeros, (self.width,))
        y = conv2d(x, kernel, stride=1, padding=size // 2, impl=self.conv_impl)
        return batch_norm(y, scale, shift, eps=self.bn_eps)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = lambda v: nn.leaky_relu(v, self.negative_slope)
        y = act(self._conv_bn(x, "conv1", 3))
        y = act(self._conv_bn(y, "conv2", 3))
        y = self._conv_bn(y, "conv3", 3)
        y = act(y + self._conv_bn(x, "shortcut", 1))
        return max_pool2d(y, 2)


class ResNet12(nn.Module):
    """ResNet-12 with an optional linear head.

    Attributes:
      ways: output classes; ``None`` returns the pooled features (``widths[-1]`` per example).
      widths: channels of the four residual blocks.
      conv_impl: ``"auto"``, ``"patches"`` or ``"lax"`` (see :mod:`metajax.models.layers`).
    """

    ways: Optional[int] = 5
    widths: Sequence[int] = (64, 160, 320, 640)
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        for i, width in enumerate(self.widths):
            x = ResidualBlock(width, conv_impl=self.conv_impl, name=f"block{i}")(x)
        x = jnp.mean(x, axis=(1, 2))
        if self.ways is None:
            return x
        kernel = self.param("head_kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.ways))
        bias = self.param("head_bias", nn.initializers.zeros, (self.ways,))
        return x @ kernel + bias


def init_resnet12(key: jax.Array, ways: Optional[int] = 5,
                  widths: Sequence[int] = (64, 160, 320, 640), conv_impl: str = "auto",
                  image_size: int = 84, channels: int = 3) -> tuple[FunctionalModel, Any]:
    """``(apply_fn, params)`` of a :class:`ResNet12` on ``(N, image_size, image_size, channels)``."""
    if len(widths) != 4:
        raise ValueError(f"ResNet-12 has 4 residual blocks; got widths={tuple(widths)}.")
    if image_size < 16:
        raise ValueError(f"image_size={image_size} is too small for four 2x2 max-pools (>= 16).")
    module = ResNet12(ways=ways, widths=tuple(widths), conv_impl=conv_impl)
    variables = jax.jit(module.init)(key, jnp.zeros((2, image_size, image_size, channels)))
    return FunctionalModel(module, "linen"), variables["params"]
