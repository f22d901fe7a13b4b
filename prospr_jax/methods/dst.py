"""Dynamic sparse training (DST): a mask that changes while the network trains.

SET (Mocanu et al., Nature Communications 2018) and RigL (Evci et al., ICML 2020) start from a random
sparse mask and, every ``update_every`` optimiser steps, move a fraction of each layer's kept weights:

1. **drop**: in every pruned layer, remove the ``k = floor(f * n_l)`` kept weights of smallest
   magnitude ``|w|`` (``n_l``: the layer's kept count, ``f``: the drop fraction of this update);
2. **grow**: among the layer's positions not kept after the drop (the just-dropped ones included, as in
   RigL's code), add ``k`` back: at random (SET) or those with the largest dense-gradient magnitude
   ``|dL/dw|`` at the current weights (RigL).

So every layer keeps exactly ``n_l`` weights through every update. Growth uses the gradient of the
loss with respect to the *effective* weights ``w * m`` at every position (pruned ones included), on the
batch of the step that triggered the update.

A weight that enters the mask (0 in the old mask, 1 in the new) starts at exactly ``0.0`` (RigL's
default), and the optimiser's statistics of every entry whose mask changed (momentum, Adam moments)
are set to zero, so a regrown weight starts with clean state and a dropped one leaves none behind.
Weights kept by both masks keep their values and statistics.

Masks are data: an update replaces the masks inside :class:`prospr_jax.MaskedOptimizerState`
(:func:`prospr_jax.set_masks`), so a jitted train step that takes the optimiser state as an argument
is not recompiled, and the update itself is one compiled function whose drop fraction and key are
arguments (:class:`MaskUpdater`).

Schedule (:func:`drop_fraction_at`): updates after steps ``t = update_every, 2 * update_every, ...``
while ``t < end_fraction * total_steps`` (RigL stops at 75% of training). The drop fraction is
constant (SET) or cosine-decayed, ``f_t = f / 2 * (1 + cos(pi * t / T_end))`` (RigL). Departure from
RigL's code, on purpose: the update follows the optimiser step of step ``t`` on the same batch (RigL
replaces that step's weight update by the mask update), so every step trains.

Initial masks: random within each layer at ERK densities (RigL's default), Erdős–Rényi densities
(SET's), or the same density in every layer (``distribution='uniform'``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax._src.losses import LossFn
from prospr_jax._src.masks import apply_masks, is_pruned_leaf, masks_from_scores
from prospr_jax._src.optimizer import MaskedOptimizerState, masks_of, set_masks
from prospr_jax._src.problem import PruningProblem
from prospr_jax._src.topk import _top_k_flags_compiled
from prospr_jax._src.tree import PyTree
from prospr_jax._src.validate import check_choice, check_int, check_optional_int, check_real
from prospr_jax.methods.base import Method, PruneResult
from prospr_jax.methods.erk import erk_densities
from prospr_jax.methods.random_pruning import random_scores

REGROW = ("random", "gradient")
SCHEDULES = ("constant", "cosine")
DISTRIBUTIONS = ("erk", "er", "uniform")


# --------------------------------------------------------------------------- one update


def _layer_drop_and_grow(mask: jax.Array, drop_score: jax.Array, grow_score: jax.Array, fraction: jax.Array) -> jax.Array:
    """The new mask of one layer: keep ``n - k`` of the kept entries with the largest ``drop_score``, add
    the ``k`` entries not kept after that with the largest ``grow_score``; ``k = floor(fraction * n)``."""
    flat_mask = mask.reshape(-1) != 0
    n_kept = jnp.sum(flat_mask, dtype=jnp.int32)
    k = jnp.floor(fraction * n_kept.astype(jnp.float32)).astype(jnp.int32)
    low = jnp.asarray(-jnp.inf, jnp.float32)
    drop_flat = jnp.where(flat_mask, drop_score.reshape(-1).astype(jnp.float32), low)
    kept = _top_k_flags_compiled(drop_flat, n_kept - k)
    grow_flat = jnp.where(kept, low, grow_score.reshape(-1).astype(jnp.float32))
    grown = _top_k_flags_compiled(grow_flat, k) & ~kept
    return (kept | grown).reshape(mask.shape).astype(mask.dtype)


def drop_and_grow(masks: PyTree, drop_scores: PyTree, grow_scores: PyTree, fraction: Any) -> PyTree:
    """New masks after one drop-and-grow update (see the module docstring).

    Args:
      masks: current masks; full-shape leaves are updated, 0-d leaves (unpruned params) pass through.
      drop_scores: pytree like ``masks``: among kept entries, the lowest are dropped (``|w|``).
      grow_scores: pytree like ``masks``: among entries not kept after the drop, the highest grow
        (``|dL/dw|`` for RigL, uniform noise for SET). Finite values.
      fraction: drop fraction in [0, 1] (a Python float or a traced scalar).

    Returns:
      Masks of the same structure, shapes and dtypes, with exactly as many kept entries per layer.
      Ties go to the lower flat index. Jittable.
    """
    fraction = jnp.asarray(fraction, jnp.float32)
    return jax.tree_util.tree_map(
        lambda m, d, g: _layer_drop_and_grow(m, d, g, fraction) if is_pruned_leaf(m) else m,
        masks, drop_scores, grow_scores,
    )


def uniform_like(key: Any, masks: PyTree) -> PyTree:
    """Uniform [0, 1) noise on every full-shape leaf of ``masks`` (leaf ``i`` from ``fold_in(key, i)``),
    0-d zeros elsewhere: SET's random growth scores."""
    leaves, treedef = jax.tree_util.tree_flatten(masks)
    noise = [
        jax.random.uniform(jax.random.fold_in(key, i), np.shape(m)) if is_pruned_leaf(m) else jnp.zeros(())
        for i, m in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, noise)


