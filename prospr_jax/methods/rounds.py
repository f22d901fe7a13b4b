"""What the methods that prune in rounds share: density schedules, the progressive loop, round records.

Iter-SNIP, FORCE and SynFlow prune progressively: round ``t`` scores the network masked by the previous
round's mask and keeps the top ``ceil(d_t N)`` under the caller's mask rule, ``d_t`` falling from 1 to
the target density on a schedule (:func:`progressive_prune`). DRIVE and IMP train between rounds and
record each round with :func:`round_record`; already pruned entries are ranked below the live ones by
:func:`prospr_jax.rank_below_kept` in all of them.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax._src.masks import LayerCollapseWarning, is_pruned_leaf, sparsity_report
from prospr_jax._src.tree import PyTree
from prospr_jax._src.validate import check_choice, check_int, check_real, check_sparsity
from prospr_jax.methods.base import PruneResult

SCHEDULES = ("exponential", "linear")


def density_schedule(density: float, rounds: int, schedule: str = "exponential") -> list[float]:
    """Target densities ``d_1, ..., d_T`` of an iterative pruner ending at ``d_T = density``.

    ``'exponential'``: ``d_t = density ** (t / T)`` (FORCE's default and SynFlow's schedule);
    ``'linear'``: ``d_t = 1 - (1 - density) * t / T``.
    """
    rounds = check_int(rounds, "rounds", low=1)
    check_choice(schedule, "schedule", SCHEDULES)
    density = check_real(density, "density", low=0.0, high=1.0, low_open=True)
    t = np.arange(1, rounds + 1) / rounds
    values = density**t if schedule == "exponential" else 1.0 - (1.0 - density) * t
    values[-1] = density
    return [float(v) for v in values]


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
    rule: Any,
    *,
    rounds: int,
    schedule: str = "exponential",
    keep_history_masks: bool = False,
) -> PruneResult:
    """The loop shared by the iterative pruners (Iter-SNIP, FORCE, SynFlow).

    Round ``t = 0 .. rounds - 1`` calls ``round_scores(t, masks)`` (scores of the network masked by the
    current masks; negative entries rank below every other entry) and keeps the top ``ceil(d_t N)``
    with ``rule`` (a :class:`prospr_jax.methods.MaskRule`), ``d_t`` from :func:`density_schedule`; the
    last round uses ``sparsity`` itself. Layer-collapse warnings are raised for the final mask only.

    Returns:
      A :class:`prospr_jax.methods.PruneResult`: ``history`` lists per round ``{'round', 'density',
      'kept', 'revived', 'pruned'}`` (revived: entries pruned before this round and kept after it;
      pruned: the reverse); ``extras`` holds ``'rounds'``, ``'schedule'``, ``'revived_total'`` and, with
      ``keep_history_masks``, ``'masks_history'`` (every round's mask).
    """
    target = 1.0 - check_sparsity(sparsity)
    densities = density_schedule(target, rounds, schedule)
    history, snapshots = [], []
    for t, d_t in enumerate(densities):
        scores = round_scores(t, masks)
        last = t == len(densities) - 1
        with warnings.catch_warnings():
            if not last:
                warnings.simplefilter("ignore", LayerCollapseWarning)
            new = rule.masks(scores, float(sparsity) if last else 1.0 - d_t, negative_means_pruned=True)
        kept, revived, pruned = jax.device_get(_round_counts(new, masks))
        history.append({"round": t + 1, "density": d_t, "kept": int(kept), "revived": int(revived), "pruned": int(pruned)})
        if keep_history_masks:
            snapshots.append(new)
        masks = new
    extras: dict[str, Any] = {
        "rounds": int(rounds),
        "schedule": schedule,
        "revived_total": sum(h["revived"] for h in history),
    }
    if keep_history_masks:
        extras["masks_history"] = snapshots
    return PruneResult(masks=masks, history=tuple(history), extras=extras)


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


def train_key(key: Optional[Any], index: int) -> Optional[Any]:
    """The PRNG key of the ``index``-th ``train_fn`` call: ``fold_in(key, index)``, or ``None``."""
    return None if key is None else jax.random.fold_in(key, index)


__all__ = ["SCHEDULES", "density_schedule", "progressive_prune", "round_record", "train_key"]
