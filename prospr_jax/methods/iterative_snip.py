"""Iterative SNIP and FORCE (de Jorge et al., "Progressive Skeletonization", ICLR 2021).

Both prune progressively over T rounds to the densities ``d_1 > d_2 > ... > d_T = d`` of
:func:`prospr_jax.methods.density_schedule` (``d_t = d ** (t / T)``, exponential, the default; or
linear ``d_t = 1 - (1 - d) t / T``). Round t scores the network masked by the previous round's mask
``m_{t-1}`` (``m_0`` = dense) on a fresh batch and keeps the top ``ceil(d_t N)``:

* Iter-SNIP: score ``|w * dL/dw|`` at ``w = theta_0 * m_{t-1}``; pruned weights stay pruned (their
  score is forced below every live weight, as the official code sets them to the minimum saliency),
  so the masks are monotone.
* FORCE: score ``|theta_0 * dL/dw|`` evaluated at ``w = theta_0 * m_{t-1}`` for ALL weights, so a
  pruned weight can come back (its ORIGINAL value times the gradient at its zeroed position).

Defaults follow the official code: T = 60 rounds (the README's command for CIFAR-10/100,
Tiny-ImageNet and ImageNet; the argument parser's own default is 10), exponential schedule, one batch
per round (``num_batches=1`` for CIFAR-10; the README uses 10 for CIFAR-100 and 20 for Tiny-ImageNet:
``batches_per_round``). Each round's gradient is averaged over its batches. The official code ranks
with one global threshold; ``density_rule``/``scope``/``min_per_layer`` are applied at every round.

The per-round scoring is ONE jitted function whose inputs are the params, the mask and the batches
(masks are data), so T rounds compile once. Only the top-k selection of
:func:`prospr_jax.masks_from_scores` runs on the host each round (its k changes every round).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax.masks import LayerCollapseWarning, apply_masks, check_sparsity, dense_masks, is_pruned_leaf
from prospr_jax.methods.densities import density_schedule, rule_masks
from prospr_jax.problem import PruningProblem
from prospr_jax.prospr import LossFn, resolve_prunable, stack_batches
from prospr_jax.prunable import PrunableSpec
from prospr_jax.tree import PyTree

DEFAULT_ROUNDS = 60

_tmap = jax.tree_util.tree_map


@functools.partial(jax.jit, static_argnames=("loss_fn", "revive"))
def masked_gradient_scores(loss_fn: LossFn, params: PyTree, masks: PyTree, batches: PyTree, *, revive: bool) -> PyTree:
    """One round of Iter-SNIP (``revive=False``) or FORCE (``revive=True``) scoring.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: initial parameters ``theta_0`` (unmasked).
      masks: the previous round's mask pytree (full-shape 0/1 leaves on pruned leaves, 0-d elsewhere).
      batches: pytree whose leaves have a leading axis of K >= 1 batches; the gradient is their mean.
      revive: FORCE scoring.

    Returns:
      Scores pytree shaped like ``masks``: Iter-SNIP ``|w * g|`` on live weights and ``-1`` on pruned
      ones; FORCE ``|theta_0 * g|`` everywhere; ``g = dL/dw`` at ``w = theta_0 * masks``.
    """
    w = apply_masks(params, masks)
    grad_fn = jax.grad(loss_fn)

    count = jax.tree_util.tree_leaves(batches)[0].shape[0]
    # A Python loop (unrolled), not lax.scan: on XLA:CPU the scan version of this round ran 25x
    # slower on ResNet-20 (convolutions in a loop body), and K is small.
    total = grad_fn(w, _tmap(lambda b: b[0], batches))
    for k in range(1, count):
        total = _tmap(jnp.add, total, grad_fn(w, _tmap(lambda b: b[k], batches)))
    g = _tmap(lambda t: t / count, total)

    def leaf_score(m, theta, wi, gi):
        if not is_pruned_leaf(m):
            return jnp.zeros((), jnp.result_type(theta))
        if revive:
            return jnp.abs(theta * gi)
        return jnp.where(m > 0, jnp.abs(wi * gi), -1.0).astype(jnp.result_type(theta))

    return _tmap(leaf_score, masks, params, w, g)


@jax.jit
def _round_counts(new: PyTree, old: PyTree) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(kept in ``new``, revived: kept in ``new`` but not in ``old``, pruned: the reverse)."""
    pairs = [(n, o) for n, o in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old)) if is_pruned_leaf(n)]
    kept = sum(jnp.count_nonzero(n) for n, _ in pairs)
    revived = sum(jnp.count_nonzero((n > 0) & (o == 0)) for n, o in pairs)
    pruned = sum(jnp.count_nonzero((n == 0) & (o > 0)) for n, o in pairs)
    return kept, revived, pruned


