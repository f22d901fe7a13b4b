"""Random pruning at initialization: the baseline every pruning-at-init method must beat.

Scores are i.i.d. uniform in [0, 1), drawn per layer from one PRNG key, so masks are seeded and
deterministic. The density rule is the caller's: one global threshold (every layer keeps close to the
same fraction), ``scope='layerwise'`` (exactly the same fraction), or ``density_rule='erk'``
(random-ERK, the baseline of RigL and of many pruning-at-init papers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax._src.masks import scores_on_prunable
from prospr_jax._src.problem import PruningProblem
from prospr_jax._src.prunable import PrunableSpec, select_prunable
from prospr_jax._src.tree import PyTree
from prospr_jax._src.validate import check_int
from prospr_jax.methods.base import Method, register


def random_scores(key: jax.Array, params: PyTree, prunable: PrunableSpec = None) -> PyTree:
    """Uniform [0, 1) scores on every pruned leaf, 0-d zero elsewhere.

    Leaf ``i`` (flattening order) draws from ``jax.random.fold_in(key, i)``, so a leaf's scores do not
    change when other leaves are added or excluded. Scores take the parameter's float dtype.

    Args:
      key: a ``jax.random`` key (typed or raw ``PRNGKey``).
      params: parameter pytree.
      prunable: which leaves are scored (see :func:`prospr_jax.select_prunable`).

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


@dataclasses.dataclass(frozen=True)
class RandomOptions:
    """``key`` (a ``jax.random`` key) or ``seed`` (an int); neither: ``problem.key``."""

    key: Optional[Any] = None
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.key is not None and self.seed is not None:
            raise ValueError("pass `key` or `seed` to 'random', not both")
        if self.seed is not None:
            object.__setattr__(self, "seed", check_int(self.seed, "seed", low=0))


@register
class Random(Method):
    """Registry row of random pruning; with ``prune(..., density_rule='erk')`` this is random-ERK.

    There is no silent default key: a run that forgets its seed fails instead of quietly reusing seed 0.
    """

    name = "random"
    paper = "baseline"
    idea = "uniform random scores (seeded); random-ERK with density_rule='erk'"
    data = "none"
    cost = "one random draw per weight"
    Options = RandomOptions

    def requirements(self, options: RandomOptions) -> tuple[str, ...]:
        return ("key",) if options.key is None and options.seed is None else ()

    def score(self, problem: PruningProblem, options: RandomOptions) -> PyTree:
        key = options.key
        if options.seed is not None:
            key = jax.random.key(options.seed)
        if key is None:
            key = problem.key
        return random_scores(key, problem.params, problem.prunable_tree())


__all__ = ["Random", "RandomOptions", "random_scores"]
