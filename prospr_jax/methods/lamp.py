"""LAMP: layer-adaptive magnitude-based pruning (Lee et al., ICLR 2021), a method and a density rule.

Within each layer, sort the magnitudes ascending; the LAMP score of entry ``u`` is
``s_u^2 / sum_{v >= u} s_v^2`` (its squared magnitude over the squared magnitudes of the entries not
smaller than it); then ONE global threshold over all layers. Every layer's largest entry scores 1,
so LAMP never empties a layer whose scores are not all zero. As a density rule
(``density_rule='lamp'``) any non-negative within-layer score stands in for the magnitude.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prospr_jax._src.masks import is_pruned_leaf
from prospr_jax._src.problem import PruningProblem
from prospr_jax._src.tree import PyTree, is_traced, named_leaves, names_in_order
from prospr_jax.methods.base import Method, register
from prospr_jax.methods.magnitude import magnitude_scores


def _lamp_leaf(score: jax.Array) -> jax.Array:
    flat = score.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    squared = jnp.square(flat[order])
    suffix = jnp.cumsum(squared[::-1])[::-1]  # sum_{v >= u} s_v^2 in ascending order
    lamp = jnp.where(suffix > 0, squared / jnp.where(suffix > 0, suffix, 1), 0)
    return jnp.zeros_like(lamp).at[order].set(lamp).reshape(score.shape)


def lamp_scores(scores: PyTree) -> PyTree:
    """LAMP scores (Lee et al., ICLR 2021) from within-layer scores.

    For every pruned leaf (``ndim >= 1``), flattened and sorted ascending with ties in flattening order
    (stable sort, as the authors' ``torch.sort``), ``lamp(u) = s_u^2 / sum_{v >= u} s_v^2``; entries whose
    suffix sum is 0 get 0. The paper's ``s`` is ``|w|`` (:func:`prospr_jax.methods.magnitude_scores`);
    here any non-negative within-layer score may stand in for ``|w|`` (``density_rule='lamp'``). Ranking
    the result with ONE global threshold (``scope='global'``) gives LAMP's layer densities. Every layer's
    largest entry scores 1, so LAMP never empties a layer whose scores are not all zero.

    Args:
      scores: a scores pytree (see :func:`prospr_jax.masks_from_scores`); must be non-negative (checked outside
        ``jit``).

    Returns:
      A scores pytree of the same structure, values in [0, 1]; 0-d leaves are passed through.
    """
    named = [(n, s) for n, s in named_leaves(scores) if is_pruned_leaf(s)]
    if not named:
        raise ValueError("`scores` has no leaf with ndim >= 1: nothing to prune")
    concrete = [(n, s) for n, s in named if not is_traced(s)]
    if concrete:
        negative = jax.device_get([jnp.any(jnp.asarray(s) < 0) for _, s in concrete])
        bad = [n for (n, _), neg in zip(concrete, negative) if neg]
        if bad:
            raise ValueError(
                f"LAMP squares the within-layer scores, so they must be non-negative (magnitudes); "
                f"negative scores in {names_in_order(bad)}"
            )
    return jax.tree_util.tree_map(lambda s: _lamp_leaf(jnp.asarray(s)) if is_pruned_leaf(s) else s, scores)


@register
class Lamp(Method):
    name = "lamp"
    paper = "Lee et al., ICLR 2021"
    idea = "|w_u|^2 / sum of |w_v|^2 over the layer's weights v not smaller than u; one global threshold"
    data = "none"
    cost = "one sort per layer"

    def score(self, problem: PruningProblem, options: object) -> PyTree:
        return lamp_scores(magnitude_scores(problem.params, problem.prunable_tree()))


__all__ = ["Lamp", "lamp_scores"]