def progressive_prune(
    round_scores: Callable[[int, PyTree], PyTree],
    masks: PyTree,
    sparsity: float,
    *,
    rounds: int,
    schedule: str = "exponential",
    density_rule: Optional[str] = None,
    scope: Any = "global",
    min_per_layer: int = 0,
    keep_history_masks: bool = False,
) -> tuple[PyTree, dict]:
    """The loop shared by the iterative pruners (Iter-SNIP, FORCE, SynFlow).

    Round ``t = 0 .. rounds - 1`` calls ``round_scores(t, masks)`` (scores of the network masked by the
    current masks; negative entries rank below every other entry) and keeps the top ``ceil(d_t N)``
    with :func:`prospr_jax.methods.rule_masks`, ``d_t`` from :func:`density_schedule`; the last round
    uses ``sparsity`` itself. Layer-collapse warnings are raised for the final mask only.

    Returns:
      ``(masks, info)``: ``info['history']`` lists per round ``{'round', 'density', 'kept', 'revived',
      'pruned'}`` (revived: entries pruned before this round and kept after it; pruned: the reverse);
      plus ``'rounds'``, ``'schedule'``, ``'revived_total'`` and, with ``keep_history_masks``,
      ``'masks_history'`` (every round's mask).
    """
    target = 1.0 - check_sparsity(sparsity)
    densities = density_schedule(target, rounds, schedule)
    history, snapshots = [], []
    for t, d_t in enumerate(densities):
        scores = round_scores(t, masks)
        last = t == len(densities) - 1
        s_t = float(sparsity) if last else 1.0 - d_t
        with warnings.catch_warnings():
            if not last:
                warnings.simplefilter("ignore", LayerCollapseWarning)
            new = rule_masks(
                scores, s_t, density_rule=density_rule, scope=scope, min_per_layer=min_per_layer,
                negative_means_pruned=True,
            )
        kept, revived, pruned = jax.device_get(_round_counts(new, masks))
        history.append({"round": t + 1, "density": d_t, "kept": int(kept), "revived": int(revived), "pruned": int(pruned)})
        if keep_history_masks:
            snapshots.append(new)
        masks = new
    info = {
        "rounds": int(rounds),
        "schedule": schedule,
        "history": history,
        "revived_total": sum(h["revived"] for h in history),
    }
    if keep_history_masks:
        info["masks_history"] = snapshots
    return masks, info


