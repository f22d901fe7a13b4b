"""Random pruning at initialization (METHODS.md, "Magnitude and random").

Scores are i.i.d. uniform in [0, 1), drawn per layer from one PRNG key, so masks are seeded and
deterministic. The density rule is the caller's: one global threshold (every layer keeps close to the
same fraction), ``scope='layerwise'`` (exactly the same fraction), or ``density_rule='erk'``
(random-ERK, the baseline of RigL and of many pruning-at-init papers).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax.masks import scores_on_prunable
from prospr_jax.methods.magnitude import data_free_prunable
from prospr_jax.problem import PruningProblem
from prospr_jax.prunable import PrunableSpec, select_prunable
from prospr_jax.tree import PyTree


def random_scores(key: jax.Array, params: PyTree, prunable: PrunableSpec = None) -> PyTree:
    """Uniform [0, 1) scores on every pruned leaf, 0-d zero elsewhere.

    Leaf ``i`` (flattening order) draws from ``jax.random.fold_in(key, i)``, so a leaf's scores do not
    change when other leaves are added or excluded. Scores take the parameter's float dtype.

    Args:
      key: a ``jax.random`` key (typed or raw ``PRNGKey``).
      params: parameter pytree.
      prunable: which leaves are scored (see :func:`prospr_jax.prunable.select_prunable`).

    Returns:
      Scores pytree with ``params``' structure. Jittable.
    """
    selected = select_prunable(params, prunable)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    drawn = []
    for i, leaf in enumerate(leaves):
        dtype = jnp.result_type(leaf) if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) else jnp.float32
        drawn.append(jax.random.uniform(jax.random.fold_in(key, i), np.shape(leaf), dtype))
    return scores_on_prunable(jax.tree_util.tree_unflatten(treedef, drawn), selected)


def random_method(problem: PruningProblem, *, key: Optional[Any] = None, seed: Optional[int] = None) -> PyTree:
    """Registry adapter of ``'random'``: uniform scores from ``key``, else ``seed``, else
    ``problem.key``. With ``prune(..., density_rule='erk')`` this is random-ERK.

    There is no silent default key: a run that forgets its seed should fail, not quietly reuse seed 0.
    """
    if key is not None and seed is not None:
        raise ValueError("pass `key` or `seed` to 'random', not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"`seed` must be an int, got {seed!r}")
        key = jax.random.key(int(seed))
    if key is None:
        key = problem.key
    if key is None:
        raise ValueError("method 'random' needs a PRNG key: set `PruningProblem(key=...)` or pass `key=` or `seed=`")
    return random_scores(key, problem.params, data_free_prunable(problem, "random"))
