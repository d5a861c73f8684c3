"""Meta-learning algorithms, each a thin layer over :mod:`metajax.core`."""

from metajax.algorithms.maml import MAML
from metajax.algorithms.pretrain import MultiTaskPretrain
