"""Build any algorithm by name, so every experiment offers the same ``--algo`` choices."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from metajax.algorithms.anil import ANIL
from metajax.algorithms.baseline import ClassifierBaseline
from metajax.algorithms.imaml import IMAML
from metajax.algorithms.maml import MAML
from metajax.algorithms.maml_plus_plus import MAMLPlusPlus
from metajax.algorithms.matching import MatchingNet
from metajax.algorithms.meta_sgd import MetaSGD
from metajax.algorithms.pretrain import MultiTaskPretrain
from metajax.algorithms.protonet import ProtoNet
from metajax.algorithms.reptile import Reptile
from metajax.core.inner_loop import InnerLoop

PyTree = Any


def _maml(fo: bool):
    def build(apply_fn, loss_fn, params, inner, **kw):
        return MAML(apply_fn, loss_fn, inner=dataclasses.replace(inner, first_order=fo), **kw)
    return build


GRADIENT_BASED: Mapping[str, Callable[..., Any]] = {
    "maml": _maml(False),
    "fomaml": _maml(True),
    "metasgd": lambda apply_fn, loss_fn, params, inner, **kw: MetaSGD(apply_fn, loss_fn, inner=inner, **kw),
    "anil": lambda apply_fn, loss_fn, params, inner, **kw: ANIL(apply_fn, loss_fn, params, inner=inner, **kw),
    "mamlpp": lambda apply_fn, loss_fn, params, inner, **kw: MAMLPlusPlus(apply_fn, loss_fn, inner=inner, **kw),
    "reptile": lambda apply_fn, loss_fn, params, inner, **kw: Reptile(apply_fn, loss_fn, inner=dataclasses.replace(inner, first_order=True), **kw),
    "imaml": lambda apply_fn, loss_fn, params, inner, **kw: IMAML(apply_fn, loss_fn, inner=inner, **kw),
    "pretrain": lambda apply_fn, loss_fn, params, inner, **kw: MultiTaskPretrain(apply_fn, loss_fn, inner=inner, **kw),
}

# Embedding-based learners: ``apply_fn`` is the embedding network; no inner loop.
METRIC_BASED: Mapping[str, Callable[..., Any]] = {
    "protonet": lambda apply_fn, loss_fn, params, inner, **kw: ProtoNet(apply_fn, loss_fn, **kw),
    "matchingnet": lambda apply_fn, loss_fn, params, inner, **kw: MatchingNet(apply_fn, loss_fn, **kw),
}


def _classifier(kind: str):
    def build(apply_fn, loss_fn, params, inner, **kw):
        return ClassifierBaseline(apply_fn, loss_fn=loss_fn, classifier=kind, finetune=inner, **kw)
    return build


# Chen et al.'s baselines: ``apply_fn`` is the embedding network, ``inner`` fits the new head.
CLASSIFIER_BASED: Mapping[str, Callable[..., Any]] = {
    "baseline": _classifier("linear"),
    "baselinepp": _classifier("cosine"),
}
ALL = {**GRADIENT_BASED, **METRIC_BASED, **CLASSIFIER_BASED}

# Fields each algorithm accepts beyond (apply_fn, loss_fn, inner).
_ACCEPTS = {
    "maml": {"metric_fns", "task_map", "adapt_mask"},
    "fomaml": {"metric_fns", "task_map", "adapt_mask"},
    "metasgd": {"metric_fns", "task_map", "adapt_mask"},
    "anil": {"metric_fns", "task_map"},
    "mamlpp": {"metric_fns", "task_map", "adapt_mask", "msl_anneal_steps", "first_order_steps",
               "per_step_bn", "bn_running_stats", "eval_bn_mode"},
    "reptile": {"metric_fns", "task_map"},
    "imaml": {"metric_fns", "task_map", "lam", "cg_steps"},
    "pretrain": {"metric_fns", "task_map"},
    "protonet": {"task_map", "distance", "embed_jointly"},
    "matchingnet": {"task_map", "full_context", "scale", "embed_jointly"},
    "baseline": {"metric_fns", "task_map", "num_classes"},
    "baselinepp": {"metric_fns", "task_map", "num_classes"},
}


def algorithm_names(kind: str = "all") -> tuple[str, ...]:
    """Names accepted by :func:`make_algorithm`: ``"all"``, ``"gradient"``, ``"metric"`` or
    ``"classifier"`` (Chen et al.'s baselines)."""
    return tuple({"all": ALL, "gradient": GRADIENT_BASED, "metric": METRIC_BASED,
                  "classifier": CLASSIFIER_BASED}[kind])


def make_algorithm(name: str, apply_fn, loss_fn, params: PyTree, inner: InnerLoop, **options):
    """The algorithm ``name`` over ``apply_fn``/``loss_fn``; ``options`` it does not use are dropped.

    Example:
      >>> import jax, metajax as mj
      >>> model, params = mj.models.init_mlp(jax.random.key(0))
      >>> type(make_algorithm("metasgd", model, mj.mse, params, mj.InnerLoop())).__name__
      'MetaSGD'
    """
    if name not in ALL:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALL)}.")
    kwargs = {k: v for k, v in options.items() if k in _ACCEPTS[name] and v is not None}
    return ALL[name](apply_fn, loss_fn, params, inner, **kwargs)
