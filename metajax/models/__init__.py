"""Backbones (Flax) and the adapters that make them pure ``apply(params, x)`` functions."""

from metajax.models.functional import FunctionalModel, from_linen, from_nnx
from metajax.models.mlp import MLP, init_mlp
