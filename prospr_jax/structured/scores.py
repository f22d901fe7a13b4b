"""Channel scores: one score per channel group, ranked globally; masks that make channels dead.

The channel mask ``c_g`` of group ``g`` multiplies every member of the group: the output columns of
its kernels, their biases and their BatchNorm scales and shifts (``w_0 = c * theta_0`` on those
entries). Scaling only the kernel column would not do: a BatchNorm in training mode normalises the
column's scale away, so ``dL/dc`` through the kernel alone is (up to epsilon) zero.

Scores (higher = keep):

* ``'prospr'``: ``|dL(w_M)/dc_g|`` at ``c = 1`` through the M inner steps. Since ``c_g`` is one
  scalar shared by all members, the chain rule gives the SUM of the members' derivatives,
  ``dL/dc_g = sum_{e in g} theta_0[e] * dL(w_M)/dw_0[e]``, and the score is its absolute value (not
  the sum of absolute values: members whose effects cancel do cancel). The meta-gradient is
  :func:`prospr_jax.meta_gradient`, so every ProsPr option applies.
* ``'snip'``: the same with ``M = 0`` on one batch: ``|sum_{e in g} theta[e] * dL/dtheta[e]|``.
* ``'magnitude'``: the L1 norm of the group's filters (Li et al., ICLR 2017), summed over the
  group's kernels: ``sum_{kernels k in g} sum |theta_k[..., c]|``.
* ``'random'``: uniform [0, 1) per group, from a key.

Channel sparsity is the fraction of the prunable GROUPS removed: ``ceil((1 - s) * G_p)`` of the
``G_p`` prunable groups are kept, ranked globally (ties: the earlier group is kept).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax._src.losses import LossFn
from prospr_jax._src.masks import masks_from_scores
from prospr_jax._src.problem import PruningProblem
from prospr_jax._src.tree import PyTree, named_leaves
from prospr_jax._src.validate import check_choice, check_sparsity
from prospr_jax.methods.base import PruneResult
from prospr_jax.methods.prospr import ProsPrOptions, meta_gradient, stack_batches
from prospr_jax.methods.random_pruning import RandomOptions
from prospr_jax.structured.groups import ChannelGroups, channel_groups, model_channel_groups

CHANNEL_METHODS = ("prospr", "snip", "magnitude", "random")
GRANULARITIES = ("weight", "channel")


def _named(tree: PyTree) -> dict[str, Any]:
    return dict(named_leaves(tree))


def channel_meta_gradient(
    loss_fn: LossFn, params: PyTree, batches: PyTree, groups: ChannelGroups, **prospr_options: Any
) -> jax.Array:
    """``dL(w_M; batch_M)/dc_g`` at ``c = 1`` for every group (signed, ``[G]``).

    ``prospr_options`` are :func:`prospr_jax.meta_gradient`'s (``num_steps``, ``lr``, ``momentum``,
    ``weight_decay``, ``first_order``, ``single_batch``, ...); ``num_steps=0`` gives SNIP's
    derivative. See the module docstring for the rule.
    """
    grads = meta_gradient(loss_fn, params, batches, **prospr_options)
    contrib = jax.tree_util.tree_map(lambda p, g: p * g, params, grads)
    return groups.group_sums(_named(contrib))


def channel_prospr_scores(
    loss_fn: LossFn, params: PyTree, batches: PyTree, groups: ChannelGroups, **prospr_options: Any
) -> jax.Array:
    """ProsPr channel scores ``|dL(w_M)/dc_g|``, ``[G]`` (see :func:`channel_meta_gradient`)."""
    return jnp.abs(channel_meta_gradient(loss_fn, params, batches, groups, **prospr_options))


def channel_snip_scores(loss_fn: LossFn, params: PyTree, batch: Any, groups: ChannelGroups) -> jax.Array:
    """SNIP channel scores ``|sum_{e in g} theta[e] dL/dtheta[e]|`` on one batch, ``[G]``."""
    return channel_prospr_scores(loss_fn, params, batch, groups, num_steps=0, single_batch=True)


def channel_magnitude_scores(params: PyTree, groups: ChannelGroups) -> jax.Array:
    """L1 norm of each group's filters (summed over its kernels), ``[G]``."""
    return groups.group_sums(_named(jax.tree_util.tree_map(jnp.abs, params)), kinds=("out",))


def channel_random_scores(key: jax.Array, groups: ChannelGroups) -> jax.Array:
    """Uniform [0, 1) per group, ``[G]``."""
    return jax.random.uniform(key, (groups.num_groups,))