def iterative_masks(
    loss_fn: LossFn,
    params: PyTree,
    batch_fn: Callable[[int], Any],
    sparsity: float,
    *,
    revive: bool,
    rounds: int = DEFAULT_ROUNDS,
    schedule: str = "exponential",
    batches_per_round: int = 1,
    reuse_batch: bool = False,
    prunable: PrunableSpec = None,
    exclude_first: bool = False,
    exclude_last: bool = False,
    density_rule: Optional[str] = None,
    scope: Any = "global",
    min_per_layer: int = 0,
    keep_history_masks: bool = False,
) -> tuple[PyTree, dict]:
    """Progressive pruning by Iter-SNIP (``revive=False``) or FORCE (``revive=True``).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: initial parameters ``theta_0``.
      batch_fn: ``batch_fn(i) -> batch``; round t (0-based) reads batches
        ``t * batches_per_round + j``, ``j < batches_per_round`` (``j`` only, with ``reuse_batch``).
      sparsity: final sparsity over the pruned leaves, in [0, 1).
      revive: FORCE (pruned weights can come back) instead of Iter-SNIP.
      rounds: T (default 60, the official README's).
      schedule: ``'exponential'`` (default) or ``'linear'``.
      batches_per_round: batches whose gradients are averaged in each round (official
        ``num_batches``; default 1).
      reuse_batch: use the same batch(es) in every round.
      prunable, exclude_first, exclude_last: which leaves are pruned.
      density_rule, scope, min_per_layer: how each round turns scores into masks
        (:func:`prospr_jax.methods.rule_masks`; default one global threshold, as the paper).
      keep_history_masks: also return every round's mask in ``info['masks_history']``.

    Returns:
      ``(masks, info)`` as :func:`progressive_prune` (``revived`` is always 0 for Iter-SNIP unless a
      density rule raises a layer's count between rounds), plus ``info['revive']``.
    """
    check_sparsity(sparsity)
    if isinstance(batches_per_round, bool) or not isinstance(batches_per_round, (int, np.integer)) or batches_per_round < 1:
        raise ValueError(f"`batches_per_round` must be an integer >= 1, got {batches_per_round!r}")
    density_schedule(0.5, rounds, schedule)  # validate before touching data
    selected = resolve_prunable(loss_fn, params, batch_fn(0), prunable, exclude_first, exclude_last)

    def round_scores(t: int, masks: PyTree) -> PyTree:
        start = 0 if reuse_batch else t * batches_per_round
        batches = stack_batches([batch_fn(start + j) for j in range(batches_per_round)])
        return masked_gradient_scores(loss_fn, params, masks, batches, revive=bool(revive))

    masks, info = progressive_prune(
        round_scores, dense_masks(params, selected), sparsity, rounds=rounds, schedule=schedule,
        density_rule=density_rule, scope=scope, min_per_layer=min_per_layer, keep_history_masks=keep_history_masks,
    )
    info["revive"] = bool(revive)
    return masks, info


def iterative_snip_masks(
    loss_fn: LossFn, params: PyTree, batch_fn: Callable[[int], Any], sparsity: float, **kwargs: Any
) -> tuple[PyTree, dict]:
    """Iter-SNIP: :func:`iterative_masks` with ``revive=False`` (monotone masks)."""
    return iterative_masks(loss_fn, params, batch_fn, sparsity, revive=False, **kwargs)


def force_masks(
    loss_fn: LossFn, params: PyTree, batch_fn: Callable[[int], Any], sparsity: float, **kwargs: Any
) -> tuple[PyTree, dict]:
    """FORCE: :func:`iterative_masks` with ``revive=True`` (pruned weights can come back)."""
    return iterative_masks(loss_fn, params, batch_fn, sparsity, revive=True, **kwargs)


def _problem_masks(method: str, revive: bool, problem: PruningProblem, sparsity: float, **options: Any):
    problem.require("batch_fn", method=method)
    problem.reject_problem_options(options, method=method)
    return iterative_masks(
        problem.loss_fn, problem.params, problem.batch, sparsity, revive=revive,
        prunable=problem.prunable_tree(), **options,
    )


def iterative_snip_method(
    problem: PruningProblem,
    sparsity: float,
    *,
    density_rule: Optional[str] = None,
    scope: Any = "global",
    min_per_layer: int = 0,
    **options: Any,
) -> tuple[PyTree, dict]:
    """Registry adapter of ``'iterative_snip'``: batches ``problem.batch(t)``; options of
    :func:`iterative_masks` (``rounds``, ``schedule``, ``batches_per_round``, ``reuse_batch``, ...)."""
    return _problem_masks(
        "iterative_snip", False, problem, sparsity,
        density_rule=density_rule, scope=scope, min_per_layer=min_per_layer, **options,
    )


def force_method(
    problem: PruningProblem,
    sparsity: float,
    *,
    density_rule: Optional[str] = None,
    scope: Any = "global",
    min_per_layer: int = 0,
    **options: Any,
) -> tuple[PyTree, dict]:
    """Registry adapter of ``'force'``: as :func:`iterative_snip_method` with FORCE scoring."""
    return _problem_masks(
        "force", True, problem, sparsity,
        density_rule=density_rule, scope=scope, min_per_layer=min_per_layer, **options,
    )
