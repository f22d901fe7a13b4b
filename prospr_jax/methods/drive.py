"""DRIVE: Dual Gradient-Based Rapid Iterative Pruning (Saikumar & Varghese, 2024).

What is known of the method: DRIVE trains the dense network for a few epochs first, to get away from
the randomness of the initialisation, and then prunes iteratively, ranking the weights with one score
that combines three terms:

* the L1 norm (magnitude) ``|theta|``;
* the connection sensitivity ``|theta * g|`` (SNIP's score);
* the convergence sensitivity ``|g|``, the size of the gradient (a weight whose gradient is still
  large has not converged and may yet matter),

with ``g = dL/dtheta`` on a batch. The paper claims DRIVE beats SNIP and SynFlow, approaches IMP in
accuracy, and produces its mask 43x to 869x faster than IMP.

What is NOT known: the exact weighting of the three terms could not be obtained. This module
implements each term normalised per layer to sum 1 (so the three are on one scale),
``score = w1 * |theta|/sum_l|theta| + w2 * |theta g|/sum_l|theta g| + w3 * |g|/sum_l|g|``, summed
with weights ``(1, 1, 1)`` by default; ``weights`` and ``combine='product'``
(``n1**w1 * n2**w2 * n3**w3``) are there to explore other forms. A per-layer sum of zero (a layer whose
gradient vanishes) makes that term zero in the layer instead of NaN. Per-layer normalisation gives
every layer the same total score whatever its size, so with global ranking the scores of small
layers are larger per weight: expect small layers to be pruned less than by plain magnitude.

Procedure of :func:`drive_masks` (``T = rounds``, final density ``d = 1 - sparsity``):

1. ``theta = train_fn(theta_0, dense_masks, steps=dense_steps)``: the dense phase.
2. For ``t = 1 .. T``: score the masked network ``theta * m`` on batch ``t - 1`` (``problem.batch``),
   keep exactly ``ceil(d**(t/T) * N)`` weights among those still kept (the exponential schedule of
   iterative SNIP; pruned weights never come back), and, except after the last round, train the
   masked network for ``round_steps`` steps.

Which weights the final training starts from is a choice, set by ``start_from``:

* ``'theta0'`` (default): the ORIGINAL initial weights ``theta_0`` with the DRIVE mask: the project's
  common convention (METHODS.md), which gives every pruning method the same training budget from the
  same start, DRIVE's dense phase counting as pruning cost like IMP's rounds.
* ``'trained'``: the weights at the end of pruning (dense phase and in-between training included),
  masked: DRIVE read as an early-pruning method that keeps training the pruned network from where
  pruning left it (which of the two the paper's final training uses could not be confirmed). The
  steps already spent are in ``info['train_steps']``, so the caller can shorten its budget by them.

``info['start_params']`` holds the chosen params (train from ``apply_masks(start_params, masks)``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from prospr_jax.masks import apply_masks, check_sparsity, dense_masks, is_pruned_leaf, masks_from_scores
from prospr_jax.methods.densities import density_schedule
from prospr_jax.methods.imp import (
    check_int,
    check_scope,
    round_record,
    scores_among_kept,
    train_key,
)
from prospr_jax.problem import PruningProblem
from prospr_jax.prunable import PrunableSpec
from prospr_jax.tree import PyTree, is_traced

LossFn = Callable[[PyTree, Any], jax.Array]

COMBINES = ("sum", "product")
START_FROM = ("theta0", "trained")


def _check_weights(weights: Any) -> tuple:
    try:
        values = tuple(weights)
    except TypeError:
        raise TypeError(
            f"`weights` must be a sequence of 3 numbers (L1, connection, convergence), got {weights!r}"
        ) from None
    if len(values) != 3:
        raise ValueError(f"`weights` must have 3 entries (L1, connection, convergence), got {weights!r}")
    if any(is_traced(v) for v in values):
        return values
    try:
        floats = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise TypeError(f"`weights` must be 3 real numbers, got {weights!r}") from None
    if any(not math.isfinite(v) or v < 0 for v in floats) or not any(floats):
        raise ValueError(f"`weights` must be 3 finite numbers >= 0, not all zero, got {weights!r}")
    return floats


def _check_combine(combine: Any) -> str:
    if not isinstance(combine, str) or combine not in COMBINES:
        raise ValueError(f"`combine` must be one of {COMBINES}, got {combine!r}")
    return combine


def _normalise(term: jax.Array) -> jax.Array:
    """``term / term.sum()``; all zeros when the sum is zero."""
    total = jnp.sum(term)
    positive = total > 0
    return jnp.where(positive, term / jnp.where(positive, total, 1), 0)


def _leaf_score(mask: jax.Array, w: jax.Array, g: jax.Array, weights: jax.Array, combine: str) -> jax.Array:
    keep = jnp.asarray(mask) != 0
    terms = [jnp.abs(w), jnp.abs(w * g), jnp.abs(g)]
    normalised = [_normalise(jnp.where(keep, t, 0)) for t in terms]
    if combine == "sum":
        score = sum(weights[i] * normalised[i] for i in range(3))
    else:
        score = functools.reduce(jnp.multiply, [jnp.power(normalised[i], weights[i]) for i in range(3)])
    return jnp.where(keep, score, 0).astype(jnp.result_type(w))


@functools.partial(jax.jit, static_argnames=("loss_fn", "combine"))
def _drive_scores_jit(loss_fn: LossFn, params: PyTree, batch: Any, masks: PyTree, weights: jax.Array, *, combine: str):
    w = apply_masks(params, masks)
    grads = jax.grad(loss_fn)(w, batch)
    return jax.tree_util.tree_map(
        lambda m, wi, gi: _leaf_score(m, wi, gi, weights, combine)
        if is_pruned_leaf(m)
        else jnp.zeros((), jnp.result_type(wi)),
        masks,
        w,
        grads,
    )


def drive_scores(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    combine: str = "sum",
    prunable_tree: PrunableSpec = None,
    masks: Optional[PyTree] = None,
) -> PyTree:
    """The DRIVE score of every prunable weight of the masked network ``params * masks``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: parameters (for DRIVE: after the dense training phase).
      batch: one batch for the gradient ``g = dL/dtheta`` at ``params * masks``.
      weights: ``(w1, w2, w3)`` for the per-layer normalised terms ``|theta|``, ``|theta g|``, ``|g|``;
        finite, ``>= 0``, not all zero. Default ``(1, 1, 1)`` (the paper's weighting is unknown).
      combine: ``'sum'`` (default): ``w1 n1 + w2 n2 + w3 n3``; ``'product'``: ``n1**w1 n2**w2 n3**w3``.
      prunable_tree: which leaves are scored: a bool pytree (e.g. ``problem.prunable_tree()``), a
        predicate, or ``None`` for Conv/Dense kernels. Ignored when ``masks`` is given.
      masks: current masks (0-d leaves: not pruned). Pruned entries are zero in ``theta``, are left out
        of every per-layer sum and score 0. Default: dense masks over ``prunable_tree``.

    Returns:
      Scores pytree (higher = keep): the combined score on pruned leaves (the leaf's shape and dtype),
      a 0-d zero elsewhere. Every term sums to 1 over the kept entries of each layer (0 if the layer's
      sum is 0). Jitted (compiled once per ``loss_fn``, ``combine`` and shapes); can run under ``jit``
      itself.
    """
    combine = _check_combine(combine)
    weights = _check_weights(weights)
    if masks is None:
        masks = dense_masks(params, prunable_tree)
    weight_array = jnp.stack([jnp.asarray(v) for v in weights])
    return _drive_scores_jit(loss_fn, params, batch, masks, weight_array, combine=combine)


def drive_masks(
    problem: PruningProblem,
    sparsity: float,
    *,
    dense_steps: int = 600,
    rounds: int = 10,
    round_steps: int = 10,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    combine: str = "sum",
    start_from: str = "theta0",
    scope: str = "global",
    min_per_layer: int = 0,
) -> tuple[PyTree, dict]:
    """DRIVE masks: dense training, then iterative pruning by the three-term score (module docstring).

    Args:
      problem: needs ``params`` (``theta_0``), ``loss_fn``, ``batch_fn`` (round ``t`` scores on
        ``problem.batch(t - 1)``) and ``train_fn``; ``key`` (optional) seeds the training calls (call
        0: dense phase, call ``t``: training after round ``t``).
      sparsity: final fraction of prunable weights removed, in [0, 1).
      dense_steps: optimiser steps of the dense phase (``>= 0``). Default 600, about 3 epochs of
        CIFAR-10 at batch 256 ("a few epochs"); set it for your data.
      rounds: number of pruning rounds ``T >= 1`` (default 10).
      round_steps: training steps after each round but the last (``>= 0``, default 10).
      weights, combine: the score's form, see :func:`drive_scores`.
      start_from: ``'theta0'`` (default, project convention) or ``'trained'`` (DRIVE continues from the
        trained weights); decides ``info['start_params']``.
      scope: ``'global'`` (default) or ``'layerwise'`` ranking.
      min_per_layer: keep at least this many weights in every layer (collapse guard).

    Returns:
      ``(masks, info)``: masks keeping exactly ``ceil((1 - sparsity) * N)`` weights, and ``info`` with
      ``'rounds'``, ``'history'`` (per round: ``round``, ``target_sparsity``, ``sparsity``, ``kept``,
      ``total``, ``kept_per_layer``, ``batch_index``), ``'start_params'``, ``'start_from'``,
      ``'trained_params'`` (masked params at the end of pruning), ``'dense_steps'``,
      ``'round_steps'``, ``'train_steps'`` (steps spent while pruning), ``'train_calls'``,
      ``'weights'``, ``'combine'``, ``'scope'``.
    """
    problem.require("train_fn", "loss_fn", method="drive")
    s = check_sparsity(sparsity)
    dense_steps = check_int(dense_steps, "dense_steps", low=0)
    rounds = check_int(rounds, "rounds", low=1)
    round_steps = check_int(round_steps, "round_steps", low=0)
    weights = _check_weights(weights)
    combine = _check_combine(combine)
    if not isinstance(start_from, str) or start_from not in START_FROM:
        raise ValueError(f"`start_from` must be one of {START_FROM}, got {start_from!r}")
    scope = check_scope(scope)
    problem.require("batch_fn", method="drive")

    theta_0 = problem.params
    masks = dense_masks(theta_0, problem.prunable_tree())
    params = theta_0
    calls = steps_used = 0
    if dense_steps:
        params = problem.train_fn(theta_0, masks, steps=dense_steps, key=train_key(problem.key, 0))
        calls += 1
        steps_used += dense_steps

    history = []
    densities = density_schedule(1.0 - s, rounds)  # d**(t/T), the exponential schedule of iterative SNIP
    for t, density in enumerate(densities, start=1):
        scores = drive_scores(
            problem.loss_fn, params, problem.batch(t - 1), weights=weights, combine=combine, masks=masks
        )
        masks = masks_from_scores(
            scores_among_kept(scores, masks), 1.0 - density, scope=scope, min_per_layer=min_per_layer
        )
        record = round_record(t, 1.0 - density, masks, theta_0)
        record["batch_index"] = t - 1
        history.append(record)
        if t < rounds and round_steps:
            params = problem.train_fn(
                apply_masks(params, masks), masks, steps=round_steps, key=train_key(problem.key, t)
            )
            calls += 1
            steps_used += round_steps

    trained = apply_masks(params, masks)
    info = {
        "rounds": rounds,
        "history": history,
        "start_params": theta_0 if start_from == "theta0" else trained,
        "start_from": start_from,
        "trained_params": trained,
        "dense_steps": dense_steps,
        "round_steps": round_steps,
        "train_steps": steps_used,
        "train_calls": calls,
        "weights": weights,
        "combine": combine,
        "scope": scope,
    }
    return masks, info
