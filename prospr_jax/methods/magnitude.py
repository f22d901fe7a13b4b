"""Magnitude pruning at initialization: score ``|theta|`` (METHODS.md, "Magnitude and random").

Global (one threshold over all layers) or layerwise (``scope='layerwise'``) is the caller's choice
through :func:`prospr_jax.masks_from_scores`; LAMP-normalised magnitude is
``lamp_scores(magnitude_scores(params))`` (registered as ``'lamp'``).

This module also holds :func:`data_free_prunable`, the prunable selection that data-free methods
(magnitude, random, LAMP, SynFlow) use: it needs no training batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prospr_jax.masks import scores_on_prunable
from prospr_jax.methods.densities import lamp_scores
from prospr_jax.problem import PruningProblem
from prospr_jax.prunable import PrunableSpec, forward_order, select_prunable
from prospr_jax.tree import PyTree


def magnitude_scores(params: PyTree, prunable: PrunableSpec = None) -> PyTree:
    """``|theta|`` on every pruned leaf, 0-d zero elsewhere.

    Args:
      params: parameter pytree.
      prunable: which leaves are scored: anything :func:`prospr_jax.prunable.select_prunable` takes
        (default Conv/Dense kernels), e.g. a bool pytree from ``problem.prunable_tree()``.

    Returns:
      Scores pytree with ``params``' structure. Jittable.
    """
    selected = select_prunable(params, prunable)
    return scores_on_prunable(jax.tree_util.tree_map(jnp.abs, params), selected)


def data_free_prunable(problem: PruningProblem, method: str) -> PyTree:
    """``problem.prunable_tree()`` without needing data when possible.

    ``exclude_first`` / ``exclude_last`` need the forward order of the layers: it is traced on batch 0
    when the problem has data, otherwise on an all-ones input through ``apply_fn`` (inference mode).
    """
    if not (problem.exclude_first or problem.exclude_last) or problem.batch_fn is not None:
        return problem.prunable_tree()
    if problem.apply_fn is None or problem.input_shape is None:
        raise ValueError(
            f"method {method!r} with exclude_first/exclude_last needs the layer order: give the "
            "PruningProblem a `batch_fn`, or `apply_fn` and `input_shape`"
        )
    x = jnp.ones((1, *problem.input_shape), jnp.float32)
    order = forward_order(lambda p: problem.apply_fn(p, problem.model_state, x, False), problem.params)
    return select_prunable(
        problem.params,
        problem.prunable,
        exclude_first=problem.exclude_first,
        exclude_last=problem.exclude_last,
        order=order,
    )


def magnitude_method(problem: PruningProblem) -> PyTree:
    """Registry adapter of ``'magnitude'``: ``|theta_0|`` on ``problem``'s pruned leaves (data-free)."""
    return magnitude_scores(problem.params, data_free_prunable(problem, "magnitude"))


def lamp_method(problem: PruningProblem) -> PyTree:
    """Registry adapter of ``'lamp'``: LAMP-normalised magnitudes (rank them globally)."""
    return lamp_scores(magnitude_method(problem))