def group_mask(scores: Any, groups: ChannelGroups, sparsity: float) -> jax.Array:
    """``[G]`` 0/1: the top ``ceil((1 - sparsity) * G_p)`` prunable groups by ``scores`` kept, every
    protected group kept.

    Raises:
      ValueError: a bad sparsity, non-finite scores or a model without prunable groups.
    """
    sparsity = check_sparsity(sparsity)
    scores = jnp.asarray(scores)
    if scores.shape != (groups.num_groups,):
        raise ValueError(f"`scores` must have one entry per channel group, shape ({groups.num_groups},); got {scores.shape}")
    idx = np.flatnonzero(groups.prunable)
    if idx.size == 0:
        raise ValueError("the model has no prunable channel group (every channel is protected)")
    kept = masks_from_scores({"channels": scores[idx]}, sparsity)["channels"]
    return jnp.ones((groups.num_groups,), kept.dtype).at[idx].set(kept)


def _options(method: str, options: dict) -> Any:
    if method == "prospr":
        return ProsPrOptions(**options)
    if method == "random":
        return RandomOptions(**options)
    if options:
        raise ValueError(f"channel method {method!r} takes no options, got {sorted(options)}")
    return None


def problem_groups(problem: PruningProblem) -> ChannelGroups:
    """The channel groups of a problem's model: traced through ``loss_fn`` on batch 0, or, without
    data, through ``apply_fn`` on an all-ones input of ``input_shape`` (inference mode)."""
    prunable = problem.prunable_tree()
    if problem.batch_fn is not None:
        return channel_groups(problem.loss_fn, problem.params, problem.batch(0), prunable=prunable)
    if problem.apply_fn is None or problem.input_shape is None:
        raise ValueError("channel groups need the model: give the PruningProblem a `batch_fn`, or `apply_fn` and `input_shape`")
    x = jnp.ones((1, *problem.input_shape), jnp.float32)
    return model_channel_groups(problem.apply_fn, problem.params, problem.model_state, x, prunable=prunable)


def channel_scores(method: str, problem: PruningProblem, groups: ChannelGroups, **options: Any) -> jax.Array:
    """The ``[G]`` channel scores of ``method`` (one of :data:`CHANNEL_METHODS`) on ``problem``.

    ``options``: ProsPr's options for ``'prospr'`` (:class:`prospr_jax.methods.ProsPrOptions`),
    ``key``/``seed`` for ``'random'`` (``problem.key`` otherwise), none for the others.
    """
    check_choice(method, "method", CHANNEL_METHODS)
    o = _options(method, dict(options))
    if method == "prospr":
        batches = problem.batch(0) if o.single_batch else stack_batches([problem.batch(i) for i in range(o.num_steps + 1)])
        return channel_prospr_scores(problem.loss_fn, problem.params, batches, groups, **dataclasses.asdict(o))
    if method == "snip":
        return channel_snip_scores(problem.loss_fn, problem.params, problem.batch(0), groups)
    if method == "magnitude":
        return channel_magnitude_scores(problem.params, groups)
    key = o.key if o.key is not None else (jax.random.key(o.seed) if o.seed is not None else problem.key)
    if key is None:
        raise ValueError("channel method 'random' needs a key: pass `key=` or `seed=`, or set `problem.key`")
    return channel_random_scores(key, groups)


def prune_channels(
    method: str, problem: PruningProblem, sparsity: float, *, groups: Optional[ChannelGroups] = None, **options: Any
) -> PruneResult:
    """Channel pruning of ``problem`` by ``method`` at channel ``sparsity``.

    Returns:
      A :class:`prospr_jax.methods.PruneResult` whose ``masks`` make the dropped groups dead
      (:meth:`ChannelGroups.leaf_masks`: kernel columns, biases, BatchNorm scales and shifts) and
      whose ``extras`` hold ``granularity='channel'``, the group counts and the kept groups.
    """
    check_choice(method, "method", CHANNEL_METHODS)
    sparsity = check_sparsity(sparsity)
    began = time.perf_counter()
    groups = problem_groups(problem) if groups is None else groups
    scores = channel_scores(method, problem, groups, **options)
    keep = group_mask(scores, groups, sparsity)
    masks = groups.leaf_masks(keep, problem.params)
    masks = jax.block_until_ready(masks)
    kept = int(np.sum(np.asarray(keep)[groups.prunable] != 0))
    return PruneResult(
        masks=masks,
        start_params=problem.params,
        scores=None,
        method=method,
        options=dict(options),
        sparsity=sparsity,
        achieved_sparsity=1.0 - kept / groups.num_prunable,
        extras={"granularity": "channel", "groups": groups.num_groups, "prunable_groups": groups.num_prunable,
                "kept_groups": kept, "group_scores": np.asarray(scores)},
        seconds=time.perf_counter() - began,
    )


__all__ = [
    "CHANNEL_METHODS",
    "GRANULARITIES",
    "channel_magnitude_scores",
    "channel_meta_gradient",
    "channel_prospr_scores",
    "channel_random_scores",
    "channel_scores",
    "channel_snip_scores",
    "group_mask",
    "problem_groups",
    "prune_channels",
]
