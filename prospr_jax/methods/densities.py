"""Per-layer density rules: ERK densities (Evci et al., RigL, ICML 2020) and LAMP scores (Lee et al.,
ICLR 2021), plus the density schedules of the iterative pruners.

A *density rule* decides how many weights each layer keeps; a *within-layer score* decides which.
Both rules here work with any within-layer score, so ``density_rule='erk'`` turns random scores into
random-ERK and ``density_rule='lamp'`` turns magnitudes into LAMP (METHODS.md, "ERK" and "LAMP"):

* :func:`erk_densities`: ``density_l`` proportional to ``sum(kernel dims) / prod(kernel dims)``; layers
  that would exceed density 1 are made dense and the scale re-solved; the per-layer kept counts are
  integers that add up to exactly ``ceil(d * N)``.
* :func:`lamp_scores`: within a layer, sort ascending; ``score(u) = s_u^2 / sum_{v >= u} s_v^2``; then one
  global threshold.
* :func:`rule_masks`: scores -> masks under a density rule (used by the method registry and by every
  iterative method at each round).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax.masks import check_sparsity, is_pruned_leaf, kept_count, masks_from_scores
from prospr_jax.prunable import select_prunable
from prospr_jax.tree import PyTree, check_same_structure, is_traced, named_leaves, names_in_order

DENSITY_RULES = (None, "erk", "lamp")
SCHEDULES = ("exponential", "linear")


def _shape(leaf: Any) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)
    return tuple(int(d) for d in (np.shape(leaf) if shape is None else shape))


def _raw_density(shape: tuple[int, ...], erdos_renyi_kernel: bool, power_scale: float) -> float:
    dims = shape if (erdos_renyi_kernel or len(shape) < 2) else shape[-2:]
    return (sum(dims) / math.prod(dims)) ** power_scale


def _largest_remainder(targets: Sequence[float], caps: Sequence[int], total: int) -> list[int]:
    """Integers ``k_l <= caps[l]`` close to ``targets`` (floors, then +1 for the largest fractional
    parts, earlier layer first on ties) that add up to exactly ``total``."""
    counts = [min(cap, max(0, math.floor(t + 1e-9))) for t, cap in zip(targets, caps)]
    missing = total - sum(counts)
    order = sorted(range(len(targets)), key=lambda i: (-(targets[i] - math.floor(targets[i] + 1e-9)), i))
    while missing > 0:
        progressed = False
        for i in order:
            if missing == 0:
                break
            if counts[i] < caps[i]:
                counts[i] += 1
                missing -= 1
                progressed = True
        if not progressed:  # pragma: no cover - total <= sum(caps) always holds for callers
            raise ValueError(f"cannot place {total} kept weights in layers of sizes {list(caps)}")
    while missing < 0:  # floating-point overshoot: take back from the smallest fractional parts
        for i in reversed(order):
            if missing == 0:
                break
            if counts[i] > 0:
                counts[i] -= 1
                missing += 1
    return counts


def erk_densities(
    params_or_shapes: PyTree,
    prunable_tree: Optional[PyTree],
    sparsity: float,
    *,
    erdos_renyi_kernel: bool = True,
    power_scale: float = 1.0,
) -> dict[str, float]:
    """Erdős–Rényi(-Kernel) layer densities with an exact global kept count.

    ``density_l = min(1, eps * raw_l)`` with ``raw_l = (sum of the kernel's dims / product of its
    dims) ** power_scale`` (ERK, RigL's default) or, with ``erdos_renyi_kernel=False``, the plain
    Erdős–Rényi ``(n_in + n_out) / (n_in * n_out)`` of the last two axes (flax kernels: ``[..., in,
    out]``). ``eps`` is solved so the kept counts add up to ``ceil((1 - sparsity) * N)``; a layer whose
    density would exceed 1 is made dense (largest ``raw_l`` first) and ``eps`` re-solved over the rest,
    as in RigL.

    Departure from RigL, on purpose: the real-valued counts ``density_l * N_l`` are rounded to integers
    by the largest-remainder method, and the returned density of each layer is ``k_l / N_l``, so
    ``masks_from_scores(scores, None, scope=erk_densities(...))`` keeps exactly ``ceil(d * N)`` weights in
    all (RigL rounds each layer on its own and misses the total by up to one weight per layer).

    Args:
      params_or_shapes: the params, or any pytree with their leaves' shapes (arrays,
        ``jax.ShapeDtypeStruct``, or a scores pytree).
      prunable_tree: bool pytree of pruned leaves (e.g. ``problem.prunable_tree()``); ``None``: the
        default selection of :func:`prospr_jax.prunable.select_prunable` (Conv/Dense kernels).
      sparsity: global sparsity over the pruned leaves, in [0, 1).
      erdos_renyi_kernel: ERK (all kernel dims, default) or plain ER (the two channel dims).
      power_scale: exponent on ``raw_l`` (RigL's ``erk_power_scale``; 1.0 = ERK, 0.0 = uniform).

    Returns:
      ``{path_name: density}`` for every pruned leaf, in flattening order.
    """
    density = 1.0 - check_sparsity(sparsity)
    if prunable_tree is None:
        prunable_tree = select_prunable(params_or_shapes)
    check_same_structure(prunable_tree, params_or_shapes, arg="prunable_tree", ref_arg="params_or_shapes")
    try:
        power_scale = float(power_scale)
    except (TypeError, ValueError):
        raise TypeError(f"`power_scale` must be a real number >= 0, got {power_scale!r}") from None
    if not math.isfinite(power_scale) or power_scale < 0:
        raise ValueError(f"`power_scale` must be a finite number >= 0, got {power_scale!r}")

    layers = [
        (name, _shape(leaf))
        for (name, leaf), (_, keep) in zip(named_leaves(params_or_shapes), named_leaves(prunable_tree))
        if keep
    ]
    if not layers:
        raise ValueError("`prunable_tree` selects no leaf: nothing to prune")
    empty = [n for n, s in layers if math.prod(s) == 0 or len(s) == 0]
    if empty:
        raise ValueError(f"ERK needs pruned leaves with ndim >= 1 and at least one entry; got {names_in_order(empty)}")
    sizes = [math.prod(s) for _, s in layers]
    raw = [_raw_density(s, bool(erdos_renyi_kernel), power_scale) for _, s in layers]
    total = kept_count(density, sum(sizes))

    dense: set[int] = set()
    while True:
        free = [i for i in range(len(layers)) if i not in dense]
        if not free:
            break
        budget = total - sum(sizes[i] for i in dense)
        eps = budget / sum(raw[i] * sizes[i] for i in free)
        top = max(raw[i] for i in free)
        if top * eps > 1.0:
            dense.update(i for i in free if raw[i] == top)
            continue
        break
    targets = [float(sizes[i]) if i in dense else raw[i] * eps * sizes[i] for i in range(len(layers))]
    counts = _largest_remainder(targets, sizes, total)
    return {name: k / n for (name, _), k, n in zip(layers, counts, sizes)}


def _lamp_leaf(score: jax.Array) -> jax.Array:
    flat = score.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    squared = jnp.square(flat[order])
    suffix = jnp.cumsum(squared[::-1])[::-1]  # sum_{v >= u} s_v^2 in ascending order
    lamp = jnp.where(suffix > 0, squared / jnp.where(suffix > 0, suffix, 1), 0)
    return jnp.zeros_like(lamp).at[order].set(lamp).reshape(score.shape)


def lamp_scores(scores: PyTree) -> PyTree:
    """LAMP scores (Lee et al., ICLR 2021) from within-layer scores.

    For every pruned leaf (``ndim >= 1``), flattened and sorted ascending with ties in flattening order
    (stable sort, as the authors' ``torch.sort``), ``lamp(u) = s_u^2 / sum_{v >= u} s_v^2``; entries whose
    suffix sum is 0 get 0. The paper's ``s`` is ``|w|`` (:func:`prospr_jax.methods.magnitude_scores`);
    here any non-negative within-layer score may stand in for ``|w|`` (``density_rule='lamp'``). Ranking
    the result with ONE global threshold (``scope='global'``) gives LAMP's layer densities. Every layer's
    largest entry scores 1, so LAMP never empties a layer whose scores are not all zero.

    Args:
      scores: a scores pytree (see :mod:`prospr_jax.masks`); must be non-negative (checked outside
        ``jit``).

    Returns:
      A scores pytree of the same structure, values in [0, 1]; 0-d leaves are passed through.
    """
    named = [(n, s) for n, s in named_leaves(scores) if is_pruned_leaf(s)]
    if not named:
        raise ValueError("`scores` has no leaf with ndim >= 1: nothing to prune")
    concrete = [(n, s) for n, s in named if not is_traced(s)]
    if concrete:
        negative = jax.device_get([jnp.any(jnp.asarray(s) < 0) for _, s in concrete])
        bad = [n for (n, _), neg in zip(concrete, negative) if neg]
        if bad:
            raise ValueError(
                f"LAMP squares the within-layer scores, so they must be non-negative (magnitudes); "
                f"negative scores in {names_in_order(bad)}"
            )
    return jax.tree_util.tree_map(lambda s: _lamp_leaf(jnp.asarray(s)) if is_pruned_leaf(s) else s, scores)


def rule_masks(
    scores: PyTree,
    sparsity: float,
    *,
    density_rule: Optional[str] = None,
    scope: Any = "global",
    min_per_layer: int = 0,
    erk_options: Optional[Mapping[str, Any]] = None,
    negative_means_pruned: bool = False,
) -> PyTree:
    """Masks from a scores pytree under a density rule.

    Args:
      scores: scores pytree (higher = keep).
      sparsity: global sparsity over the pruned leaves, in [0, 1).
      density_rule: ``None`` (the ``scope`` decides: one global threshold or the same density in every
        layer), ``'erk'`` (:func:`erk_densities` of the scores' leaf shapes, the scores rank within each
        layer) or ``'lamp'`` (:func:`lamp_scores`, one global threshold).
      scope: ``'global'`` or ``'layerwise'`` (or a ``{path_name: density}`` mapping) when
        ``density_rule`` is None; must stay ``'global'`` with a density rule.
      min_per_layer: layer-collapse guard of :func:`prospr_jax.masks_from_scores`.
      erk_options: keyword arguments for :func:`erk_densities` (``erdos_renyi_kernel``, ``power_scale``).
      negative_means_pruned: the iterative pruners mark already pruned weights with a negative score so
        they rank below every live weight; with ``'lamp'`` such entries are left out of the LAMP
        normalisation and keep their negative score. Off by default: LAMP then rejects negative scores.
    """
    if density_rule not in DENSITY_RULES:
        raise ValueError(f"`density_rule` must be one of {DENSITY_RULES}, got {density_rule!r}")
    if erk_options and density_rule != "erk":
        raise ValueError("`erk_options` only apply with density_rule='erk'")
    if density_rule is None:
        if isinstance(scope, Mapping):
            return masks_from_scores(scores, None, scope=scope, min_per_layer=min_per_layer)
        return masks_from_scores(scores, sparsity, scope=scope, min_per_layer=min_per_layer)
    if isinstance(scope, Mapping) or scope != "global":
        raise ValueError(
            f"density_rule={density_rule!r} sets the layer densities itself; leave `scope` at 'global' "
            f"(got {scope!r})"
        )
    if density_rule == "lamp":
        if negative_means_pruned:
            clipped = jax.tree_util.tree_map(lambda s: jnp.maximum(s, 0) if is_pruned_leaf(s) else s, scores)
            lamp = jax.tree_util.tree_map(
                lambda s, l: jnp.where(s < 0, s, l) if is_pruned_leaf(s) else l, scores, lamp_scores(clipped)
            )
        else:
            lamp = lamp_scores(scores)
        return masks_from_scores(lamp, sparsity, scope="global", min_per_layer=min_per_layer)
    pruned = jax.tree_util.tree_map(is_pruned_leaf, scores)
    densities = erk_densities(scores, pruned, sparsity, **dict(erk_options or {}))
    return masks_from_scores(scores, None, scope=densities, min_per_layer=min_per_layer)


def density_schedule(density: float, rounds: int, schedule: str = "exponential") -> list[float]:
    """Target densities ``d_1, ..., d_T`` of an iterative pruner ending at ``d_T = density``.

    ``'exponential'``: ``d_t = density ** (t / T)`` (FORCE's default and SynFlow's schedule);
    ``'linear'``: ``d_t = 1 - (1 - density) * t / T``.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"`rounds` must be an integer >= 1, got {rounds!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"`density` must be in (0, 1], got {density!r}")
    t = np.arange(1, int(rounds) + 1) / int(rounds)
    values = density**t if schedule == "exponential" else 1.0 - (1.0 - density) * t
    values[-1] = density
    return [float(v) for v in values]