def _zero_changed(tree: PyTree, changed: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x, c: jnp.where(c, jnp.zeros((), x.dtype), x) if np.shape(x) == np.shape(c) else x, tree, changed
    )


def reset_changed_state(opt_state: Any, params: PyTree, changed: PyTree) -> Any:
    """``opt_state`` with the entries where ``changed`` is True set to 0 in every params-shaped part of
    the wrapped optimiser's state (momentum traces, Adam moments; counters are left alone)."""
    params_def = jax.tree_util.tree_structure(params)

    def is_params_like(node: Any) -> bool:
        return not isinstance(node, MaskedOptimizerState) and jax.tree_util.tree_structure(node) == params_def

    def reset(node: Any) -> Any:
        if isinstance(node, MaskedOptimizerState):
            inner = jax.tree_util.tree_map(
                lambda n: _zero_changed(n, changed) if is_params_like(n) else n, node.inner_state,
                is_leaf=is_params_like,
            )
            return MaskedOptimizerState(masks=node.masks, inner_state=inner)
        return node

    return jax.tree_util.tree_map(reset, opt_state, is_leaf=lambda n: isinstance(n, MaskedOptimizerState))


def swap_masks(params: PyTree, opt_state: Any, new_masks: PyTree) -> tuple[PyTree, Any]:
    """Install ``new_masks`` (from :func:`drop_and_grow`) in ``(params, opt_state)``.

    Entries that enter the mask start at ``0.0``, dropped entries become ``0.0``, and the optimiser
    state of every entry whose mask changed is zeroed (:func:`reset_changed_state`). Jittable; the
    returned optimiser state has the old one's structure, shapes and dtypes.
    """
    old = masks_of(opt_state)
    changed = jax.tree_util.tree_map(
        lambda o, n: (jnp.asarray(o) != 0) != (jnp.asarray(n) != 0), old, new_masks
    )
    params = apply_masks(_zero_changed(params, changed), new_masks)
    opt_state = reset_changed_state(opt_state, params, changed)
    return params, set_masks(opt_state, new_masks)


# --------------------------------------------------------------------------- the schedule


def drop_fraction_at(step: int, *, drop_fraction: float, end_step: int, schedule: str) -> float:
    """The drop fraction of the update after step ``step``: ``drop_fraction`` (``'constant'``) or
    ``drop_fraction / 2 * (1 + cos(pi * step / end_step))`` (``'cosine'``, RigL)."""
    check_choice(schedule, "schedule", SCHEDULES)
    if schedule == "constant":
        return float(drop_fraction)
    return float(drop_fraction) / 2.0 * (1.0 + math.cos(math.pi * min(step, end_step) / max(end_step, 1)))


@dataclasses.dataclass(frozen=True)
class DstOptions:
    """Options shared by SET and RigL (defaults: RigL's; SET's defaults are set by its method).

    Attributes:
      update_every: ``DeltaT``, optimiser steps between mask updates (RigL: 100).
      drop_fraction: fraction of each layer's kept weights moved per update, in [0, 1) (0.3 in both papers).
      schedule: ``'cosine'`` (RigL) or ``'constant'`` (SET) decay of the drop fraction.
      end_fraction: no update after this fraction of the training steps, in (0, 1] (RigL: 0.75).
      distribution: initial layer densities: ``'erk'`` (RigL), ``'er'`` (Erdős–Rényi, SET) or ``'uniform'``.
      seed: seed of the initial random mask and of SET's random growth; ``None``: ``problem.key``.
    """

    update_every: int = 100
    drop_fraction: float = 0.3
    schedule: str = "cosine"
    end_fraction: float = 0.75
    distribution: str = "erk"
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "update_every", check_int(self.update_every, "update_every", low=1))
        object.__setattr__(self, "drop_fraction", check_real(self.drop_fraction, "drop_fraction", low=0.0, high=1.0, high_open=True))
        check_choice(self.schedule, "schedule", SCHEDULES)
        object.__setattr__(self, "end_fraction", check_real(self.end_fraction, "end_fraction", low=0.0, high=1.0, low_open=True))
        check_choice(self.distribution, "distribution", DISTRIBUTIONS)
        object.__setattr__(self, "seed", check_optional_int(self.seed, "seed", low=0))


def _options_key(problem_key: Any, options: DstOptions) -> Any:
    return jax.random.key(options.seed) if options.seed is not None else problem_key


