"""Iterative magnitude pruning with rewinding: lottery tickets.

Frankle & Carbin (ICLR 2019) find a "winning ticket" by rounds of train -> prune -> reset: train the
network, remove 20% of the remaining weights with the smallest trained magnitude ``|theta_T|`` (one
global ranking), reset the surviving weights to their initial values ``theta_0``, repeat. Frankle et
al. (ICML 2020, "Linear mode connectivity and the lottery ticket hypothesis") rewind to ``theta_k``,
the weights after ``k`` steps of dense training, instead of ``theta_0``, which makes tickets work on
deeper networks. ``rewind_step=0`` is the original lottery ticket.

Schedule (defined exactly, so that the last round lands on the requested sparsity):

* rounds ``R = ceil(ln(1 - s) / ln(1 - p))`` for sparsity ``s`` and ``prune_fraction`` ``p``
  (11 for 90%, 14 for 95%, 18 for 98% with ``p = 0.2``; the ratio is rounded to 9 decimals first so
  that ``s = 1 - 0.8**k`` gives ``k`` rounds and not ``k + 1``);
* after round ``r < R`` exactly ``ceil((1 - p)**r * N)`` of the ``N`` prunable weights are kept (the
  sparsity ladder 1 - 0.8^r: 20, 36, 48.8, ...%); after round ``R`` exactly ``ceil((1 - s) * N)``.
  Each round therefore removes ``p`` of the remaining weights up to the rounding of the kept count,
  and the last round removes at most ``p``;
* ``max_rounds=R' < R`` (a budget) spreads the pruning over ``R'`` rounds with the exponential
  schedule ``d_r = (1 - s)**(r / R')``, so the final sparsity is still exact; the per-round fraction
  actually used is reported in ``info['prune_fraction_used']``.

Pruning only ever removes weights that are still kept: pruned weights get the score ``-1``, below
every magnitude, before :func:`prospr_jax.masks.masks_from_scores` keeps the top count (ties broken
deterministically), so the masks are monotone over the rounds.

Training goes through ``problem.train_fn(params, masks, *, steps=None, key=None) -> params``, so any
training loop composes. ``train_fn`` is always given params whose pruned weights are already zero.

* Round 1 trains the dense network from ``theta_0`` (the ordinary dense run).
* ``theta_k`` is ``train_fn(theta_0, dense_masks, steps=k)`` (``k > 0``); ``theta_0`` itself for ``k = 0``.
* Round ``r >= 2`` trains from ``apply_masks(theta_k, m_{r-1})``: ALL parameters are rewound (biases,
  BatchNorm scale/shift too), not only the surviving weights.
* ``round_steps`` sets the steps of every round (``None``: the caller's full budget).
* With ``k > 0``, the rounds started from ``theta_k`` continue the schedule from step ``k`` as
  Frankle et al. do: they call ``train_fn(..., steps=round_steps, start_step=k)`` (with
  ``steps=None`` the train_fn trains the remaining ``T - k`` steps), so ``train_fn`` must accept
  ``start_step`` when ``k > 0``.

The caller trains the final ticket itself: ``train_fn(apply_masks(info['rewound_params'], masks),
masks, start_step=info['start_step'])``. ``info['start_params']`` is the same value as
``info['rewound_params']``; ``info['start_step']`` is ``k``.

Scope: global ranking over all prunable weights (METHODS.md, and Frankle et al. 2020 for deep
convolutional networks) by default; ``scope='layerwise'`` keeps the same fraction in every layer.
Frankle & Carbin 2019 also used different per-layer rates for conv and fully connected layers
(e.g. 10% / 20%) on their small networks; that variant is not offered.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax.masks import (
    apply_masks,
    check_sparsity,
    dense_masks,
    is_pruned_leaf,
    kept_count,
    masks_from_scores,
    sparsity_report,
)
from prospr_jax.problem import PruningProblem
from prospr_jax.tree import PyTree

EvalFn = Callable[[PyTree, PyTree], dict]

SCOPES = ("global", "layerwise")


# --------------------------------------------------------------------------- shared helpers


def check_int(value: Any, arg: str, *, low: int) -> int:
    """``value`` as an ``int``, or a clear error naming ``arg`` unless it is an integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{arg}` must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"`{arg}` must be an integer >= {low}, got {value!r}")
    return int(value)


def check_optional_steps(value: Any, arg: str) -> Optional[int]:
    """``None`` (the caller's full budget) or an integer number of steps ``>= 1``."""
    return None if value is None else check_int(value, arg, low=1)


def check_scope(scope: Any) -> str:
    if not isinstance(scope, str) or scope not in SCOPES:
        raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}")
    return scope


def train_key(key: Any, index: int) -> Any:
    """The PRNG key of the ``index``-th ``train_fn`` call: ``fold_in(key, index)``, or ``None``."""
    return None if key is None else jax.random.fold_in(key, index)


def scores_among_kept(scores: PyTree, masks: PyTree) -> PyTree:
    """``scores`` with every already-pruned entry set to ``-1``.

    For non-negative scores this puts every pruned entry strictly below every kept one, so
    ``masks_from_scores`` with a kept count no larger than the current one only removes kept entries
    (the masks stay monotone). 0-d (unpruned) leaves pass through.
    """
    return jax.tree_util.tree_map(
        lambda s, m: jnp.where(jnp.asarray(m) != 0, s, -1) if is_pruned_leaf(s) else s, scores, masks
    )


def round_record(round_index: int, target_sparsity: float, masks: PyTree, params: PyTree) -> dict:
    """History entry of one pruning round: target and actual sparsity, kept counts per layer."""
    report = sparsity_report(masks, params)
    return {
        "round": round_index,
        "target_sparsity": target_sparsity,
        "sparsity": report.sparsity,
        "kept": report.prunable_kept,
        "total": report.prunable_total,
        "kept_per_layer": {layer.name: layer.kept for layer in report.layers},
    }


# --------------------------------------------------------------------------- the schedule


def imp_num_rounds(sparsity: float, prune_fraction: float = 0.2) -> int:
    """``ceil(ln(1 - s) / ln(1 - p))``: rounds of removing ``p`` of the remaining weights to reach ``s``.

    The ratio is rounded to 9 decimals before the ceiling, so ``s = 1 - (1 - p)**k`` gives ``k``.
    ``s = 0`` gives 0 rounds.
    """
    s = check_sparsity(sparsity)
    p = _check_prune_fraction(prune_fraction)
    if s == 0.0:
        return 0
    return max(1, math.ceil(round(math.log1p(-s) / math.log1p(-p), 9)))


def imp_densities(sparsity: float, prune_fraction: float = 0.2, max_rounds: Optional[int] = None) -> list[float]:
    """Target density after each round (see the module docstring); the last one is ``1 - sparsity``.

    Without a binding ``max_rounds``: ``(1 - p)**r`` for ``r = 1 .. R - 1`` then ``1 - s``. With
    ``max_rounds = R' < R``: ``(1 - s)**(r / R')`` for ``r = 1 .. R'``.
    """
    s = check_sparsity(sparsity)
    p = _check_prune_fraction(prune_fraction)
    rounds = imp_num_rounds(s, p)
    if max_rounds is not None:
        max_rounds = check_int(max_rounds, "max_rounds", low=1)
    d = 1.0 - s
    if rounds == 0:
        return []
    if max_rounds is not None and max_rounds < rounds:
        return [d ** (r / max_rounds) for r in range(1, max_rounds)] + [d]
    return [(1.0 - p) ** r for r in range(1, rounds)] + [d]


def _check_prune_fraction(prune_fraction: Any) -> float:
    if isinstance(prune_fraction, bool):
        raise TypeError(f"`prune_fraction` must be a number in (0, 1), got {prune_fraction!r}")
    try:
        p = float(prune_fraction)
    except (TypeError, ValueError):
        raise TypeError(f"`prune_fraction` must be a number in (0, 1), got {prune_fraction!r}") from None
    if not 0.0 < p < 1.0:
        raise ValueError(f"`prune_fraction` must be in (0, 1) (0.2 = remove 20% per round), got {prune_fraction!r}")
    return p


# --------------------------------------------------------------------------- the method


def magnitude_scores_among_kept(params: PyTree, masks: PyTree) -> PyTree:
    """``|theta|`` on pruned leaves (already-pruned entries ``-1``), a 0-d zero on the others."""
    scores = jax.tree_util.tree_map(
        lambda p, m: jnp.abs(p) if is_pruned_leaf(m) else jnp.zeros((), jnp.result_type(p)), params, masks
    )
    return scores_among_kept(scores, masks)


def imp_masks(
    problem: PruningProblem,
    sparsity: float,
    *,
    rewind_step: int = 0,
    prune_fraction: float = 0.2,
    max_rounds: Optional[int] = None,
    round_steps: Optional[int] = None,
    scope: str = "global",
    min_per_layer: int = 0,
    eval_fn: Optional[EvalFn] = None,
) -> tuple[PyTree, dict]:
    """Lottery-ticket masks by iterative magnitude pruning with rewinding (see the module docstring).

    Args:
      problem: needs ``params`` (``theta_0``) and ``train_fn``; ``prunable`` / ``exclude_first`` /
        ``exclude_last`` choose the pruned leaves; ``key`` (optional) seeds the training calls: call
        ``i`` gets ``fold_in(key, i)`` (0: the rewind run, ``r``: round ``r``), or ``None``.
      sparsity: final fraction of prunable weights removed, in [0, 1).
      rewind_step: ``k``; 0 rewinds to ``theta_0`` (Frankle & Carbin 2019), ``k > 0`` to the params after
        ``k`` dense training steps (Frankle et al. 2020).
      prune_fraction: fraction of the remaining weights removed per round, in (0, 1); default 0.2.
      max_rounds: optional budget on the number of rounds; when it binds, the per-round fraction is
        raised so that the final sparsity is still exact (exponential schedule).
      round_steps: ``steps`` passed to ``train_fn`` in every round (``None``: the full budget).
      scope: ``'global'`` (default, one magnitude threshold over all layers) or ``'layerwise'``.
      min_per_layer: keep at least this many weights in every layer in every round (collapse guard).
      eval_fn: optional ``eval_fn(trained_params, masks) -> dict`` called after each round's training;
        its result is stored as the round's ``'metrics'``.

    Returns:
      ``(masks, info)``: the ticket's masks (exactly ``ceil((1 - sparsity) * N)`` kept, or per layer
      with ``scope='layerwise'``) and a dict with ``'rounds'``, ``'history'`` (per round:
      ``round``, ``target_sparsity``, ``sparsity``, ``kept``, ``total``, ``kept_per_layer``,
      ``removed`` and optionally ``metrics``), ``'rewound_params'`` (``theta_k``, unmasked: train the
      ticket from ``apply_masks(rewound_params, masks)``), ``'start_params'`` (the same),
      ``'rewind_step'``, ``'prune_fraction'``, ``'prune_fraction_used'``, ``'scope'``,
      ``'last_trained_params'`` (the trained params the last round pruned from; ``None`` with no
      round) and ``'train_calls'``.
    """
    problem.require("train_fn", method="imp")
    s = check_sparsity(sparsity)
    p = _check_prune_fraction(prune_fraction)
    k = check_int(rewind_step, "rewind_step", low=0)
    if max_rounds is not None:
        max_rounds = check_int(max_rounds, "max_rounds", low=1)
    round_steps = check_optional_steps(round_steps, "round_steps")
    scope = check_scope(scope)
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"`eval_fn` must be None or a callable (params, masks) -> dict, got {eval_fn!r}")

    theta_0 = problem.params
    masks = dense_masks(theta_0, problem.prunable_tree())
    densities = imp_densities(s, p, max_rounds)
    calls = 0

    if k > 0:
        _require_start_step(problem.train_fn)
        theta_k = problem.train_fn(theta_0, masks, steps=k, key=train_key(problem.key, 0))
        calls += 1
    else:
        theta_k = theta_0

    history = []
    trained = None
    kept_before = sparsity_report(masks, theta_0).prunable_kept
    for r, density in enumerate(densities, start=1):
        start = theta_0 if r == 1 else theta_k
        resume = {"start_step": k} if (r > 1 and k > 0) else {}
        trained = problem.train_fn(
            apply_masks(start, masks), masks, steps=round_steps, key=train_key(problem.key, r), **resume
        )
        calls += 1
        metrics = None if eval_fn is None else dict(eval_fn(trained, masks))
        scores = magnitude_scores_among_kept(trained, masks)
        masks = masks_from_scores(scores, 1.0 - density, scope=scope, min_per_layer=min_per_layer)
        record = round_record(r, 1.0 - density, masks, theta_0)
        record["removed"] = kept_before - record["kept"]
        kept_before = record["kept"]
        if metrics is not None:
            record["metrics"] = metrics
        history.append(record)

    rounds = len(densities)
    clipped = rounds < imp_num_rounds(s, p)
    info = {
        "rounds": rounds,
        "history": history,
        "rewound_params": theta_k,
        "start_params": theta_k,
        "rewind_step": k,
        "start_step": k,
        "prune_fraction": p,
        "prune_fraction_used": 1.0 - (1.0 - s) ** (1.0 / rounds) if clipped else p,
        "scope": scope,
        "last_trained_params": trained,
        "train_calls": calls,
    }
    return masks, info


def _require_start_step(train_fn: Callable[..., Any]) -> None:
    """Rewinding to theta_k (k > 0) continues the schedule from step k: train_fn must take start_step."""
    try:
        parameters = inspect.signature(train_fn).parameters.values()
    except (TypeError, ValueError):
        return  # a callable without an inspectable signature: let the call itself decide
    if any(p.name == "start_step" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    raise ValueError(
        "imp with rewind_step > 0 trains the rewound rounds from step k of the schedule, as Frankle et "
        "al. do: `problem.train_fn` must accept `start_step=` (see PruningProblem.train_fn and "
        "prospr_jax.experiment.make_train_fn)"
    )
