"""Meta-learning algorithms, each a thin layer over :mod:`metajax.core`."""

from metajax.algorithms.anil import ANIL
from metajax.algorithms.baseline import ClassifierBaseline, classifier_logits
from metajax.algorithms.distillation import distillation_accuracy, distillation_loss
from metajax.algorithms.imaml import IMAML
from metajax.algorithms.maml import MAML, init_inner_rates
from metajax.algorithms.matching import MatchingNet, attention_weights
from metajax.algorithms.maml_plus_plus import MAMLPlusPlus, cosine_adam, multi_step_loss_weights
from metajax.algorithms.meta_sgd import MetaSGD
from metajax.algorithms.protonet import ProtoNet, class_prototypes
from metajax.algorithms.pretrain import MultiTaskPretrain
from metajax.algorithms.reptile import Reptile
from metajax.algorithms.registry import algorithm_names, make_algorithm
