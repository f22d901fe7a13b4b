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
every magnitude, before :func:`prospr_jax.masks_from_scores` keeps the top count (ties broken
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

The caller trains the final ticket itself: ``train_fn(apply_masks(result.start_params, result.masks),
result.masks, start_step=result.start_step)`` (``start_params`` is the rewound ``theta_k``,
``start_step`` is ``k``).

Scope: global ranking over all prunable weights (Frankle et al. 2020 for deep
convolutional networks) by default; ``scope='layerwise'`` keeps the same fraction in every layer.
Frankle & Carbin 2019 also used different per-layer rates for conv and fully connected layers
(e.g. 10% / 20%) on their small networks; that variant is not offered.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from prospr_jax._src.masks import apply_masks, dense_masks, is_pruned_leaf, rank_below_kept, sparsity_report
from prospr_jax._src.problem import PruningProblem
from prospr_jax._src.tree import PyTree
from prospr_jax._src.validate import check_int, check_optional_int, check_real, check_sparsity
from prospr_jax.methods.base import Method, PruneResult, register
from prospr_jax.methods.rounds import round_record, train_key
from prospr_jax.methods.rules import MaskRule

EvalFn = Callable[[PyTree, PyTree], dict]


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
    max_rounds = check_optional_int(max_rounds, "max_rounds", low=1)
    d = 1.0 - s
    if rounds == 0:
        return []
    if max_rounds is not None and max_rounds < rounds:
        return [d ** (r / max_rounds) for r in range(1, max_rounds)] + [d]
    return [(1.0 - p) ** r for r in range(1, rounds)] + [d]


def _check_prune_fraction(prune_fraction: Any) -> float:
    """0.2 = remove 20% of the remaining weights per round."""
    return check_real(prune_fraction, "prune_fraction", low=0.0, high=1.0, low_open=True, high_open=True)


# --------------------------------------------------------------------------- the method


def magnitude_scores_among_kept(params: PyTree, masks: PyTree) -> PyTree:
    """``|theta|`` on pruned leaves (already-pruned entries ``-1``), a 0-d zero on the others."""
    scores = jax.tree_util.tree_map(
        lambda p, m: jnp.abs(p) if is_pruned_leaf(m) else jnp.zeros((), jnp.result_type(p)), params, masks
    )
    return rank_below_kept(scores, masks)


@dataclasses.dataclass(frozen=True)
class ImpOptions:
    """Options of IMP.

    Attributes:
      rewind_step: ``k``; 0 rewinds to ``theta_0`` (Frankle & Carbin 2019), ``k > 0`` to the params after
        ``k`` dense training steps (Frankle et al. 2020).
      prune_fraction: fraction of the remaining weights removed per round, in (0, 1); default 0.2.
      max_rounds: optional budget on the number of rounds; when it binds, the per-round fraction is
        raised so that the final sparsity is still exact (exponential schedule).
      round_steps: ``steps`` passed to ``train_fn`` in every round (``None``: the full budget).
      eval_fn: optional ``eval_fn(trained_params, masks) -> dict`` called after each round's training;
        its result is stored as the round's ``'metrics'``.
    """

    rewind_step: int = 0
    prune_fraction: float = 0.2
    max_rounds: Optional[int] = None
    round_steps: Optional[int] = None
    eval_fn: Optional[EvalFn] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rewind_step", check_int(self.rewind_step, "rewind_step", low=0))
        object.__setattr__(self, "prune_fraction", _check_prune_fraction(self.prune_fraction))
        object.__setattr__(self, "max_rounds", check_optional_int(self.max_rounds, "max_rounds", low=1))
        object.__setattr__(self, "round_steps", check_optional_int(self.round_steps, "round_steps", low=1))
        if self.eval_fn is not None and not callable(self.eval_fn):
            raise TypeError(f"`eval_fn` must be None or a callable (params, masks) -> dict, got {self.eval_fn!r}")


@register
class Imp(Method):
    """Registry row of IMP: lottery-ticket masks by iterative magnitude pruning with rewinding.

    Needs ``params`` (``theta_0``) and ``train_fn``; ``key`` (optional) seeds the training calls: call
    ``i`` gets ``fold_in(key, i)`` (0: the rewind run, ``r``: round ``r``), or ``None``. The masks keep
    exactly ``ceil((1 - sparsity) * N)`` weights (or per layer with ``scope='layerwise'``).
    ``start_params`` is ``theta_k`` (unmasked) and ``start_step`` is ``k``; ``history`` has per round
    ``round``, ``target_sparsity``, ``sparsity``, ``kept``, ``total``, ``kept_per_layer``, ``removed``
    and optionally ``metrics``; ``extras`` has ``'rounds'``, ``'rewind_step'``, ``'prune_fraction'``,
    ``'prune_fraction_used'``, ``'last_trained_params'`` (the trained params the last round pruned
    from; ``None`` with no round) and ``'train_calls'``.
    """

    name = "imp"
    paper = "Frankle & Carbin, ICLR 2019; Frankle et al., ICML 2020"
    idea = "train, remove 20% of the remaining weights by |theta|, rewind to theta_k, repeat"
    data = "training"
    cost = "ceil(ln(1-s)/ln 0.8) full trainings (11 for 90%, 18 for 98%)"
    needs = ("train_fn",)
    Options = ImpOptions
    rules = ("scope", "min_per_layer")

    def prune(self, problem: PruningProblem, sparsity: float, options: ImpOptions, rule: MaskRule) -> PruneResult:
        rule.require_ranked_scope(self.name)
        k, p = options.rewind_step, options.prune_fraction
        theta_0 = problem.params
        masks = dense_masks(theta_0, problem.prunable_tree())
        densities = imp_densities(sparsity, p, options.max_rounds)
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
                apply_masks(start, masks), masks, steps=options.round_steps, key=train_key(problem.key, r), **resume
            )
            calls += 1
            metrics = None if options.eval_fn is None else dict(options.eval_fn(trained, masks))
            masks = rule.masks(magnitude_scores_among_kept(trained, masks), 1.0 - density)
            record = round_record(r, 1.0 - density, masks, theta_0)
            record["removed"] = kept_before - record["kept"]
            kept_before = record["kept"]
            if metrics is not None:
                record["metrics"] = metrics
            history.append(record)

        rounds = len(densities)
        clipped = rounds < imp_num_rounds(sparsity, p)
        extras = {
            "rounds": rounds,
            "rewind_step": k,
            "prune_fraction": p,
            "prune_fraction_used": 1.0 - (1.0 - sparsity) ** (1.0 / rounds) if clipped else p,
            "last_trained_params": trained,
            "train_calls": calls,
        }
        return PruneResult(masks=masks, start_params=theta_k, start_step=k, history=tuple(history), extras=extras)


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


__all__ = ["Imp", "ImpOptions", "imp_densities", "imp_num_rounds", "magnitude_scores_among_kept"]
