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
  common convention (docs/methods.md), which gives every pruning method the same training budget from the
  same start, DRIVE's dense phase counting as pruning cost like IMP's rounds.
* ``'trained'``: the weights at the end of pruning (dense phase and in-between training included),
  masked: DRIVE read as an early-pruning method that keeps training the pruned network from where
  pruning left it (which of the two the paper's final training uses could not be confirmed). The
  steps already spent are in ``extras['train_steps']``, so the caller can shorten its budget by them.

The result's ``start_params`` holds the chosen params (train from ``apply_masks(start_params, masks)``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from prospr_jax._src.losses import LossFn
from prospr_jax._src.masks import apply_masks, dense_masks, is_pruned_leaf, rank_below_kept
from prospr_jax._src.problem import PruningProblem
from prospr_jax._src.prunable import PrunableSpec
from prospr_jax._src.tree import PyTree, is_traced
from prospr_jax._src.validate import check_choice, check_int, check_real
from prospr_jax.methods.base import Method, PruneResult, register
from prospr_jax.methods.rounds import density_schedule, round_record, train_key
from prospr_jax.methods.rules import MaskRule

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
    floats = tuple(check_real(v, "weights", low=0.0) for v in values)
    if not any(floats):
        raise ValueError(f"`weights` must be 3 finite numbers >= 0, not all zero, got {weights!r}")
    return floats


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
    check_choice(combine, "combine", COMBINES)
    weights = _check_weights(weights)
    if masks is None:
        masks = dense_masks(params, prunable_tree)
    weight_array = jnp.stack([jnp.asarray(v) for v in weights])
    return _drive_scores_jit(loss_fn, params, batch, masks, weight_array, combine=combine)


@dataclasses.dataclass(frozen=True)
class DriveOptions:
    """Options of DRIVE (see the module docstring).

    Attributes:
      dense_steps: optimiser steps of the dense phase (``>= 0``). Default 600, about 3 epochs of
        CIFAR-10 at batch 256 ("a few epochs"); set it for your data.
      rounds: number of pruning rounds ``T >= 1`` (default 10).
      round_steps: training steps after each round but the last (``>= 0``, default 10).
      weights, combine: the score's form, see :func:`drive_scores`.
      start_from: ``'theta0'`` (default, project convention) or ``'trained'`` (DRIVE continues from the
        trained weights); decides the result's ``start_params``.
    """

    dense_steps: int = 600
    rounds: int = 10
    round_steps: int = 10
    weights: Sequence[float] = (1.0, 1.0, 1.0)
    combine: str = "sum"
    start_from: str = "theta0"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_steps", check_int(self.dense_steps, "dense_steps", low=0))
        object.__setattr__(self, "rounds", check_int(self.rounds, "rounds", low=1))
        object.__setattr__(self, "round_steps", check_int(self.round_steps, "round_steps", low=0))
        object.__setattr__(self, "weights", _check_weights(self.weights))
        check_choice(self.combine, "combine", COMBINES)
        check_choice(self.start_from, "start_from", START_FROM)


@register
class Drive(Method):
    """Registry row of DRIVE: dense training, then iterative pruning by the three-term score.

    Needs ``params`` (``theta_0``), ``loss_fn``, ``batch_fn`` (round ``t`` scores on
    ``problem.batch(t - 1)``) and ``train_fn``; ``key`` (optional) seeds the training calls (call 0:
    dense phase, call ``t``: training after round ``t``). The masks keep exactly ``ceil((1 - sparsity)
    * N)`` weights (or per layer with ``scope='layerwise'``). ``history`` has per round ``round``,
    ``target_sparsity``, ``sparsity``, ``kept``, ``total``, ``kept_per_layer``, ``batch_index``;
    ``extras`` has ``'start_from'``, ``'trained_params'`` (masked params at the end of pruning),
    ``'dense_steps'``, ``'round_steps'``, ``'train_steps'`` (steps spent while pruning),
    ``'train_calls'``, ``'weights'``, ``'combine'``, ``'rounds'``.
    """

    name = "drive"
    paper = "Saikumar & Varghese, 2024"
    idea = "dense training for a few epochs, then iterative pruning by |theta| + |theta g| + |g| (per-layer normalised)"
    data = "training"
    cost = "a few epochs of dense training + scoring rounds"
    needs = ("batch_fn", "train_fn")
    Options = DriveOptions
    rules = ("scope", "min_per_layer")

    def prune(self, problem: PruningProblem, sparsity: float, options: DriveOptions, rule: MaskRule) -> PruneResult:
        rule.require_ranked_scope(self.name)
        theta_0 = problem.params
        masks = dense_masks(theta_0, problem.prunable_tree())
        params = theta_0
        calls = steps_used = 0
        if options.dense_steps:
            params = problem.train_fn(theta_0, masks, steps=options.dense_steps, key=train_key(problem.key, 0))
            calls += 1
            steps_used += options.dense_steps

        history = []
        # d**(t/T), the exponential schedule of iterative SNIP.
        for t, density in enumerate(density_schedule(1.0 - sparsity, options.rounds), start=1):
            scores = drive_scores(
                problem.loss_fn, params, problem.batch(t - 1), weights=options.weights, combine=options.combine,
                masks=masks,
            )
            masks = rule.masks(rank_below_kept(scores, masks), 1.0 - density)
            record = round_record(t, 1.0 - density, masks, theta_0)
            record["batch_index"] = t - 1
            history.append(record)
            if t < options.rounds and options.round_steps:
                params = problem.train_fn(
                    apply_masks(params, masks), masks, steps=options.round_steps, key=train_key(problem.key, t)
                )
                calls += 1
                steps_used += options.round_steps

        trained = apply_masks(params, masks)
        extras = {
            "rounds": options.rounds,
            "start_from": options.start_from,
            "trained_params": trained,
            "dense_steps": options.dense_steps,
            "round_steps": options.round_steps,
            "train_steps": steps_used,
            "train_calls": calls,
            "weights": list(options.weights),
            "combine": options.combine,
        }
        start = theta_0 if options.start_from == "theta0" else trained
        return PruneResult(masks=masks, start_params=start, history=tuple(history), extras=extras)


__all__ = ["COMBINES", "Drive", "DriveOptions", "START_FROM", "drive_scores"]