@functools.lru_cache(maxsize=32)
def _compiled_update(loss_fn: LossFn, regrow: str) -> Callable[..., Any]:
    """One jitted update per (loss, growth rule): every cell of a run that shares the loss (the
    runner's problem) shares the compiled program."""

    def update(params, opt_state, batch, fraction, key):
        masks = masks_of(opt_state)
        effective = apply_masks(params, masks)
        drop = jax.tree_util.tree_map(jnp.abs, effective)
        if regrow == "gradient":
            grow = jax.tree_util.tree_map(jnp.abs, jax.grad(loss_fn)(effective, batch))
        else:
            grow = uniform_like(key, masks)
        return swap_masks(params, opt_state, drop_and_grow(masks, drop, grow, fraction))

    return jax.jit(update)


class MaskUpdater:
    """The mask updates of one DST run: when they happen and what each one does.

    Args:
      regrow: ``'random'`` (SET) or ``'gradient'`` (RigL).
      options: the :class:`DstOptions`.
      total_steps: the optimiser steps of the training run (fixes the end of the updates).
      loss_fn: ``loss_fn(params, batch) -> scalar`` (the dense gradient of RigL's growth).
      key: PRNG key of SET's random growth (update after step ``t`` uses ``fold_in(key, t)``).

    Call it as ``params, opt_state = updater(params, opt_state, batch, step)`` after optimiser step
    ``step`` (1-based count of steps done) when :meth:`is_update_step` says so. One compiled function
    serves every update (the fraction and the key are arguments).
    """

    def __init__(self, regrow: str, options: DstOptions, total_steps: int, loss_fn: LossFn, key: Any):
        self.regrow = check_choice(regrow, "regrow", REGROW)
        self.options = options
        self.total_steps = check_int(total_steps, "total_steps", low=1)
        self.end_step = int(math.floor(options.end_fraction * self.total_steps + 1e-9))
        self.key = key if key is not None else jax.random.key(0)
        self._update = _compiled_update(loss_fn, self.regrow)

    def is_update_step(self, step: int) -> bool:
        """Whether a mask update follows optimiser step ``step`` (the number of steps done)."""
        return step > 0 and step % self.options.update_every == 0 and step < self.end_step

    def updates_until(self, step: int) -> int:
        """How many updates follow the steps ``1 .. step``."""
        last = min(int(step), self.end_step - 1)
        return max(0, last // self.options.update_every)

    def fraction(self, step: int) -> float:
        o = self.options
        return drop_fraction_at(step, drop_fraction=o.drop_fraction, end_step=self.end_step, schedule=o.schedule)

    def __call__(self, params: PyTree, opt_state: Any, batch: Any, step: int) -> tuple[PyTree, Any]:
        key = jax.random.fold_in(self.key, int(step))
        return self._update(params, opt_state, batch, jnp.asarray(self.fraction(step), jnp.float32), key)


def initial_masks(problem: PruningProblem, sparsity: float, options: DstOptions) -> PyTree:
    """The random initial mask at ``sparsity``: uniform scores ranked within each layer at the
    ``distribution``'s densities (exact per-layer counts)."""
    prunable = problem.prunable_tree()
    scores = random_scores(_options_key(problem.key, options), problem.params, prunable)
    if options.distribution == "uniform":
        return masks_from_scores(scores, sparsity, scope="layerwise")
    densities = erk_densities(problem.params, prunable, sparsity, erdos_renyi_kernel=options.distribution == "erk")
    return masks_from_scores(scores, None, scope=densities)


class DynamicSparseMethod(Method):
    """A method whose mask changes during training; its :meth:`prune` gives the initial mask.

    Subclasses set :attr:`regrow`. The training loop asks :meth:`updater` for the
    :class:`MaskUpdater` of a run and calls it after the steps it names.
    """

    regrow: ClassVar[str]
    data = "training"
    needs: ClassVar[tuple[str, ...]] = ()
    rules: ClassVar[tuple[str, ...]] = ()

    def requirements(self, options: DstOptions) -> tuple[str, ...]:
        return ("key",) if options.seed is None else ()

    def prune(self, problem: PruningProblem, sparsity: float, options: DstOptions, rule: Any) -> PruneResult:
        masks = initial_masks(problem, sparsity, options)
        extras = {"dynamic": True, "regrow": self.regrow, "update_every": options.update_every,
                  "drop_fraction": options.drop_fraction, "schedule": options.schedule,
                  "end_fraction": options.end_fraction, "distribution": options.distribution}
        return PruneResult(masks=masks, extras=extras)

    def updater(self, problem: PruningProblem, options: DstOptions, total_steps: int) -> MaskUpdater:
        """The :class:`MaskUpdater` of a training run of ``total_steps`` steps on ``problem``'s loss."""
        key = jax.random.fold_in(_options_key(problem.key, options), 1)
        return MaskUpdater(self.regrow, options, total_steps, problem.loss_fn, key)


__all__ = [
    "DISTRIBUTIONS", "DstOptions", "DynamicSparseMethod", "MaskUpdater", "REGROW", "SCHEDULES", "drop_and_grow",
    "drop_fraction_at", "initial_masks", "reset_changed_state", "swap_masks", "uniform_like",
]
