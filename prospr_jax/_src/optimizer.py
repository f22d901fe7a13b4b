"""An optax transformation that keeps pruned weights at exactly zero.

``masked_optimizer(tx, masks)`` wraps any optax ``GradientTransformation``. (It is not
``optax.masked``, which applies ``tx`` to selected leaves and passes the others through unchanged:
here every leaf goes through ``tx`` and the pruned ENTRIES are never updated.) Its state holds the masks as arrays
(data, not compile-time constants: :func:`set_masks` swaps in a new mask without recompiling a jitted
train step) next to ``tx``'s own state. Each update

1. zeroes the incoming gradients of pruned weights, so momentum and Adam moments of pruned weights
   stay exactly zero (a weight revived by a later mask starts with clean statistics), then
2. runs ``tx`` (which may add weight decay, momentum, Adam scaling, schedules ...), then
3. zeroes the outgoing updates of pruned weights with ``where`` (not a product, so even an
   ``inf``/``NaN`` update of a pruned weight becomes ``0``).

Pruned weights that start at zero (``apply_masks(params, masks)``) therefore stay at exactly ``0.0``
under SGD + momentum, weight decay (coupled or decoupled) and AdamW.

Example::

    tx = masked_optimizer(optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)), masks)
    params = apply_masks(params, masks)
    opt_state = tx.init(params)
    ...
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from prospr_jax._src.masks import check_masks
from prospr_jax._src.tree import PyTree, named_leaves
from prospr_jax._src.validate import check_zero_one


class MaskedOptimizerState(NamedTuple):
    """State of :func:`masked_optimizer`: the masks (arrays) and the wrapped transformation's state."""

    masks: PyTree
    inner_state: Any


def _zero_pruned(tree: PyTree, masks: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x, m: jnp.where(jnp.asarray(m) != 0, x, jnp.zeros((), jnp.result_type(x))), tree, masks
    )


def masked_optimizer(inner: optax.GradientTransformation, masks: PyTree) -> optax.GradientTransformation:
    """Wrap ``inner`` so that weights where ``masks`` is 0 are never updated.

    Args:
      inner: any optax gradient transformation (``optax.sgd``, ``optax.adamw``, a chain, ...).
      masks: mask pytree with the params' structure (full-shape, channel ``[1,...,1,C]`` or 0-d
        leaves of 0s and 1s; see :func:`prospr_jax.masks_from_scores`). Values are checked here
        (concrete masks), shapes against the params in ``init``.

    Returns:
      A ``GradientTransformation`` whose state is a :class:`MaskedOptimizerState`. ``update`` accepts the
      extra keyword arguments of ``GradientTransformationExtraArgs`` and passes them to ``inner``.
    """
    check_zero_one(named_leaves(masks), "masks")
    masks = jax.tree_util.tree_map(jnp.asarray, masks)

    def init_fn(params: PyTree) -> MaskedOptimizerState:
        check_masks(masks, params)
        return MaskedOptimizerState(masks=masks, inner_state=inner.init(params))

    def update_fn(updates: PyTree, state: MaskedOptimizerState, params: PyTree | None = None, **extra_args: Any):
        updates = _zero_pruned(updates, state.masks)
        inner_tx = optax.with_extra_args_support(inner)
        updates, inner_state = inner_tx.update(updates, state.inner_state, params, **extra_args)
        return _zero_pruned(updates, state.masks), MaskedOptimizerState(masks=state.masks, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def set_masks(opt_state: Any, masks: PyTree) -> Any:
    """Replace the masks inside every :class:`MaskedOptimizerState` found in ``opt_state``.

    The new masks must have the same tree structure, shapes and dtypes as the old ones; then a
    jitted train step that takes ``opt_state`` as an argument runs with the new mask without being
    recompiled. The wrapped optimiser's state is kept (the statistics of weights pruned before are
    zero, so revived weights start clean).
    """
    check_zero_one(named_leaves(masks), "masks")
    found = [0]

    def replace(node: Any) -> Any:
        if isinstance(node, MaskedOptimizerState):
            old_leaves, old_def = jax.tree_util.tree_flatten(node.masks)
            new = jax.tree_util.tree_map(jnp.asarray, masks)
            new_leaves, new_def = jax.tree_util.tree_flatten(new)
            if new_def != old_def or any(
                (a.shape, a.dtype) != (b.shape, b.dtype) for a, b in zip(old_leaves, new_leaves)
            ):
                raise ValueError(
                    "`masks` must have the structure, shapes and dtypes of the masks already in `opt_state`"
                )
            found[0] += 1
            return MaskedOptimizerState(masks=new, inner_state=node.inner_state)
        return node

    out = jax.tree_util.tree_map(replace, opt_state, is_leaf=lambda x: isinstance(x, MaskedOptimizerState))
    if not found[0]:
        raise ValueError("`opt_state` holds no MaskedOptimizerState: build the optimiser with prospr_jax.masked_optimizer(...)")
    return out


def masks_of(opt_state: Any) -> PyTree:
    """The masks held by the (first) :class:`MaskedOptimizerState` in ``opt_state``."""
    hits = [
        node
        for node in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, MaskedOptimizerState))
        if isinstance(node, MaskedOptimizerState)
    ]
    if not hits:
        raise ValueError("`opt_state` holds no MaskedOptimizerState: build the optimiser with prospr_jax.masked_optimizer(...)")
    return hits[0].masks
