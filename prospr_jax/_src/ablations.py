"""Sanity-check ablations of a pruning mask (Frankle et al., ICLR 2021, "Pruning neural networks at
initialization: why are we missing the mark?").

* :func:`shuffle_masks`: every pruned layer's mask entries permuted at random: the same kept count
  in every layer, the positions forgotten. A method whose accuracy survives this learned only the
  layer densities.
* :func:`inverted_scores`: the scores negated, so that any top-k rule keeps the LOWEST-scored
  weights. A method whose accuracy survives this did not rank weights usefully.

The third check, reinitialisation (same mask, new theta_0), needs the model's initialiser and lives
in the experiment harness.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prospr_jax._src.masks import is_pruned_leaf
from prospr_jax._src.tree import PyTree


def shuffle_masks(key: jax.Array, masks: PyTree) -> PyTree:
    """Each pruned leaf's mask entries permuted uniformly at random (over the whole leaf).

    Leaf ``i`` (flattening order) is permuted with ``jax.random.fold_in(key, i)``. 0-d leaves (not
    pruned) are returned unchanged, so every layer keeps exactly its kept count and the mask keeps
    its dtype and shape. A channel mask (``[1, ..., C]``) is permuted over its channels.

    Args:
      key: a ``jax.random`` key.
      masks: a mask pytree (see :mod:`prospr_jax._src.masks`).

    Returns:
      The shuffled masks, same structure, shapes and dtypes.
    """
    leaves, treedef = jax.tree_util.tree_flatten(masks)
    out = []
    for i, leaf in enumerate(leaves):
        if not is_pruned_leaf(leaf):
            out.append(leaf)
            continue
        flat = jnp.reshape(leaf, (-1,))
        perm = jax.random.permutation(jax.random.fold_in(key, i), flat.shape[0])
        out.append(jnp.reshape(flat[perm], jnp.shape(leaf)))
    return jax.tree_util.tree_unflatten(treedef, out)


def inverted_scores(scores: PyTree) -> PyTree:
    """``-scores`` on every pruned leaf (0-d leaves unchanged): a top-k rule applied to the result keeps
    the k LOWEST-scored entries of ``scores`` (ties, as everywhere, to the lower index)."""
    return jax.tree_util.tree_map(lambda s: -s if is_pruned_leaf(s) else s, scores)


__all__ = ["inverted_scores", "shuffle_masks"]
