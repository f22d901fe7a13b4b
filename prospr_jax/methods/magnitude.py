"""Magnitude pruning at initialisation: score ``|theta|`` (a baseline of every pruning-at-init paper).

Global (one threshold over all layers, the default) or layerwise (``scope='layerwise'``) is the
caller's choice; LAMP-normalised magnitudes are the ``'lamp'`` method (:mod:`prospr_jax.methods.lamp`).
Data-free: the prunable selection needs no batch (see :meth:`prospr_jax.PruningProblem.prunable_tree`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prospr_jax._src.masks import scores_on_prunable
from prospr_jax._src.problem import PruningProblem
from prospr_jax._src.prunable import PrunableSpec, select_prunable
from prospr_jax._src.tree import PyTree
from prospr_jax.methods.base import Method, register


def magnitude_scores(params: PyTree, prunable: PrunableSpec = None) -> PyTree:
    """``|theta|`` on every pruned leaf, 0-d zero elsewhere.

    Args:
      params: parameter pytree.
      prunable: which leaves are scored: anything :func:`prospr_jax.select_prunable` takes (default
        Conv/Dense kernels), e.g. a bool pytree from ``problem.prunable_tree()``.

    Returns:
      Scores pytree with ``params``' structure. Jittable.
    """
    selected = select_prunable(params, prunable)
    return scores_on_prunable(jax.tree_util.tree_map(jnp.abs, params), selected)


@register
class Magnitude(Method):
    name = "magnitude"
    paper = "baseline"
    idea = "|theta_0|, global or layerwise"
    data = "none"
    cost = "one pass over the weights"

    def score(self, problem: PruningProblem, options: object) -> PyTree:
        return magnitude_scores(problem.params, problem.prunable_tree())


__all__ = ["Magnitude", "magnitude_scores"]
