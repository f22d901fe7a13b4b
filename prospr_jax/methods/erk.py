"""ERK layer densities (Evci et al., "Rigging the Lottery", ICML 2020): a density rule.

A *density rule* decides how many weights each layer keeps; a within-layer score decides which. ERK
gives layer ``l`` a density proportional to ``sum(kernel dims) / prod(kernel dims)``, so small layers
keep more of their weights; layers that would exceed density 1 are made dense and the scale solved
again over the others. ``density_rule='erk'`` in :func:`prospr_jax.methods.prune` ranks any method's
scores within each layer at these densities (random scores give the random-ERK baseline).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from prospr_jax._src.masks import kept_count
from prospr_jax._src.prunable import select_prunable
from prospr_jax._src.tree import PyTree, named_leaves, names_in_order
from prospr_jax._src.validate import check_real, check_same_structure, check_sparsity


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
        default selection of :func:`prospr_jax.select_prunable` (Conv/Dense kernels).
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
    power_scale = check_real(power_scale, "power_scale", low=0.0)

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


__all__ = ["erk_densities"]
