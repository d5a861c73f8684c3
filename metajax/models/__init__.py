"""Backbones (Flax) and the adapters that make them pure ``apply(params, x)`` functions."""

from metajax.models.functional import FunctionalModel, from_linen, from_nnx
from metajax.models.mlp import MLP, init_mlp
from metajax.models.conv4 import (Conv4, init_conv4, init_miniimagenet_conv4, init_omniglot_conv4,
                                  with_conv_impl)
from metajax.models.layers import batch_norm, conv2d, conv_bn_relu, resolve_conv_impl
from metajax.models.resnet12 import ResNet12, init_resnet12
